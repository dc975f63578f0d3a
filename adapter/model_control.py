"""``dbgpt model start|stop|restart`` on the models the adapter serves (docs/protocol.md §8.8).

DB-GPT's CLI and web UI reach a model's lifecycle two ways: ``restart`` through
``/api/worker/apply`` on the model's own instance, ``start`` and ``stop`` through
``/api/worker/models/startup|shutdown`` on the ``WorkerManager@service`` entry
(``--register-service``). The FastChat worker process is not ours to start or stop, so each
command does the part that is the adapter's: its registration.

- ``stop``: deregister the model everywhere (marked unhealthy, as DB-GPT's own stop does; removed
  with ``delete_after``) and keep it out of registers and heartbeats;
- ``start``: register it again;
- ``restart``: both, and drop the cached conversation template and context length, so the next
  request reads them from the worker again.

Every reply says that the FastChat worker itself is untouched.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final

from adapter.pool import WorkerKind
from protocol.dbgpt import ParameterDescription, WorkerApplyOutput, WorkerType, worker_key

if TYPE_CHECKING:
    from adapter.runtime import Runtime

__all__ = ["UNTOUCHED", "apply_action", "parameter_descriptions"]

UNTOUCHED: Final = (
    "the FastChat worker itself is untouched: fastchat-adapter cannot start or stop it "
    "(do that in the FastChat deployment)"
)
RESTART_DELETE_WAIT: Final = 5.0  # seconds restart waits for each half to go out
# DB-GPT's CLI imports the module of ``param_class`` (a missing module is a crash) and, when the
# class is not there, builds one of this name from the descriptions: a module every Python has.
PARAM_CLASS: Final = "builtins.FastChatAdapterModelParameters"
_KINDS: Final[dict[str, WorkerKind]] = {"llm": "llm", "text2vec": "text2vec"}
_DONE: Final = {
    "stop": "stopped {key}: deregistered from the DB-GPT controllers",
    "start": "started {key}: registered with the DB-GPT controllers again",
    "restart": "restarted {key}: deregistered, cached template and context length dropped, "
    "registered again",
}


async def apply_action(
    runtime: Runtime, action: str, model: str, worker_type: str, *, remove: bool = False
) -> WorkerApplyOutput:
    """Carry out ``start``, ``stop`` or ``restart`` of ``model``; a failed output (never a raise)
    for another action, a worker type we do not serve, or a model no worker serves."""
    began = time.monotonic()
    kind = _KINDS.get(worker_type)
    what = f"{action} of {model}@{worker_type}"
    if action not in _DONE:
        return _failed(f"{what} is not supported: {UNTOUCHED}")
    if kind is None or not runtime.pool.knows(model, kind):
        return _failed(f"{what} failed: no FastChat worker of this adapter serves that model")
    key = worker_key(model, WorkerType(kind))
    registrar = runtime.registrar
    if action in ("stop", "restart"):
        registrar.stop_model(key, remove=remove)
    if action == "restart":
        runtime.pool.forget_model_info(model)
        await registrar.deletes_sent(key, RESTART_DELETE_WAIT)
    if action in ("start", "restart"):
        registrar.start_model(key)
    if action == "restart":  # the reply says it is registered again: let that be true
        await registrar.registers_sent(key, RESTART_DELETE_WAIT)
    message = f"{_DONE[action].format(key=key)}; {UNTOUCHED}"
    return WorkerApplyOutput(message=message, success=True, timecost=time.monotonic() - began)


def _failed(message: str) -> WorkerApplyOutput:
    return WorkerApplyOutput(message=message, success=False)


def parameter_descriptions(
    runtime: Runtime, model: str, kind: WorkerKind
) -> list[ParameterDescription]:
    """What ``dbgpt model start --help`` shows for ``model``: the one parameter that is true of
    it here, the FastChat worker(s) serving it. Empty for a model no live worker serves."""
    workers = runtime.pool.served(kind).get(model, [])
    if not workers:
        return []
    urls = ",".join(sorted(worker.url for worker in workers))
    return [
        ParameterDescription(
            param_class=PARAM_CLASS,
            param_name="fastchat_worker_address",
            param_type="str",
            default_value=urls,
            description="FastChat worker (or FastChat controller) URL(s) serving this model "
            "through fastchat-adapter. Read-only: start, stop and restart change only the "
            "model's DB-GPT registration; " + UNTOUCHED + ".",
            required=False,
        )
    ]
