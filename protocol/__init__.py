"""Both wire protocols as pure code: FastChat workers and the DB-GPT model cluster.

No I/O happens here (no httpx, fastapi, uvicorn or asyncio): every function takes values and
returns values, in the spirit of h11. Where a request enters and leaves:

- ``framing``: NUL-delimited JSON in both directions (``FrameDecoder``, ``encode_frame``).
- ``dbgpt``: what DB-GPT sends us (``PromptRequest``…) and what we answer (``ModelOutput``…).
- ``fastchat``: what we send FastChat workers (``GenerationParams``…) and what they answer.
- ``conversation``: FastChat's prompt rendering (``render_prompt``).
- ``translate``: DB-GPT request → FastChat request, FastChat reply → DB-GPT reply.
- ``errors``: the one exception hierarchy.

A bare section sign in a comment (``§9.2``) points into ``docs/protocol.md``, the protocol
reference this package implements; ``docs/decisions.md`` explains where we chose.

Import from the modules (``from protocol.framing import FrameDecoder``): this package re-exports
nothing, because both sides have an ``EmbeddingsRequest`` and a ``CountTokenRequest``.
"""
