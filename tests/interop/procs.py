"""Processes of the real peers: free ports, start with readiness polling, stop by pid, logs.

Every process gets its own stdout+stderr file in the run folder `$RUN` (`<repo>/run/<time>-<pid>/`),
and a `name pid` line in `$RUN/pids`. Processes are started in a new session (their own process
group), so a stop signals exactly the group we created: SIGTERM, up to 5 s, then SIGKILL. Nothing
here looks processes up by name.

After a crashed test run: `python -m tests.interop.procs reap` stops processes recorded in the
`pids` files of runs whose pytest is gone, checking each one's environment for its run folder first.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
RUNS_DIR = REPO_ROOT / "run"
LOOPBACK = "127.0.0.1"
POLL_INTERVAL_S = 0.15
PROBE_TIMEOUT_S = 1.0
STOP_GRACE_S = 5.0
START_ATTEMPTS = 3

Probe = Callable[[httpx.Client, str], bool]
Command = Callable[[int], Sequence[str]]


class ProcError(RuntimeError):
    """A peer process died at start-up, missed its deadline, or could not be started."""


def free_port() -> int:
    """A port that was free a moment ago (another process may take it: callers retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def tail_text(path: Path, lines: int = 100, start: int = 0) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(start)
            data = fh.read()
    except FileNotFoundError:
        return "(missing)"
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


class RunDir:
    """One folder per test run: process logs, pids, configs, LOGDIR and DBGPT_HOME."""

    def __init__(self, path: Path | None = None) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.path = path or RUNS_DIR / f"{stamp}-{os.getpid()}"
        self.path.mkdir(parents=True, exist_ok=True)
        self.pids_file = self.path / "pids"
        self.fastchat_logdir = self.path / "fastchat-logs"
        self.fastchat_logdir.mkdir(exist_ok=True)
        self.failed = False
        self._procs: list[Proc] = []
        self._lock = threading.Lock()
        self._closing = False

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a peer: offline, loopback unproxied, logs inside the run folder."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        env.update(
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            LOGDIR=str(self.fastchat_logdir),
            DBGPT_HOME=str(self.path / "dbgpt-home"),
            NO_PROXY="127.0.0.1,localhost",
            no_proxy="127.0.0.1,localhost",
            PYTHONUNBUFFERED="1",
            FCA_RUN=str(self.path),  # lets `reap` prove a pid is ours
        )
        env.update(extra)
        return env

    def register(self, proc: Proc) -> None:
        with self._lock:
            if self._closing:
                raise ProcError(f"run {self.path} is shutting down; not starting {proc.name}")
            if proc not in self._procs:
                self._procs.append(proc)

    def record_pid(self, name: str, pid: int) -> None:
        with self._lock, open(self.pids_file, "a") as fh:
            fh.write(f"{name} {pid}\n")

    def stop_all(self) -> None:
        """Stop every process ever started in this run, newest first; refuse new starts."""
        with self._lock:
            self._closing = True
            procs = list(reversed(self._procs))
        for proc in procs:
            proc.stop()

    def log_files(self) -> list[Path]:
        files = sorted(self.path.glob("*.out"))
        files += sorted(self.fastchat_logdir.glob("*.log"))
        files += sorted(self.path.glob("*-home/workspace/logs/*.log"))
        return files

    def log_tails(self, lines: int = 100) -> str:
        parts = []
        for path in self.log_files():
            rel = path.relative_to(self.path)
            parts.append(f"===== {rel} (last {lines} lines) =====\n{tail_text(path, lines)}")
        return f"run folder: {self.path}\n" + "\n".join(parts)

    def cleanup(self, keep: bool) -> None:
        if not keep:
            shutil.rmtree(self.path, ignore_errors=True)


