"""DB-GPT's app on FastChat workers through the adapter, as processes (the e2e topology).

    tiny-vicuna worker  <- recording proxy --+
    reference worker    <- recording proxy --+-- adapter (standalone) <-- DB-GPT webserver + UI
    embedding worker    <- recording proxy --+   (controller API too)     (controller_addr)

The FastChat workers are the interop suite's shared ones (tests/interop/stacks.py). The
reference worker answers by docs/examples/scripted-replies.toml (Chat-DB SQL, a think block).
Every request a worker receives, and its whole answer, is kept by the proxy in front of it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from tests.interop.peers import PeerEnv
from tests.interop.procs import Proc, RunDir, get_ok
from tests.interop.recording_proxy import RecordingProxy
from tests.interop.stacks import (
    AdapterProc,
    FastChatStack,
    ReferenceWorkerProc,
    dbgpt_argv,
    dbgpt_webserver_toml,
)

REPO_ROOT = Path(__file__).resolve().parents[3]
SCRIPTED_REPLIES = REPO_ROOT / "docs" / "examples" / "scripted-replies.toml"
REFERENCE_MODEL = "reference-scripted"
# Hang guards, not speed expectations: the app imports for ~50 s on an idle 2-core machine.
APP_READY_S = 600.0
ADAPTER_PROGRAM = Path(sys.executable).with_name("fastchat-adapter")


class DbgptWebserver(Proc):
    """`dbgpt start webserver` of the dbgpt-app venv, its TOML and $DBGPT_HOME in the run."""

    def __init__(
        self,
        run: RunDir,
        name: str,
        env: PeerEnv,
        *,
        controller_addr: str,
        default_llm: str,
        default_embedding: str,
    ) -> None:
        self.home = run.path / f"{name}-home"
        self.home.mkdir(exist_ok=True)
        self.config_path = run.path / f"{name}.toml"

        def command(port: int) -> list[str]:
            self.config_path.write_text(
                dbgpt_webserver_toml(
                    port=port,
                    controller_addr=controller_addr,
                    home=str(self.home),
                    default_llm=default_llm,
                    default_embedding=default_embedding,
                )
            )
            return dbgpt_argv(str(env.bin("dbgpt")), "webserver", str(self.config_path))

        super().__init__(
            run,
            name,
            command,
            get_ok("/api/v1/model/types"),  # answers once the app has started
            env=run.env(DBGPT_HOME=str(self.home), ANONYMIZED_TELEMETRY="False"),
            ready_timeout=APP_READY_S,
        )

    def log_count(self, text: str) -> int:
        """How many lines of its log (this start) contain `text`."""
        return sum(text in line for line in self.tail(1_000_000).splitlines())


def reference_worker(run: RunDir, name: str) -> ReferenceWorkerProc:
    """The reference worker answering by the scripted replies file."""
    return ReferenceWorkerProc(
        run, name, program=ADAPTER_PROGRAM, model_name=REFERENCE_MODEL,
        replies_file=str(SCRIPTED_REPLIES),
    )  # fmt: skip


@dataclass
class AppStack:
    fastchat: FastChatStack
    reference: ReferenceWorkerProc
    llm_proxy: RecordingProxy  # in front of tiny-vicuna
    reference_proxy: RecordingProxy
    embed_proxy: RecordingProxy
    adapter: AdapterProc
    app: DbgptWebserver

    @property
    def url(self) -> str:
        return self.app.url

    @property
    def proxies(self) -> list[RecordingProxy]:
        return [self.llm_proxy, self.reference_proxy, self.embed_proxy]

    def stop(self) -> None:
        for proc in (self.app, self.adapter, self.reference):
            proc.stop()
        for proxy in self.proxies:
            proxy.stop()


def start_app_stack(run: RunDir, fastchat: FastChatStack, app_env: PeerEnv) -> AppStack:
    """Start everything above the FastChat stack; stop what was started if a step fails."""
    started: list[Proc | RecordingProxy] = []
    try:
        reference = reference_worker(run, "e2e-reference-worker")
        started.append(reference.start())
        proxies = []
        for url in (fastchat.worker_url, reference.url, fastchat.embed_worker_url):
            proxies.append(RecordingProxy(url).start())
            started.append(proxies[-1])
        llm_proxy, reference_proxy, embed_proxy = proxies
        adapter = AdapterProc(
            run,
            "e2e-adapter",
            program=ADAPTER_PROGRAM,
            worker_addresses=[llm_proxy.url, reference_proxy.url],
            embedding_worker_addresses=[embed_proxy.url],
        )
        started.append(adapter.start())
        app = DbgptWebserver(
            run,
            "e2e-dbgpt-app",
            app_env,
            controller_addr=adapter.url,
            default_llm=fastchat.model,
            default_embedding=fastchat.embed_model,
        )
        started.append(app.start())
    except BaseException:
        for thing in reversed(started):
            thing.stop()
        raise
    return AppStack(fastchat, reference, llm_proxy, reference_proxy, embed_proxy, adapter, app)
