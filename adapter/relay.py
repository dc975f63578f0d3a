"""One generation request, from a parsed ``PromptRequest`` to DB-GPT frames (docs/protocol.md §9).

The pipeline, shared by ``/generate_stream`` and ``/generate``::

    resolve the worker (shortest queue)          unknown model      -> 40301 / 50005
    model_info: template + context length        (cached per worker and model)
    build_prompt                                  template unusable  -> 50001
    /count_token                                  only when the clamp may bind (see prepare)
    plan_generation                               context overflow   -> 40303, nothing sent
    /worker_generate_stream or /worker_generate

Every failure becomes exactly one ``ModelOutput`` with a non-zero ``error_code`` and a message
naming the worker and the cause (``UpstreamError``'s text): 50005 unreachable, 50006 idle
timeout, 50001 anything else (HTTP error, broken or malformed stream). The stream route sends
it as its last frame, the non-stream route as its body, both with HTTP 200, because DB-GPT's
stream reader never looks at the status and its non-stream client would replace our message
with its own (§6.3, §8.5). An error chunk from the worker is forwarded as it is, and ends the
stream.

Streaming relays each upstream frame as one downstream frame the moment it is decoded, inside
the upstream read's own callback (``relay`` in ``_stream``: it never awaits); the frames decoded
from one upstream read go out in one write (the same bytes, fewer system calls). When the client
is not keeping up (``Downstream.lagging``), only the newest frame of a read is sent, and
``Downstream`` keeps only the newest for it: frames carry cumulative text and usage, so the
client loses nothing but intermediate states, and gets the newest sooner. The frame that ends the
stream is always sent as it is. After the frame that ends the stream (a finish reason or an
error), the rest of the upstream body is read and dropped, so the worker sees a complete
exchange; a failure during that drain changes nothing downstream. The drain is bounded by
``DRAIN_TIMEOUT``: DB-GPT sends its last events only when our body ends, so a worker that keeps
its body open after the final chunk must not hold the answer for the idle timeout; the upstream
connection is closed instead (FastChat frees the slot either way).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from adapter.errors import NoWorker, RequestFailed, UpstreamError
from adapter.pool import Route
from adapter.streaming import Downstream
from adapter.tracking import Outcome, Tracker
from protocol.dbgpt import FrameEncoder, ModelOutput, PromptRequest
from protocol.errors import ContextOverflow, InvalidRequest, ProtocolError
from protocol.fastchat import ErrorCode
from protocol.translate import (
    GenerationPlan,
    StreamTranslator,
    build_prompt,
    count_can_matter,
    error_output,
    plan_generation,
    prompt_tokens_bound,
    request_images,
    translate_reply,
)

if TYPE_CHECKING:
    from adapter.runtime import Runtime

__all__ = ["Prepared", "Relay", "frame"]

log = logging.getLogger("fastchat_adapter.relay")

DRAIN_TIMEOUT: Final = 2.0
"""Seconds the rest of an upstream body may take after the frame that ended the stream."""


def frame(output: ModelOutput) -> bytes:
    return output.to_frame()


@dataclass(frozen=True)
class Prepared:
    route: Route
    plan: GenerationPlan


class Relay:
    """One ``PromptRequest`` on its way to a FastChat worker and back."""

    def __init__(self, runtime: Runtime, request: PromptRequest, tracker: Tracker) -> None:
        self.runtime = runtime
        self.request = request
        self.tracker = tracker

    # --- preparation (both routes) ------------------------------------------------------
    async def prepare(self) -> Prepared:
        """Everything before the generate call; raises ``RequestFailed``."""
        runtime, request = self.runtime, self.request
        try:
            route = await runtime.pool.resolve(request.model, "llm")
        except NoWorker as exc:
            raise RequestFailed(error_output(exc.error_code, str(exc)), "rejected") from exc
        except UpstreamError as exc:  # the FastChat controller we dispatch through
            raise await self._upstream_failure(exc) from exc
        settings = runtime.settings
        numbering = None if settings.sep_style_numbering == "auto" else settings.sep_style_numbering
        try:
            info = await runtime.pool.model_info(route)
            images = self._images_for(route)
            prompt = build_prompt(request, info.conv, numbering=numbering, with_images=bool(images))
            if settings.always_count_tokens or count_can_matter(
                request, prompt, info.context_length
            ):
                tokens = await runtime.client.count_token(route.worker, route.model, prompt)
            else:
                # The bound leaves the clamp as it is (min(requested, budget) == requested), so
                # the plan is the one an exact count gives, one upstream round trip sooner.
                tokens = prompt_tokens_bound(prompt)
            plan = plan_generation(
                request,
                model=route.model,
                prompt=prompt,
                template=info.conv,
                context_length=info.context_length,
                prompt_tokens=tokens,
                default_temperature=settings.default_temperature,
                reasoning=settings.reasoning,
                images=images,
            )
        except UpstreamError as exc:
            raise await self._upstream_failure(exc) from exc
        except (InvalidRequest, ContextOverflow) as exc:
            raise RequestFailed(error_output(exc.error_code, str(exc)), "rejected") from exc
        except ProtocolError as exc:  # the worker's template cannot be rendered
            detail = f"its conversation template cannot be used: {exc}"
            raise await self._upstream_failure(
                UpstreamError(route.worker, "malformed", detail)
            ) from exc
        return Prepared(route, plan)

    def _images_for(self, route: Route) -> list[str]:
        """The request's images when the worker takes them; otherwise none, and the drop is
        said once for the request (a warning and ``images_dropped``)."""
        images = request_images(self.request)
        if not images or self.runtime.pool.takes_images(route):
            return images
        self.runtime.metrics.images_dropped.labels(self.tracker.model).inc(len(images))
        log.warning(
            "%d image(s) dropped: %s is not known to take images (--multimodal-models)",
            len(images),
            route.model,
        )
        return []

    async def _upstream_failure(self, exc: UpstreamError) -> RequestFailed:
        """Count, log and report a worker failure; the ``RequestFailed`` that answers it."""
        metrics = self.runtime.metrics
        metrics.upstream_errors.labels(exc.worker, self.tracker.model, exc.reason).inc()
        log.warning("%s", exc)
        await self.runtime.pool.report_failure(exc.worker, exc)
        return RequestFailed(error_output(exc.error_code, str(exc)), "error")

    def _in_band_error(self, route: Route) -> None:
        metrics = self.runtime.metrics
        metrics.upstream_errors.labels(route.worker, self.tracker.model, "in_band").inc()

    # --- /generate_stream ---------------------------------------------------------------
    def _emit(self, downstream: Downstream, output: ModelOutput) -> None:
        """The stream's last frame (an error, or the closing frame ``finish`` owes)."""
        self.tracker.observe(output)  # usage, finish reason, error code
        downstream.write(frame(output), last=True)

    async def stream(self, downstream: Downstream) -> Outcome:
        """Produce every frame of the answer (see ``FrameStreamResponse``)."""
        try:
            return await self._stream(downstream)
        except Exception as exc:  # a bug of ours: still end the stream with one error frame
            log.exception("generate_stream failed inside the adapter")
            self._emit(downstream, _internal_error(exc))
            return "error"

    async def _stream(self, downstream: Downstream) -> Outcome:
        try:
            prepared = await self.prepare()
        except RequestFailed as failure:
            self._emit(downstream, failure.output)
            return failure.outcome
        route, plan = prepared.route, prepared.plan
        translator = StreamTranslator(echo_prompt=plan.echo_prompt, reasoning=plan.reasoning)
        encoder = FrameEncoder()  # escapes only what is new of the cumulative text
        tracker = self.tracker
        outcome: Outcome = "ok"

        def relay(batch: list[dict[str, Any]]) -> bool:
            """The chunks of one upstream read downstream, in one write (same bytes); runs in
            the read's own callback. True once the stream has ended."""
            nonlocal outcome
            frames: list[bytes] = []
            failed = False  # the last frame is an error (it ends the stream)
            for chunk in batch:
                data = translator.frame(chunk, encoder)  # the common chunk: no ModelOutput
                if data is not None:
                    if (usage := chunk.get("usage")) is not None:
                        tracker.observe_usage(usage["prompt_tokens"], usage["completion_tokens"])
                else:
                    output = _translate(translator, chunk, route)
                    if output is None:  # after the end: dropped
                        break
                    tracker.observe(output)  # usage, finish reason, error code
                    if output.error_code:
                        self._in_band_error(route)
                        outcome, failed = "error", True
                    data = encoder.encode(output)
                frames.append(data)
                if translator.ended:
                    break
            if not frames:
                return translator.ended
            if downstream.lagging:  # only the newest: it carries the whole text so far
                del frames[:-1]
            relayed = len(frames) - failed
            superseded = downstream.write(b"".join(frames), relayed, last=translator.ended)
            tracker.frame_relayed(relayed - superseded)
            return translator.ended

        try:
            async with self.runtime.client.generate_stream(route.worker, plan.params) as chunks:
                await chunks.run(relay, drain_timeout=DRAIN_TIMEOUT)
        except UpstreamError as exc:
            if translator.ended:
                return outcome
            broken = await self._upstream_failure(exc)
            self._emit(downstream, broken.output)
            return "error"
        final = translator.finish()
        if final is None:
            return outcome
        if final.error_code:  # a clean body without a single chunk
            empty = UpstreamError(route.worker, "broken_stream", "the stream had no chunk")
            broken = await self._upstream_failure(empty)
            self._emit(downstream, broken.output)
            return "error"
        tracker.frame_relayed()
        self._emit(downstream, final)
        return "ok"

    # --- /generate ----------------------------------------------------------------------
    async def generate(self) -> tuple[ModelOutput, Outcome]:
        """The one ``ModelOutput`` of a non-stream generation, and the outcome."""
        try:
            prepared = await self.prepare()
            route, plan = prepared.route, prepared.plan
            try:
                reply = await self.runtime.client.generate(route.worker, plan.params)
                output = _translate_reply(reply, plan, route)
            except UpstreamError as exc:
                raise await self._upstream_failure(exc) from exc
        except RequestFailed as failure:
            self.tracker.observe(failure.output)
            return failure.output, failure.outcome
        except Exception as exc:  # a bug of ours: still answer with a ModelOutput
            log.exception("generate failed inside the adapter")
            self.tracker.observe(internal := _internal_error(exc))
            return internal, "error"
        self.tracker.observe(output)
        if output.error_code:
            self._in_band_error(route)
            return output, "error"
        return output, "ok"


def _translate(
    translator: StreamTranslator, chunk: dict[str, Any], route: Route
) -> ModelOutput | None:
    try:
        return translator.translate(chunk)
    except ProtocolError as exc:
        raise UpstreamError(route.worker, "malformed", f"chunk: {exc}") from exc


def _translate_reply(reply: dict[str, Any], plan: GenerationPlan, route: Route) -> ModelOutput:
    try:
        return translate_reply(reply, echo_prompt=plan.echo_prompt, reasoning=plan.reasoning)
    except ProtocolError as exc:
        raise UpstreamError(route.worker, "malformed", f"reply: {exc}") from exc


def _internal_error(exc: Exception) -> ModelOutput:
    message = f"fastchat-adapter internal error: {type(exc).__name__}: {exc}"
    return error_output(ErrorCode.INTERNAL_ERROR, message)