class Proc:
    """One peer process: a command built from its port, and a readiness probe.

    `command(port)` returns the argument list (it may also write a config file that holds the
    port). `probe(client, base_url)` says whether the process is ready to serve.
    """

    def __init__(
        self,
        run: RunDir,
        name: str,
        command: Command,
        probe: Probe,
        *,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        ready_timeout: float = 60.0,
    ) -> None:
        self.run = run
        self.name = name
        self.command = command
        self.probe = probe
        self.port = port or 0
        self.env = dict(env) if env is not None else run.env()
        self.ready_timeout = ready_timeout
        self.log_path = run.path / f"{name}.out"
        self.starts = 0
        self._popen: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self.launched_at: float | None = None  # time.monotonic() of the last launch

    def __repr__(self) -> str:
        return f"<Proc {self.name} pid={self.pid} url={self.url}>"

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else None

    @property
    def alive(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._popen.poll() if self._popen else None

    def tail(self, lines: int = 100) -> str:
        return tail_text(self.log_path, lines, self._log_offset)

    # --- start ----------------------------------------------------------------------------

    def start(self, *, same_port: bool = False) -> Proc:
        """Launch and wait until ready. A fresh port per attempt unless `same_port` (or a port
        was fixed at construction); "address already in use" is retried."""
        if self.alive:
            raise ProcError(f"{self.name} is already running (pid {self.pid})")
        keep_port = same_port and self.port > 0
        for attempt in range(1, START_ATTEMPTS + 1):
            if not keep_port:
                self.port = free_port()
            self._launch()
            try:
                self.wait_ready()
                return self
            except ProcError:
                in_use = "address already in use" in self.tail(200).lower()
                self.stop()
                if not in_use or attempt == START_ATTEMPTS:
                    raise
                note = f"port {self.port} in use, retrying ({attempt}/{START_ATTEMPTS})"
                self._note(note)
                if keep_port:
                    time.sleep(1.0)
        raise AssertionError("unreachable")

    def launch(self, *, same_port: bool = False) -> Proc:
        """Spawn without waiting for readiness (for tests that time the start-up themselves;
        follow with `wait_ready`). No retry on a taken port."""
        if self.alive:
            raise ProcError(f"{self.name} is already running (pid {self.pid})")
        if not (same_port and self.port > 0):
            self.port = free_port()
        self._launch()
        return self

    def restart(self, *, same_port: bool = True) -> Proc:
        self.stop()
        return self.start(same_port=same_port)

    def _note(self, text: str) -> None:
        with open(self.log_path, "a") as fh:
            fh.write(f"\n----- [harness] {time.strftime('%H:%M:%S')} {text} -----\n")

    def _launch(self) -> None:
        self.run.register(self)
        argv = [str(a) for a in self.command(self.port)]
        self._note(f"start #{self.starts + 1}: {' '.join(argv)}")
        self._log_offset = self.log_path.stat().st_size
        with open(self.log_path, "ab") as log:
            self._popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.run.path,
                start_new_session=True,  # own process group: signals reach only what we started
            )
        self.launched_at = time.monotonic()
        self.starts += 1
        self.run.record_pid(self.name, self._popen.pid)

    def wait_ready(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.ready_timeout)
        with httpx.Client(timeout=PROBE_TIMEOUT_S, trust_env=False) as client:
            while True:
                rc = self.returncode
                if rc is not None:
                    raise ProcError(
                        f"{self.name} exited with {rc} during start-up; log {self.log_path}:\n"
                        f"{self.tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if self.probe(client, self.url):
                        return
                if time.monotonic() > deadline:
                    waited = timeout or self.ready_timeout
                    raise ProcError(
                        f"{self.name} (pid {self.pid}) not ready at {self.url}"
                        f" after {waited:.0f} s; log {self.log_path}:\n{self.tail()}"
                    )
                time.sleep(POLL_INTERVAL_S)

    # --- stop -----------------------------------------------------------------------------

    def _signal_group(self, sig: int) -> None:
        # pgid == pid (new session). Linux does not reuse a pid while its process group exists,
        # so this reaches only processes we started, even after the leader has been reaped.
        if self._popen is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._popen.pid, sig)

    def stop(self, grace: float = STOP_GRACE_S) -> int | None:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL. Returns the exit code."""
        popen = self._popen
        if popen is None:
            return None
        if popen.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                popen.wait(grace)
            except subprocess.TimeoutExpired:
                self._note(f"no exit {grace:.0f} s after SIGTERM: SIGKILL")
                self._signal_group(signal.SIGKILL)
                popen.wait(10)
        self._signal_group(signal.SIGKILL)  # leftovers of the group, if any
        return popen.returncode

    def kill(self) -> int | None:
        """SIGKILL at once (a crash, for fault tests) and reap."""
        if self._popen is None:
            return None
        self._note("SIGKILL requested by a test")
        self._signal_group(signal.SIGKILL)
        return self._popen.wait(10)

    def signal(self, sig: int) -> None:
        """Send `sig` to the process group without waiting (e.g. SIGSTOP/SIGCONT)."""
        self._signal_group(sig)

    def wait_exit(self, timeout: float) -> int | None:
        """Wait up to `timeout` seconds for the process to exit; its exit code, or None if it
        is still running (nothing is signalled)."""
        if self._popen is None:
            return None
        try:
            return self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


def start_parallel(procs: Iterable[Proc], *, same_port: bool = False) -> None:
    """Start several processes at once; if any fails, stop them all and raise its error."""
    from concurrent.futures import ThreadPoolExecutor

    procs = list(procs)
    with ThreadPoolExecutor(max_workers=max(1, len(procs))) as pool:
        futures = [pool.submit(p.start, same_port=same_port) for p in procs]
        errors = [f.exception() for f in futures]
    failed = [e for e in errors if e is not None]
    if failed:
        for proc in procs:
            proc.stop()
        raise failed[0]


# --- probes -------------------------------------------------------------------------------


def get_ok(path: str) -> Probe:
    return lambda client, base: client.get(base + path).status_code == 200


def post_ok(path: str, body: Any = None) -> Probe:
    return lambda client, base: client.post(base + path, json=body or {}).status_code == 200


# --- drivers (scripts run under a peer's interpreter) --------------------------------------


def run_json(
    argv: Sequence[str | os.PathLike[str]],
    stdin_obj: Any = None,
    *,
    timeout: float = 120.0,
    env: Mapping[str, str] | None = None,
) -> Any:
    """Run a driver, feed it JSON on stdin, parse the JSON it prints on stdout."""
    proc = subprocess.run(
        [str(a) for a in argv],
        input=json.dumps(stdin_obj).encode() if stdin_obj is not None else b"",
        capture_output=True,
        timeout=timeout,
        env=dict(env) if env is not None else None,
        check=False,
    )
    if proc.returncode != 0:
        raise ProcError(
            f"driver failed ({proc.returncode}): {' '.join(map(str, argv))}\n"
            f"{proc.stderr.decode(errors='replace')[-4000:]}"
        )
    return json.loads(proc.stdout)


# --- crash clean-up --------------------------------------------------------------------------


def _owner_alive(run_path: Path) -> bool:
    try:
        owner = int(run_path.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return True
    try:
        os.kill(owner, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap(runs_dir: Path = RUNS_DIR) -> list[str]:
    """Stop leftovers of crashed runs: pids recorded in a run whose pytest process is gone and
    whose environment names that run folder."""
    done = []
    for run_path in sorted(runs_dir.glob("*-*")):
        pids = run_path / "pids"
        if not pids.is_file() or _owner_alive(run_path):
            continue
        for line in pids.read_text().splitlines():
            name, _, pid_text = line.partition(" ")
            pid = int(pid_text)
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"FCA_RUN={run_path}".encode() not in environ:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                done.append(f"{run_path.name}: killed {name} {pid}")
    return done


if __name__ == "__main__":
    if sys.argv[1:] != ["reap"]:
        sys.exit("usage: python -m tests.interop.procs reap")
    for line in reap():
        print(line)
