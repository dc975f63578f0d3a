"""The real peers as process groups: FastChat (controller, workers, openai_api_server) and a
DB-GPT model cluster (controller + apiserver). Start orders, flags and readiness routes follow
docs/peers.md §2.3 and §3.4; every process binds 127.0.0.1 on a port picked at start.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


# --- command lines ----------------------------------------------------------------------------
# The argument lists of every program the suite runs, in one place: the fixtures build their
# commands here, and tests/adapter/test_compose.py holds compose.yaml's commands to the same
# flags (`interop_commands`).


def fastchat_controller_argv(python: str, *, port: int | str, host: str = LOOPBACK) -> list[str]:
    return [python, "-m", "fastchat.serve.controller", "--host", host, "--port", str(port)]


def fastchat_openai_argv(
    python: str, *, port: int | str, controller_url: str, host: str = LOOPBACK
) -> list[str]:
    return [
        python, "-m", "fastchat.serve.openai_api_server", "--host", host, "--port", str(port),
        "--controller-address", controller_url,
    ]  # fmt: skip


def fastchat_worker_argv(
    python: str,
    *,
    port: int | str,
    worker_address: str,
    model_path: str,
    model_name: str,
    controller_url: str | None,
    host: str = LOOPBACK,
    limit_worker_concurrency: int | None = None,
    conv_template: str | None = None,
    seed: int | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    argv = [
        python, "-m", "fastchat.serve.model_worker",
        "--host", host, "--port", str(port),
        "--worker-address", worker_address,
        "--model-path", model_path, "--model-names", model_name,
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


def dbgpt_argv(dbgpt: str, kind: str, config: str) -> list[str]:
    """`kind`: controller or apiserver, which read one TOML (docs/peers.md §2.2, §2.3), or webserver
    (DB-GPT's app, `dbgpt_webserver_toml`). `config` must be absolute for the webserver: a
    relative path is looked up under $DBGPT_HOME/workspace."""
    return [dbgpt, "start", kind, "-c", config]


def dbgpt_toml(
    *,
    controller_port: int | None,
    heartbeat_interval_secs: int,
    heartbeat_timeout_secs: int,
    api_port: int,
    controller_addr: str,
    host: str = LOOPBACK,
    registry: Mapping[str, object] | None = None,
) -> str:
    """The TOML both DB-GPT processes read (docs/peers.md §2.2). No `controller_port`: only the
    apiserver's table (standalone mode, `controller_addr` pointing at the adapter). `registry`:
    the controller's registry database (`type` sqlite or mysql and its keys), for HA."""
    lines = []
    if controller_port is not None:
        lines += [
            "[service.model.controller]",
            f'host = "{host}"',
            f"port = {controller_port}",
            f"heartbeat_interval_secs = {heartbeat_interval_secs}",
            f"heartbeat_timeout_secs = {heartbeat_timeout_secs}",
            "",
        ]
        if registry is not None:
            lines.append("[service.model.controller.registry.database]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in registry.items()]
            lines.append("")
    lines += [
        "[service.model.api]",
        f'host = "{host}"',
        f"port = {api_port}",
        f'controller_addr = "{controller_addr}"',
        "",
    ]
    return "\n".join(lines)


def dbgpt_webserver_toml(
    *,
    port: int | str,
    controller_addr: str,
    home: str,
    default_llm: str,
    default_embedding: str,
    host: str = LOOPBACK,
) -> str:
    """DB-GPT's app (webserver + web UI) on a model cluster it does not run itself: `light`
    (no local model workers), models from `controller_addr` (a DB-GPT controller, or the adapter
    in standalone mode), embeddings from the cluster too (`remote_embedding`, the adapter's
    `<name>@text2vec`). Its metadata lives in SQLite under `home`: the database must be at
    `<pilot>/meta_data/dbgpt.db`, where the app provisions its alembic scripts."""
    return "\n".join(
        [
            "[system]",
            'language = "en"',
            "",
            "[service.web]",
            f'host = "{host}"',
            f"port = {port}",
            "light = true",
            f'controller_addr = "{controller_addr}"',
            "remote_embedding = true",
            "",
            "[service.web.database]",
            'type = "sqlite"',
            f'path = "{home}/pilot/meta_data/dbgpt.db"',
            "",
            "[rag.storage.vector]",
            'type = "chroma"',
            f'persist_path = "{home}/pilot/data"',
            "",
            "[models]",
            f'default_llm = "{default_llm}"',
            f'default_embedding = "{default_embedding}"',
            "",
        ]
    )


# DB-GPT controllers in the suite: shortened from 20/60 s (docs/peers.md §2.5).
DBGPT_HEARTBEAT_INTERVAL_S = 5
DBGPT_HEARTBEAT_TIMEOUT_S = 15
# Timing of the adapter in the suite: the DB-GPT controllers' timeout (15 s) is many
# heartbeats, and worker deaths are seen within half a second.
ADAPTER_HEARTBEAT_INTERVAL_S = 1.0
ADAPTER_STATUS_INTERVAL_S = 0.5


def adapter_argv(
    program: str,
    *,
    port: int | str,
    worker_addresses: Sequence[str] = (),
    embedding_worker_addresses: Sequence[str] = (),
    controller_addresses: Sequence[str] = (),
    host: str = LOOPBACK,
    register_host: str | None = None,
    heartbeat_interval: float = ADAPTER_HEARTBEAT_INTERVAL_S,
    status_interval: float = ADAPTER_STATUS_INTERVAL_S,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """`fastchat-adapter serve`; no controller address means standalone mode."""
    argv = [program, "serve", "--host", host, "--port", str(port)]
    argv += ["--register-host", register_host or host]
    if worker_addresses:
        argv += ["--worker-address", ",".join(worker_addresses)]
    if embedding_worker_addresses:
        argv += ["--embedding-worker-address", ",".join(embedding_worker_addresses)]
    if controller_addresses:
        argv += ["--controller-address", ",".join(controller_addresses)]
    argv += ["--heartbeat-interval", f"{heartbeat_interval:g}"]
    argv += ["--status-interval", f"{status_interval:g}"]
    return [*argv, *extra_args]


def interop_commands() -> dict[str, list[str]]:
    """The standard topology's commands (docs/peers.md §5), keyed by compose.yaml's service names,
    with placeholder values: programs by their bare names (`python`, `dbgpt`,
    `fastchat-adapter`), `<...>` for hosts, ports, URLs and paths."""
    fastchat_controller = "http://<fastchat-controller>:<port>"
    return {
        "fastchat-controller": fastchat_controller_argv("python", host="<host>", port="<port>"),
        "fastchat-model-worker": fastchat_worker_argv(
            "python", host="<host>", port="<port>", worker_address="http://<worker>:<port>",
            model_path="<model-dir>/tiny-vicuna", model_name=TINY_LLM,
            controller_url=fastchat_controller,
        ),
        "fastchat-embedding-worker": fastchat_worker_argv(
            "python", host="<host>", port="<port>", worker_address="http://<worker>:<port>",
            model_path="<model-dir>/e5-all-MiniLM-L6-v2", model_name=EMBED_MODEL_NAME,
            controller_url=fastchat_controller,
        ),
        "fastchat-openai-api-server": fastchat_openai_argv(
            "python", host="<host>", port="<port>", controller_url=fastchat_controller
        ),
        "adapter": adapter_argv(
            "fastchat-adapter", host="<host>", port="<port>", register_host="<host>",
            worker_addresses=["http://<worker>:<port>"],
            embedding_worker_addresses=["http://<embedding-worker>:<port>"],
            controller_addresses=["http://<dbgpt-controller>:<port>"],
        ),
        "dbgpt-controller": dbgpt_argv("dbgpt", "controller", "<config.toml>"),
        "dbgpt-apiserver": dbgpt_argv("dbgpt", "apiserver", "<config.toml>"),
        "dbgpt-webserver": dbgpt_argv("dbgpt", "webserver", "<config.toml>"),
    }  # fmt: skip


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
        worker_address: str | None = None,
    ) -> None:
        """`worker_address`: what it registers as (default: its own URL); e.g. a recording
        proxy in front of it (docs/peers.md §4)."""
        self.model_name = model_name
        self.model_path = model_path
        self.controller_url = controller_url

        def command(p: int) -> list[str]:
            return fastchat_worker_argv(
                str(python),
                port=p,
                worker_address=worker_address or f"http://{LOOPBACK}:{p}",
                model_path=str(model_path),
                model_name=model_name,
                controller_url=controller_url,
                limit_worker_concurrency=limit_worker_concurrency,
                conv_template=conv_template,
                seed=seed,
                extra_args=extra_args,
            )

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
        """openai_api_server caches template errors for its lifetime (docs/peers.md §3.7 item 2)."""
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
        lambda port: fastchat_controller_argv(fc_python, port=port),
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
        lambda port: fastchat_openai_argv(fc_python, port=port, controller_url=controller.url),
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


def _refresh_fastchat_controller(url: str) -> None:
    import httpx

    with httpx.Client(timeout=10, trust_env=False) as client:
        client.post(url + "/refresh_all_workers").raise_for_status()


# --- DB-GPT -----------------------------------------------------------------------------------


@dataclass
class DbgptCluster:
    """DB-GPT model controller + OpenAI-compatible apiserver from one TOML in $RUN (0.8.2, or
    0.7.5 from its own venv for that leg).

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
    registry: Mapping[str, object] | None = None  # a registry database (HA); None: in memory

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
        self.config_path.write_text(
            dbgpt_toml(
                controller_port=None if self.controller is None else self.controller.port,
                heartbeat_interval_secs=self.heartbeat_interval_secs,
                heartbeat_timeout_secs=self.heartbeat_timeout_secs,
                api_port=self.apiserver.port,
                controller_addr=self.controller_url,
                registry=self.registry,
            )
        )

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
        """`dbgpt model --address <controller> list [args]` (docs/peers.md §2.6)."""
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
    heartbeat_interval_secs: int = DBGPT_HEARTBEAT_INTERVAL_S,
    heartbeat_timeout_secs: int = DBGPT_HEARTBEAT_TIMEOUT_S,
    registry: Mapping[str, object] | None = None,
) -> DbgptCluster:
    """Start a controller, then an apiserver. With `controller_addr`, start only an apiserver
    pointed at that address (standalone mode, docs/peers.md §5 item 10). `registry`: the
    controller's registry database (see `dbgpt_toml`)."""
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
            return dbgpt_argv(dbgpt_bin, kind, str(config))

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
        registry=registry,
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


# --- the adapter ------------------------------------------------------------------------------

ADAPTER_READY_S = 30.0


class AdapterProc(Proc):
    """`fastchat-adapter serve` (the real console script) on a free loopback port.

    Ready when `GET /readyz` answers 200: a worker answers and everything it serves is
    registered with every controller (at once in standalone mode). `launched_at` (monotonic)
    is when the process was spawned, for latency measurements.
    """

    def __init__(
        self,
        run: RunDir,
        name: str,
        *,
        program: Path,
        worker_addresses: Sequence[str] = (),
        embedding_worker_addresses: Sequence[str] = (),
        controller_addresses: Sequence[str] = (),
        heartbeat_interval: float = ADAPTER_HEARTBEAT_INTERVAL_S,
        status_interval: float = ADAPTER_STATUS_INTERVAL_S,
        extra_args: Sequence[str] = (),
        ready_timeout: float = ADAPTER_READY_S,
    ) -> None:
        self.controller_addresses = list(controller_addresses)
        self.heartbeat_interval = heartbeat_interval
        self.status_interval = status_interval

        def command(port: int) -> list[str]:
            return adapter_argv(
                str(program),
                port=port,
                worker_addresses=worker_addresses,
                embedding_worker_addresses=embedding_worker_addresses,
                controller_addresses=controller_addresses,
                heartbeat_interval=heartbeat_interval,
                status_interval=status_interval,
                extra_args=extra_args,
            )

        super().__init__(run, name, command, get_ok("/readyz"), ready_timeout=ready_timeout)

    @property
    def standalone(self) -> bool:
        return not self.controller_addresses

    @property
    def host_port(self) -> tuple[str, int]:
        """What it registers as (--register-host is the bind host)."""
        return LOOPBACK, self.port

    def metrics_text(self, timeout: float = 5.0) -> str:
        import httpx

        with httpx.Client(timeout=timeout, trust_env=False) as http:
            reply = http.get(self.url + "/metrics")
            reply.raise_for_status()
            return reply.text


# --- the reference worker (scripted answers) --------------------------------------------------


def reference_worker_argv(
    program: str,
    *,
    port: int | str,
    model_name: str,
    script: Sequence[str] = (),
    eos_after: int | None = None,
    conv_template_file: str | None = None,
    replies_file: str | None = None,
    host: str = LOOPBACK,
) -> list[str]:
    """`fastchat-adapter reference-worker`: with a `script`, every reply is that script in
    order (`--in-order`), so a test knows the worker's exact answer; with a `replies_file`,
    prompts that match one of its patterns get that reply (`--replies`)."""
    argv = [program, "reference-worker", "--host", host, "--port", str(port)]
    argv += ["--model-names", model_name]
    if script:
        argv += ["--script", " ".join(script), "--in-order"]
    if replies_file is not None:
        argv += ["--replies", replies_file]
    if eos_after is not None:
        argv += ["--eos-after", str(eos_after)]
    if conv_template_file is not None:
        argv += ["--conv-template-file", conv_template_file]
    return argv


class ReferenceWorkerProc(Proc):
    """The project's reference FastChat-protocol worker as a process, one model name."""

    def __init__(
        self, run: RunDir, name: str, *, program: Path, model_name: str, **options: Any
    ) -> None:
        self.model_name = model_name
        super().__init__(
            run,
            name,
            lambda port: reference_worker_argv(
                str(program), port=port, model_name=model_name, **options
            ),
            post_ok("/worker_get_status"),
            ready_timeout=SERVER_READY_S,
        )
