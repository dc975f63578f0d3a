"""Every error the protocol layer raises, as one hierarchy::

    ProtocolError (ValueError)        .error_code: the in-band code to report it with (50001)
     ├── FramingError                 a NUL-framed stream is broken; .offset = absolute byte
     │                                offset of the offending frame
     ├── InvalidMessage               a JSON body does not fit its wire model; .field names it
     │    ├── InvalidRequest          from DB-GPT: refused before any FastChat slot is taken
     │    │                           (40001 VALIDATION_TYPE_ERROR, or 40302 out of range)
     │    └── InvalidReply            from FastChat: an answer we cannot translate (50001)
     ├── ContextOverflow              the prompt leaves no room to generate (40303), with
     │                                FastChat's own wording
     ├── WorkerError                  a FastChat worker answered with its error object
     │                                {"text", "error_code"}; carries that code and text
     └── UnknownSeparatorStyle        a conversation template whose sep_style cannot be rendered

Every class is a ``ValueError``: each one means "these bytes or values are wrong", never "the
network failed" (transport errors live in the adapter, not here). The adapter turns any of
them into one in-band DB-GPT error frame with ``error_output(exc.error_code, str(exc))``,
because a DB-GPT stream reader never looks at the HTTP status (docs/protocol.md §6.3).
"""

from __future__ import annotations

__all__ = [
    "ContextOverflow",
    "FramingError",
    "InvalidMessage",
    "InvalidReply",
    "InvalidRequest",
    "ProtocolError",
    "UnknownSeparatorStyle",
    "WorkerError",
]

# Literal codes rather than ``fastchat.ErrorCode``: this module must import nothing of ours,
# so that every other module can import it. tests/protocol/test_fastchat.py checks they agree.
_VALIDATION_TYPE_ERROR = 40001
_CONTEXT_OVERFLOW = 40303
_INTERNAL_ERROR = 50001


class ProtocolError(ValueError):
    """Base class. ``error_code`` is the FastChat/DB-GPT code to report this error with."""

    error_code: int = _INTERNAL_ERROR


class FramingError(ProtocolError):
    """A NUL-delimited JSON stream cannot be decoded.

    ``offset`` is the absolute position in the stream (bytes fed since the decoder was made)
    of the first byte of the frame at fault.
    """

    def __init__(self, message: str, *, offset: int) -> None:
        super().__init__(f"{message} (frame at stream offset {offset})")
        self.offset = offset


class InvalidMessage(ProtocolError):
    """A JSON body does not fit its wire model. ``field`` is the dotted path of the first
    offending key (``"messages.2.role"``), or ``""`` for the body as a whole."""

    def __init__(self, message: str, *, field: str = "", error_code: int | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.reason = message
        self.field = field
        if error_code is not None:
            self.error_code = error_code


class InvalidRequest(InvalidMessage):
    """A DB-GPT request we refuse rather than forward: a missing prompt, a non-int or
    non-positive ``max_new_tokens`` and similar values crash a FastChat worker mid-stream and
    leak its concurrency slot for good (docs/protocol.md §1.2, §1.5)."""

    error_code = _VALIDATION_TYPE_ERROR


class InvalidReply(InvalidMessage):
    """A FastChat answer that does not have its documented shape."""


class ContextOverflow(ProtocolError):
    """The prompt is too long for the model: no token is left to generate.

    The message is FastChat's own (``openai_api_server``), so users see the familiar text.
    """

    error_code = _CONTEXT_OVERFLOW

    def __init__(self, *, context_length: int, prompt_tokens: int) -> None:
        super().__init__(
            f"This model's maximum context length is {context_length} tokens. However, your "
            f"messages resulted in {prompt_tokens} tokens. Please reduce the length of the "
            "messages."
        )
        self.context_length = context_length
        self.prompt_tokens = prompt_tokens


class WorkerError(ProtocolError):
    """A FastChat worker answered with its in-band error object ``{"text", "error_code"}``
    where a result was expected (embeddings, count_token)."""

    def __init__(self, text: str, *, error_code: int) -> None:
        super().__init__(text)
        self.text = text
        self.error_code = error_code


class UnknownSeparatorStyle(ProtocolError):
    """A conversation template's ``sep_style`` is not a style of the numbering ("0.2.36" or
    "main") it was decoded with, or is null. ``detail`` adds a hint to the message."""

    def __init__(
        self, value: object, template: str | None, numbering: str, *, detail: str = ""
    ) -> None:
        message = (
            f"unknown sep_style {value!r} in conversation template {template!r} "
            f"(FastChat {numbering} numbering)"
        )
        super().__init__(f"{message}: {detail}" if detail else message)
        self.value = value
        self.template = template
        self.numbering = numbering
