"""The real peers as process groups: FastChat (controller, workers, openai_api_server) and a
DB-GPT model cluster (controller + apiserver). Start orders, flags and readiness routes follow
shared/PEERS.md §2.3 and §3.4; every process binds 127.0.0.1 on a port picked at start.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.interop.peers import EMBED_MODEL_NAME, TINY_LLM, Models, PeerEnv
from tests.interop.procs import (
    LOOPBACK,
    Command,
    Proc,
    ProcError,
    RunDir,
    get_ok,
    post_ok,
    start_parallel,
)

WORKER_READY_S = 60.0
SERVER_READY_S = 30.0


# --- FastChat ---------------------------------------------------------------------------------


class FastChatWorker(Proc):
    """A `fastchat.serve.model_worker` process serving one model under `model_name`."""

    def __init__(
        self,
        run: RunDir,
        name: str,
        *,
        python: Path,
        model_path: Path,
        model_name: str,
        controller_url: str | None,
        port: int | None = None,
        limit_worker_concurrency: int | None = None,
        conv_template: str | None = None,
        seed: int | None = None,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.model_name = model_name
        self.model_path = model_path
        self.controller_url = controller_url

        def command(p: int) -> list[str]:
            argv = [
                str(python), "-m", "fastchat.serve.model_worker",
                "--host", LOOPBACK, "--port", str(p),
                "--worker-address", f"http://{LOOPBACK}:{p}",
                "--model-path", str(model_path), "--model-names", model_name,
                "--device", "cpu",
            ]  # fmt: skip
            if controller_url is None:
                argv.append("--no-register")
            else:
                argv += ["--controller-address", controller_url]
            if limit_worker_concurrency is not None:
                argv += ["--limit-worker-concurrency", str(limit_worker_concurrency)]
            if conv_template is not None:
                argv += ["--conv-template", conv_template]
            if seed is not None:
                argv += ["--seed", str(seed)]
            return [*argv, *extra_args]

        super().__init__(
            run,
            name,
            command,
            post_ok("/worker_get_status", {"model": model_name}),
            port=port,
            env=env,
            ready_timeout=WORKER_READY_S,
        )

    @property
    def registered(self) -> bool:
        return self.controller_url is not None


@dataclass
class FastChatStack:
    """Controller, tiny-vicuna worker, embedding worker and openai_api_server."""

    controller: Proc
    worker: FastChatWorker
    embed_worker: FastChatWorker
    openai: Proc
    model: str = TINY_LLM
    embed_model: str = EMBED_MODEL_NAME

    @property
    def controller_url(self) -> str:
        return self.controller.url

    @property
    def worker_url(self) -> str:
        return self.worker.url

    @property
    def embed_worker_url(self) -> str:
        return self.embed_worker.url

    @property
    def openai_url(self) -> str:
        """Base URL of openai_api_server; routes are under /v1."""
        return self.openai.url

    @property
    def procs(self) -> list[Proc]:
        return [self.controller, self.worker, self.embed_worker, self.openai]

    @property
    def pids(self) -> dict[str, int | None]:
        return {p.name: p.pid for p in self.procs}

    def restart_controller(self) -> None:
        """Restart FastChat's controller on its port and register the live workers again at
        once (on their own they would re-register only at their next heartbeat, ~45 s)."""
        self.controller.restart(same_port=True)
        self.register_workers()

    def register_workers(self) -> None:
        import httpx

        with httpx.Client(timeout=10, trust_env=False) as client:
            for worker in (self.worker, self.embed_worker):
                if worker.alive:
                    body = {"worker_name": worker.url, "check_heart_beat": True}
                    client.post(self.controller.url + "/register_worker", json=body)

    def revive(self) -> None:
        """Start again, on their ports, whatever a previous test killed or stopped."""
        controller_was_down = not self.controller.alive
        if controller_was_down:
            self.controller.start(same_port=True)
        dead = [p for p in (self.worker, self.embed_worker, self.openai) if not p.alive]
        if dead:
            start_parallel(dead, same_port=True)
        if controller_was_down:
            self.register_workers()

    def restart_openai(self) -> None:
        """openai_api_server caches template errors for its lifetime (PEERS.md §3.7 item 2)."""
        self.openai.restart(same_port=True)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def start_fastchat_stack(
    run: RunDir, fastchat: PeerEnv, models: Models, prefix: str = "fc"
) -> FastChatStack:
    fc_python = str(fastchat.python)
    controller = Proc(
        run,
        f"{prefix}-controller",
        _fastchat_server(fc_python, "fastchat.serve.controller"),
        get_ok("/test_connection"),
        ready_timeout=SERVER_READY_S,
    )
    controller.start()
    worker = FastChatWorker(
        run, f"{prefix}-worker", python=fastchat.python,
        model_path=models.tiny_llm, model_name=TINY_LLM, controller_url=controller.url,
    )  # fmt: skip
    embed_worker = FastChatWorker(
        run, f"{prefix}-embed-worker", python=fastchat.python,
        model_path=models.embedding, model_name=EMBED_MODEL_NAME,
        controller_url=controller.url,
    )  # fmt: skip
    openai = Proc(
        run,
        f"{prefix}-openai",
        _fastchat_server(
            fc_python, "fastchat.serve.openai_api_server", "--controller-address", controller.url
        ),
        get_ok("/v1/models"),
        ready_timeout=SERVER_READY_S,
    )
    stack = FastChatStack(controller, worker, embed_worker, openai)
    try:
        start_parallel([worker, embed_worker, openai])
        if worker.starts > 1 or embed_worker.starts > 1:
            # A worker registers before binding; a retried start leaves a dead address behind.
            _refresh_fastchat_controller(controller.url)
    except BaseException:
        stack.stop()
        raise
    return stack


def _fastchat_server(python: str, module: str, *args: str) -> Command:
    return lambda port: [python, "-m", module, "--host", LOOPBACK, "--port", str(port), *args]


def _refresh_fastchat_controller(url: str) -> None:
    import httpx

    with httpx.Client(timeout=10, trust_env=False) as client:
        client.post(url + "/refresh_all_workers").raise_for_status()


# --- DB-GPT -----------------------------------------------------------------------------------


@dataclass
class DbgptCluster:
    """DB-GPT 0.8.2 model controller + OpenAI-compatible apiserver from one TOML in $RUN.

    `controller` is None in standalone mode, where the apiserver's `controller_addr` points
    elsewhere (at the adapter).
    """

    run: RunDir
    env: PeerEnv  # the DB-GPT venv
    name: str
    config_path: Path
    home: Path
    controller: Proc | None
    apiserver: Proc
    heartbeat_interval_secs: int
    heartbeat_timeout_secs: int
    external_controller_url: str | None = None
    extra_procs: list[Proc] = field(default_factory=list)

    @property
    def controller_url(self) -> str:
        if self.controller is None:
            assert self.external_controller_url is not None
            return self.external_controller_url
        return self.controller.url

    @property
    def api_url(self) -> str:
        """Base URL of the apiserver; routes are under /api/v1."""
        return self.apiserver.url

    @property
    def procs(self) -> list[Proc]:
        return [p for p in (self.controller, self.apiserver) if p is not None]

    @property
    def pids(self) -> dict[str, int | None]:
        return {p.name: p.pid for p in self.procs}

    def write_config(self) -> None:
        """(Re)write the TOML from the current ports. Both processes read the same file."""
        lines = []
        if self.controller is not None:
            lines += [
                "[service.model.controller]",
                f'host = "{LOOPBACK}"',
                f"port = {self.controller.port}",
                f"heartbeat_interval_secs = {self.heartbeat_interval_secs}",
                f"heartbeat_timeout_secs = {self.heartbeat_timeout_secs}",
                "",
            ]
        lines += [
            "[service.model.api]",
            f'host = "{LOOPBACK}"',
            f"port = {self.apiserver.port}",
            f'controller_addr = "{self.controller_url}"',
            "",
        ]
        self.config_path.write_text("\n".join(lines))

    def stop_controller(self) -> None:
        assert self.controller is not None, "standalone cluster has no controller"
        self.controller.stop()

    def start_controller(self) -> None:
        """Start the controller again on its port (a restart forgets every registration)."""
        assert self.controller is not None, "standalone cluster has no controller"
        self.controller.start(same_port=True)

    def restart_controller(self) -> None:
        self.stop_controller()
        self.start_controller()

    def kill_controller(self) -> None:
        assert self.controller is not None, "standalone cluster has no controller"
        self.controller.kill()

    def dbgpt(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run the `dbgpt` CLI of the DB-GPT venv (cwd and env of this run)."""
        return subprocess.run(
            [str(self.env.bin("dbgpt")), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.run.env(DBGPT_HOME=str(self.home)),
            cwd=self.run.path,
            stdin=subprocess.DEVNULL,
            check=False,
        )

    def model_list(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`dbgpt model --address <controller> list [args]` (PEERS.md §2.6)."""
        return self.dbgpt("model", "--address", self.controller_url, "list", *args)

    def revive(self) -> None:
        """Start again, on their ports, whatever a previous test killed or stopped."""
        for proc in self.procs:
            if not proc.alive:
                proc.start(same_port=True)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def start_dbgpt_cluster(
    run: RunDir,
    dbgpt_env: PeerEnv,
    name: str = "dbgpt",
    *,
    controller_addr: str | None = None,
    heartbeat_interval_secs: int = 5,
    heartbeat_timeout_secs: int = 15,
) -> DbgptCluster:
    """Start a controller, then an apiserver. With `controller_addr`, start only an apiserver
    pointed at that address (standalone mode, PEERS.md §5 item 10)."""
    home = run.path / f"{name}-home"
    home.mkdir(exist_ok=True)
    env = run.env(DBGPT_HOME=str(home))
    dbgpt_bin = str(dbgpt_env.bin("dbgpt"))
    config = run.path / f"{name}.toml"
    holder: list[DbgptCluster] = []

    def command(kind: str) -> Command:
        def build(port: int) -> list[str]:
            cluster = holder[0]
            proc = cluster.apiserver if kind == "apiserver" else cluster.controller
            assert proc is not None
            proc.port = port
            cluster.write_config()
            return [dbgpt_bin, "start", kind, "-c", str(config)]

        return build

    controller = None
    if controller_addr is None:
        controller = Proc(
            run, f"{name}-controller", command("controller"),
            get_ok("/api/health"), env=env, ready_timeout=SERVER_READY_S,
        )  # fmt: skip
    apiserver = Proc(
        run, f"{name}-apiserver", command("apiserver"),
        get_ok("/api/v1/models"), env=env, ready_timeout=SERVER_READY_S,
    )  # fmt: skip
    cluster = DbgptCluster(
        run=run,
        env=dbgpt_env,
        name=name,
        config_path=config,
        home=home,
        controller=controller,
        apiserver=apiserver,
        heartbeat_interval_secs=heartbeat_interval_secs,
        heartbeat_timeout_secs=heartbeat_timeout_secs,
        external_controller_url=controller_addr,
    )
    holder.append(cluster)
    try:
        if controller is not None:
            controller.start()
        apiserver.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def stop_quietly(*procs: Proc | None) -> None:
    for proc in procs:
        if proc is not None:
            with contextlib.suppress(ProcError, OSError):
                proc.stop()
