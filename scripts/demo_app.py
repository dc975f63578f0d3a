"""`make demo-app`: DB-GPT's own app (web UI, knowledge base, Chat-DB) on a FastChat worker.

1. builds (first time: ~1.4 GB, a few minutes) or reuses DB-GPT 0.8.2's app venv, the one the
   e2e suite uses (tests/interop/peers.py, `.peers/dbgpt-app-<key>/`), showing pip's progress;
2. starts a reference worker (a FastChat-protocol worker with the scripted replies of
   docs/examples/scripted-replies.toml), a second one for embeddings, and the adapter in
   standalone mode (it serves DB-GPT's controller API itself);
3. starts DB-GPT's webserver pointed at the adapter, showing its log while it starts (~1 min);
4. prints the URL to open, and runs until Ctrl-C; then stops everything it started (by pid).

Logs stay in run/<time>-<pid>/. Exits non-zero, with the tail of the failing log, if a step fails.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.interop import peers  # noqa: E402
from tests.interop.e2e.app_stack import (  # noqa: E402
    ADAPTER_PROGRAM,
    APP_READY_S,
    REFERENCE_MODEL,
    DbgptWebserver,
    reference_worker,
)
from tests.interop.procs import Proc, ProcError, RunDir, post_ok, tail_text  # noqa: E402
from tests.interop.stacks import AdapterProc  # noqa: E402

EMBEDDING_MODEL = "reference-embedding"
PROGRESS_EVERY_S = 5.0


def last_line(path: Path) -> str:
    lines = [line for line in tail_text(path, 5).splitlines() if line.strip()]
    return lines[-1][:110] if lines else ""


def with_progress(what: str, log: Callable[[], Path | None], work: Callable[[], object]) -> None:
    """Run `work` in a thread; every few seconds print the elapsed time and `log`'s last line."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            work()
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    started = time.monotonic()
    thread.start()
    while thread.is_alive():
        thread.join(PROGRESS_EVERY_S)
        if thread.is_alive():
            path = log()
            detail = last_line(path) if path is not None else ""
            print(f"  {what}: {time.monotonic() - started:4.0f} s  {detail}", flush=True)
    if errors:
        raise errors[0]
    print(f"  {what}: done in {time.monotonic() - started:.0f} s", flush=True)


def app_venv() -> peers.PeerEnv:
    spec = peers.DBGPT_APP
    key = peers.env_key(spec, peers.current_lock(spec))
    install_log = peers.PEERS_DIR / "logs" / f"{spec.name}-{key}.log"
    holder: list[peers.PeerEnv] = []
    with_progress(
        "DB-GPT app venv",
        lambda: install_log if install_log.exists() else None,
        lambda: holder.append(peers.ensure_env(spec)),
    )
    return holder[0]


def start_stack(run: RunDir, env: peers.PeerEnv) -> list[Proc]:
    started: list[Proc] = []
    worker = reference_worker(run, "reference-worker")
    started.append(worker.start())

    def embedder_command(port: int) -> list[str]:
        return [
            sys.executable, "-m", "adapter", "reference-worker", "--host", "127.0.0.1",
            "--port", str(port), "--model-names", EMBEDDING_MODEL, "--embedding-dim", "384",
        ]  # fmt: skip

    embedder = Proc(run, "embedding-worker", embedder_command, post_ok("/worker_get_status"))
    started.append(embedder.start())
    adapter = AdapterProc(
        run,
        "adapter",
        program=ADAPTER_PROGRAM,
        worker_addresses=[worker.url],
        embedding_worker_addresses=[embedder.url],
        heartbeat_interval=5.0,
        status_interval=2.0,
    )
    started.append(adapter.start())
    print(f"adapter ready at {adapter.url}: {REFERENCE_MODEL}@llm, {EMBEDDING_MODEL}@text2vec")
    app = DbgptWebserver(
        run,
        "dbgpt-app",
        env,
        controller_addr=adapter.url,
        default_llm=REFERENCE_MODEL,
        default_embedding=EMBEDDING_MODEL,
    )
    started.append(app.launch())
    with_progress("DB-GPT app start-up", lambda: app.log_path, lambda: app.wait_ready(APP_READY_S))
    return started


def main() -> int:
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    print("DB-GPT's app on a FastChat-protocol worker through fastchat-adapter")
    try:
        env = app_venv()
    except peers.PeerSetupError as exc:
        print(f"demo-app failed: {exc}", file=sys.stderr)
        return 1
    run = RunDir()
    try:
        procs = start_stack(run, env)
    except (ProcError, OSError) as exc:
        print(f"demo-app failed: {exc}", file=sys.stderr)
        run.stop_all()
        print(f"logs: {run.path}", file=sys.stderr)
        return 1
    app = procs[-1]
    print(
        f"\nOpen {app.url} in a browser (logs: {run.path}).\n"
        f"  Apps > Chat Normal > pick {REFERENCE_MODEL} > 'Say hello', or 'Tell me a riddle'\n"
        "  (scripted replies: docs/examples/scripted-replies.toml; other questions get stable\n"
        "  filler words). Knowledge base: embeddings come from the adapter's @text2vec model.\n"
        "Ctrl-C stops everything."
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # SIGINT too when started in the background
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        dead = [p.name for p in procs if not p.alive]
        if dead:
            print(f"demo-app: {', '.join(dead)} exited; stopping", file=sys.stderr)
            break
    run.stop_all()
    print("stopped the app, the adapter and the workers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
