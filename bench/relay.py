"""The adapter as a relay, side by side with the direct path and the relays users would use.

Starts, on loopback, a fast fake FastChat worker (bench/fake_worker.py) and in front of it: the
adapter (standalone, the real ``fastchat-adapter`` console script), FastChat 0.2.36's controller
relay and ``openai_api_server``, DB-GPT 0.8.2's apiserver (in front of the fake in DB-GPT mode
and a DB-GPT controller), and nginx (``proxy_buffering off``) when it is installed. The peers
come from the interop venvs (``FCA_PEERS_DIR``, default ``.peers``); a relay whose program is
missing is left out and said so. Then, interleaved across relays, in one run:

- full rate: c=1 (20 streams) and c=64 (256 streams), 1,000 frames each, as fast as they go;
- fixed cost: 1-frame streams one at a time (200 requests): CPU per request;
- paced: c=64, 64 streams of 200 frames 20 ms apart;
- hold: 2,000 trickle streams (30 frames 1 s apart) opened over 20 s; a stream is stalled when
  its first frame or any gap takes over 3 s.

Relay CPU is utime+stime of the relay's processes (from /proc, children included) over the
test; TTFT is from sending the request to the first frame with text; "added" TTFT is the
relay's p50 minus the direct path's p50 in the same repetition. One table (medians over the
repetitions, ranges in brackets) is printed and everything is written as JSON. Every process is
started here and stopped by its PID; every test is bounded in time. Machine load (``uptime``)
is recorded next to every figure: on a shared machine, compare relays within one run.

    .venv/bin/python bench/relay.py                # full run, ~15 min on 2 cores
    .venv/bin/python bench/relay.py --quick        # 1 repetition, no hold, ~2 min
    .venv/bin/python bench/relay.py --only adapter # the adapter and the direct path only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
PROMPT = "Hello! Tell me a long story."
TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


# --------------------------------------------------------------------------- request bodies
def _directive(frames: int, delay: float) -> str:
    return f" [[fake:frames={frames},delay={delay}]]" if delay else ""


def worker_body(frames: int, delay: float) -> bytes:
    """What FastChat's openai_api_server sends a worker."""
    prompt = f"USER: {PROMPT}{_directive(frames, delay)} ASSISTANT:"
    return json.dumps(
        {
            "model": "fake",
            "prompt": prompt,
            "temperature": 0.0,
            "top_p": 1.0,
            "top_k": -1,
            "max_new_tokens": frames,
            "echo": False,
            "stop_token_ids": None,
            "stop": [],
        }
    ).encode()


def prompt_request_body(frames: int, delay: float) -> bytes:
    """What DB-GPT's apiserver sends a DB-GPT worker: the adapter's input."""
    message = {"role": "human", "content": PROMPT + _directive(frames, delay), "round_index": 0}
    return json.dumps(
        {
            "model": "fake",
            "messages": [message],
            "echo": False,
            "temperature": 0.7,
            "max_new_tokens": frames,
        }
    ).encode()


def chat_body(frames: int, delay: float) -> bytes:
    message = {"role": "user", "content": PROMPT + _directive(frames, delay)}
    return json.dumps(
        {
            "model": "fake",
            "messages": [message],
            "max_tokens": frames,
            "temperature": 0,
            "stream": True,
        }
    ).encode()


# --------------------------------------------------------------------------- /proc
def _tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total


def rss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * PAGE_KB
        except (OSError, IndexError, ValueError):
            pass
    return total


def load_average() -> float:
    return os.getloadavg()[0]


# --------------------------------------------------------------------------- client
@dataclass
class Stream:
    """One response as it arrives: chunked HTTP/1.1, NUL frames or SSE events."""

    sse: bool
    started: float = field(default_factory=time.perf_counter)
    status: int = 0
    ttft: float | None = None
    frames: int = 0  # frames with text
    last: float = 0.0
    max_gap: float = 0.0
    error: str | None = None
    _head: bytes = b""
    _body: bytearray = field(default_factory=bytearray)
    _data: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> None:
        now = time.perf_counter()
        if not self.status:
            self._head += data
            if b"\r\n\r\n" not in self._head:
                return
            head, _, data = self._head.partition(b"\r\n\r\n")
            self.status = int(head.split(b" ", 2)[1])
        self._body += data
        while True:  # de-chunk
            line_end = self._body.find(b"\r\n")
            if line_end < 0:
                return
            size = int(bytes(self._body[:line_end]).split(b";")[0], 16)
            if len(self._body) < line_end + 2 + size + 2:
                return
            self._data += self._body[line_end + 2 : line_end + 2 + size]
            del self._body[: line_end + 4 + size]
            self._frames(now)

    def _frames(self, now: float) -> None:
        sep = b"\n\n" if self.sse else b"\0"
        while (end := self._data.find(sep)) >= 0:
            piece = bytes(self._data[:end])
            del self._data[: end + len(sep)]
            if not piece.strip() or piece.strip() == b"data: [DONE]":
                continue
            if (
                b'"error_code": 0' not in piece
                and b'"error_code":0' not in piece
                and (b'"error_code"' in piece)
            ):
                self.error = self.error or piece[:200].decode("utf-8", "replace")
            if self.ttft is None:
                self.ttft = now - self.started
            else:
                self.max_gap = max(self.max_gap, now - self.last)
            self.last = now
            self.frames += 1


async def one_stream(
    url: tuple[str, int, str],
    body: bytes,
    sse: bool,
    limit: float,
    on_frame: Callable[[Stream], None] | None = None,
) -> Stream:
    host, port, path = url
    stream = Stream(sse)
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    writer = None
    try:
        async with asyncio.timeout(limit):
            reader, writer = await asyncio.open_connection(host, port)
            stream.started = time.perf_counter()
            writer.write(request)
            while data := await reader.read(65536):
                stream.feed(data)
                if on_frame:
                    on_frame(stream)
        if stream.status != 200:
            stream.error = stream.error or f"HTTP {stream.status}"
    except TimeoutError:
        stream.error = stream.error or "timeout"
    except OSError as exc:
        stream.error = stream.error or f"{type(exc).__name__}: {exc}"
    finally:
        if writer is not None:
            writer.close()
    return stream


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


class Watch:
    """CPU and peak RSS of a set of process trees during a test."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = [p for pid in pids for p in _tree(pid)]
        self.ticks = cpu_ticks(self.pids)
        self.rss_peak = rss_kb(self.pids)
        self.load = load_average()
        self._task = asyncio.ensure_future(self._sample())

    async def _sample(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            self.rss_peak = max(self.rss_peak, rss_kb(self.pids))

    def stop(self) -> dict[str, Any]:
        self._task.cancel()
        return {
            "cpu_us": (cpu_ticks(self.pids) - self.ticks) * TICK_US,
            "rss_peak_mb": self.rss_peak / 1024,
            "load": self.load,
        }


async def load_test(
    relay: Relay, frames: int, delay: float, m: int, c: int, limit: float
) -> dict[str, Any]:
    body = relay.body(frames, delay)
    queue = list(range(m))
    results: list[Stream] = []

    async def client() -> None:
        while queue:
            queue.pop()
            results.append(await one_stream(relay.url, body, relay.sse, limit))

    watch = Watch(relay.pids)
    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(c)))
    wall = time.perf_counter() - started
    usage = watch.stop()
    ttfts = [s.ttft * 1000 for s in results if s.ttft is not None]
    token_frames = sum(s.frames for s in results)
    upstream_frames = m * frames  # what the worker produced: a relay may coalesce under load
    return {
        "relay": relay.name,
        "frames": frames,
        "delay": delay,
        "m": m,
        "c": c,
        "wall_s": wall,
        "ok": sum(1 for s in results if not s.error),
        "errors": sorted({s.error for s in results if s.error})[:5],
        "ttft_p50_ms": pct(ttfts, 50),
        "ttft_p99_ms": pct(ttfts, 99),
        "token_frames": token_frames,
        "cpu_us_per_frame": usage["cpu_us"] / upstream_frames,
        "cpu_ms_per_request": usage["cpu_us"] / 1000 / m,
        **usage,
    }


async def hold_test(
    relay: Relay, streams: int, ramp: float, limit: float, stall: float
) -> dict[str, Any]:
    body = relay.body(30, 1.0)
    watch = Watch(relay.pids)
    open_now = 0
    peak = 0

    async def one(i: int) -> Stream:
        nonlocal open_now, peak
        await asyncio.sleep(ramp * i / streams)
        open_now += 1
        peak = max(peak, open_now)
        try:
            return await one_stream(relay.url, body, relay.sse, limit)
        finally:
            open_now -= 1

    results = await asyncio.gather(*(one(i) for i in range(streams)))
    usage = watch.stop()
    stalled = [
        s
        for s in results
        if not s.error and (s.ttft is None or s.ttft > stall or s.max_gap > stall)
    ]
    errors = [s for s in results if s.error]
    first = [s.ttft * 1000 for s in results if s.ttft is not None]
    return {
        "relay": relay.name,
        "streams": streams,
        "ok": streams - len(stalled) - len(errors),
        "stalled": len(stalled),
        "errors": len(errors),
        "error_kinds": sorted({s.error or "" for s in errors})[:5],
        "first_frame_p99_ms": pct(first, 99),
        "peak_open": peak,
        **usage,
    }


# --------------------------------------------------------------------------- processes
@dataclass
class Relay:
    name: str
    url: tuple[str, int, str]
    body: Callable[[int, float], bytes]
    sse: bool
    pids: list[int]


class Processes:
    """What this script started; stopped by PID (SIGTERM, then SIGKILL after 8 s)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [str(a) for a in argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            cwd=self.logs,
        )
        self.started[name] = proc
        return proc.pid

    def stop_all(self) -> None:
        for proc in reversed(self.started.values()):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)  # its own session: pgid == pid
        deadline = time.monotonic() + 8
        for proc in self.started.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def http(method: str, url: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=3) as reply:
        return json.loads(reply.read() or b"null")


def wait_until(what: str, check: Callable[[], Any], limit: float = 90.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{what}: not ready after {limit:g} s")


def peer_python(peers: Path, prefix: str, module: str) -> Path | None:
    for venv in sorted(peers.glob(prefix + "*")):
        python = venv / "bin/python"
        if (
            python.exists()
            and subprocess.run(
                [python, "-c", f"import {module}"], capture_output=True, check=False
            ).returncode
            == 0
        ):
            return python
    return None


NGINX_CONF = """daemon off; worker_processes 1; pid {run}/nginx.pid;
error_log {run}/nginx-error.log;
events {{ worker_connections 8192; }}
http {{
  access_log off; client_body_temp_path {run}/tmp; proxy_temp_path {run}/tmp;
  fastcgi_temp_path {run}/tmp; uwsgi_temp_path {run}/tmp; scgi_temp_path {run}/tmp;
  upstream fake {{ server 127.0.0.1:{worker}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{ proxy_pass http://fake; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_buffering off; proxy_request_buffering off; proxy_read_timeout 300s; }}
  }}
}}
"""

DBGPT_TOML = """[service.model.controller]
host = "127.0.0.1"
port = {controller}

[service.model.api]
host = "127.0.0.1"
port = {api}
controller_addr = "http://127.0.0.1:{controller}"
"""


def start_relays(
    procs: Processes,
    run: Path,
    want: set[str],
    base: int,
    peers: Path,
    baseline: Path | None = None,
) -> list[Relay]:
    fc_python = peer_python(peers, "fastchat-", "fastchat")
    fake = ROOT / "bench/fake_worker.py"
    worker_port, controller_port, openai_port = base + 10, base + 1, base + 2
    fake_python = fc_python or Path(sys.executable)
    relays: list[Relay] = []
    worker_argv = [fake_python, fake, "--port", str(worker_port)]
    if fc_python and want & {"controller", "openai"}:
        procs.start(
            "fc_controller",
            [
                fc_python,
                "-m",
                "fastchat.serve.controller",
                "--host",
                HOST,
                "--port",
                str(controller_port),
            ],
            {"LOGDIR": str(run)},
        )
        wait_until(
            "FastChat controller",
            lambda: http("GET", f"http://{HOST}:{controller_port}/test_connection") == "success",
        )
        worker_argv += ["--controller-address", f"http://{HOST}:{controller_port}"]
    worker = procs.start("worker", worker_argv)
    wait_until(
        "fake worker",
        lambda: http("POST", f"http://{HOST}:{worker_port}/worker_get_status")["model_names"],
    )
    relays.append(
        Relay(
            "direct", (HOST, worker_port, "/worker_generate_stream"), worker_body, False, [worker]
        )
    )
    if "nginx" in want:
        nginx = shutil.which("nginx") or (
            "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
        )
        if nginx:
            (run / "tmp").mkdir(exist_ok=True)
            conf = run / "nginx.conf"
            conf.write_text(NGINX_CONF.format(run=run, worker=worker_port, port=base + 30))
            pid = procs.start("nginx", [nginx, "-p", run, "-c", conf])
            wait_until(
                "nginx",
                lambda: http("POST", f"http://{HOST}:{base + 30}/worker_get_status")["model_names"],
            )
            relays.append(
                Relay(
                    "nginx", (HOST, base + 30, "/worker_generate_stream"), worker_body, False, [pid]
                )
            )
        else:
            print("nginx: not installed, left out (apt-get install -y nginx-light)")
    if fc_python and want & {"controller", "openai"}:
        wait_until(
            "worker registered",
            lambda: (
                "fake" in http("POST", f"http://{HOST}:{controller_port}/list_models")["models"]
            ),
        )
        controller = procs.started["fc_controller"].pid
        if "controller" in want:
            relays.append(
                Relay(
                    "controller",
                    (HOST, controller_port, "/worker_generate_stream"),
                    worker_body,
                    False,
                    [controller],
                )
            )
        if "openai" in want:
            pid = procs.start(
                "fc_openai",
                [
                    fc_python,
                    "-m",
                    "fastchat.serve.openai_api_server",
                    "--host",
                    HOST,
                    "--port",
                    str(openai_port),
                    "--controller-address",
                    f"http://{HOST}:{controller_port}",
                ],
                {"LOGDIR": str(run)},
            )
            wait_until(
                "openai_api_server",
                lambda: http("GET", f"http://{HOST}:{openai_port}/v1/models")["data"],
            )
            relays.append(
                Relay("openai", (HOST, openai_port, "/v1/chat/completions"), chat_body, True, [pid])
            )
    elif want & {"controller", "openai"}:
        print(f"FastChat relays: no fschat venv under {peers}, left out")
    if "dbgpt" in want:
        dbgpt = None
        for venv in sorted(peers.glob("dbgpt-*")):
            candidate = venv / "bin/dbgpt"
            if not candidate.exists():
                continue
            version = subprocess.run(
                [venv / "bin/python", "-c", "import dbgpt;print(dbgpt.__version__)"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
            if candidate.exists() and version.startswith("0.8"):
                dbgpt = candidate
                break
        if dbgpt:
            toml = run / "dbgpt.toml"
            toml.write_text(DBGPT_TOML.format(controller=base + 20, api=base + 21))
            env = {"DBGPT_HOME": str(run / "dbgpt_home")}
            procs.start("db_controller", [dbgpt, "start", "controller", "-c", toml], env)
            wait_until(
                "DB-GPT controller",
                lambda: http("GET", f"http://{HOST}:{base + 20}/api/health")["status"] == "ok",
            )
            procs.start(
                "db_worker",
                [
                    fake_python,
                    fake,
                    "--api",
                    "dbgpt",
                    "--port",
                    str(base + 11),
                    "--controller-address",
                    f"http://{HOST}:{base + 20}",
                ],
            )
            pid = procs.start("db_apiserver", [dbgpt, "start", "apiserver", "-c", toml], env)
            wait_until(
                "DB-GPT apiserver",
                lambda: http("GET", f"http://{HOST}:{base + 21}/api/v1/models")["data"],
            )
            relays.append(
                Relay(
                    "dbgpt", (HOST, base + 21, "/api/v1/chat/completions"), chat_body, True, [pid]
                )
            )
        else:
            print(f"DB-GPT apiserver: no DB-GPT 0.8 venv under {peers}, left out")
    adapters = [("adapter", Path(sys.executable).parent / "fastchat-adapter")]
    if baseline:  # another build of the adapter, measured in the same run (before -> after)
        adapters.insert(0, ("adapter@base", baseline))
    for offset, (name, program) in enumerate(adapters if "adapter" in want else []):
        port = base + 40 + offset
        pid = procs.start(
            name,
            [
                program,
                "serve",
                "--port",
                str(port),
                "--worker-address",
                f"http://{HOST}:{worker_port}",
                "--log-level",
                "warning",
            ],
        )
        wait_until(name, lambda port=port: http("GET", f"http://{HOST}:{port}/readyz"))
        relays.append(
            Relay(
                name, (HOST, port, "/api/worker/generate_stream"), prompt_request_body, False, [pid]
            )
        )
    return relays


# --------------------------------------------------------------------------- phases
async def idle(base: int) -> None:
    for _ in range(100):
        if http("GET", f"http://{HOST}:{base + 10}/__stats")["in_flight"] == 0:
            return
        await asyncio.sleep(0.3)


async def run_all(args: argparse.Namespace, relays: list[Relay]) -> dict[str, Any]:
    phases: list[tuple[str, int, float, int, int]] = [
        ("full c=1", 1000, 0.0, 20, 1),
        ("full c=64", 1000, 0.0, 256, 64),
        ("fixed c=1", 1, 0.0, 200, 1),
        ("paced c=64", 200, 0.02, 64, 64),
    ]
    if args.quick:
        phases = [(n, f, d, max(c, m // 4), c) for n, f, d, m, c in phases]
    phases = [p for p in phases if p[0].split()[0] in args.phases]
    for relay in relays:  # smoke + warm caches (templates, pools, the fake's frames)
        for frames, delay in ((20, 0.0), (1000, 0.0), (1, 0.0), (200, 0.02)):
            s = await one_stream(relay.url, relay.body(frames, delay), relay.sse, 60)
            if s.error or not s.frames:
                raise RuntimeError(f"{relay.name}: smoke stream failed: {s}")
    results: dict[str, Any] = {"load": [], "hold": []}
    for rep in range(1, args.reps + 1):
        for phase, frames, delay, m, c in phases:
            for relay in relays:
                await idle(args.base_port)
                r = await load_test(relay, frames, delay, m, c, args.deadline)
                r.update(phase=phase, rep=rep)
                results["load"].append(r)
                print(
                    f"rep{rep} {phase:<10} {relay.name:<10} ok={r['ok']}/{m} "
                    f"cpu={r['cpu_us_per_frame'] or 0:.1f}us/frame "
                    f"({r['cpu_ms_per_request']:.2f}ms/req) ttft p50={r['ttft_p50_ms'] or 0:.1f} "
                    f"p99={r['ttft_p99_ms'] or 0:.1f}ms rss={r['rss_peak_mb']:.0f}MB "
                    f"load={r['load']:.2f} {r['errors'] or ''}",
                    flush=True,
                )
    if not args.quick and not args.no_hold and "hold" in args.phases:
        for relay in relays:
            await idle(args.base_port)
            await asyncio.sleep(2)
            r = await hold_test(relay, args.streams, 20.0, 90.0, 3.0)
            results["hold"].append(r)
            print(
                f"hold {relay.name:<10} ok={r['ok']} stalled={r['stalled']} "
                f"errors={r['errors']} rss={r['rss_peak_mb']:.0f}MB "
                f"first p99={r['first_frame_p99_ms'] or 0:.0f}ms load={r['load']:.2f} "
                f"{r['error_kinds'] or ''}",
                flush=True,
            )
    return results


# --------------------------------------------------------------------------- table
def _median_range(values: list[float], fmt: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    mid = fmt.format(statistics.median(values))
    if len(values) > 1:
        return f"{mid} [{fmt.format(min(values))}–{fmt.format(max(values))}]"
    return mid


def table(results: dict[str, Any], names: list[str]) -> str:
    load = results["load"]

    def runs(phase: str, name: str) -> list[dict[str, Any]]:
        return [r for r in load if r["phase"] == phase and r["relay"] == name]

    def added(phase: str, name: str, key: str) -> list[float]:
        out = []
        for r in runs(phase, name):
            direct = [d for d in runs(phase, "direct") if d["rep"] == r["rep"]]
            if direct and r[key] is not None and direct[0][key] is not None:
                out.append(r[key] - direct[0][key])
        return out

    def cell(phase: str, name: str, key: str, fmt: str) -> str:
        text = _median_range([r[key] for r in runs(phase, name)], fmt)
        return f"({text})" if name == "direct" else text

    rows = [
        (
            "paced c=64: relay CPU µs/frame",
            lambda n: cell("paced c=64", n, "cpu_us_per_frame", "{:.1f}"),
        ),
        (
            "paced c=64: added TTFT p50 ms",
            lambda n: (
                "–"
                if n == "direct"
                else _median_range(added("paced c=64", n, "ttft_p50_ms"), "{:+.1f}")
            ),
        ),
        (
            "full c=1: relay CPU µs/frame",
            lambda n: cell("full c=1", n, "cpu_us_per_frame", "{:.1f}"),
        ),
        (
            "full c=1: added TTFT p50 ms",
            lambda n: (
                "–"
                if n == "direct"
                else _median_range(added("full c=1", n, "ttft_p50_ms"), "{:+.2f}")
            ),
        ),
        ("full c=64: CPU µs/frame", lambda n: cell("full c=64", n, "cpu_us_per_frame", "{:.1f}")),
        (
            "full c=64: TTFT p50 / p99 ms",
            lambda n: (
                _median_range([r["ttft_p50_ms"] for r in runs("full c=64", n)], "{:.0f}")
                + " / "
                + _median_range([r["ttft_p99_ms"] for r in runs("full c=64", n)], "{:.0f}")
            ),
        ),
        (
            "fixed cost c=1: CPU ms/request",
            lambda n: cell("fixed c=1", n, "cpu_ms_per_request", "{:.2f}"),
        ),
    ]
    holds = {r["relay"]: r for r in results.get("hold", [])}
    if holds:
        rows.append(
            (
                "2,000 trickle streams: ok/stalled/err, RSS",
                lambda n: (
                    f"{holds[n]['ok']}/{holds[n]['stalled']}/{holds[n]['errors']}, "
                    f"{holds[n]['rss_peak_mb']:.0f} MB"
                    if n in holds
                    else "–"
                ),
            )
        )
    loads = [r["load"] for r in load] + [r["load"] for r in results.get("hold", [])]
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(fn(n) for n in names) + " |" for label, fn in rows]
    if loads:
        lines.append(
            f"\nmachine load (1-min average) during the tests: "
            f"{min(loads):.2f}–{max(loads):.2f} on {os.cpu_count()} cores"
        )
    return "\n".join(lines)


def main() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 16384)), hard))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only",
        default="direct,nginx,controller,openai,dbgpt,adapter",
        help="comma-separated relays (direct is always measured)",
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 repetition, fewer streams, no hold")
    parser.add_argument("--no-hold", action="store_true")
    parser.add_argument(
        "--phases",
        default="full,fixed,paced,hold",
        help="comma-separated subset of full,fixed,paced,hold",
    )
    parser.add_argument("--streams", type=int, default=2000, help="streams of the hold test")
    parser.add_argument("--deadline", type=float, default=150.0, help="limit per test (s)")
    parser.add_argument(
        "--baseline-adapter",
        type=Path,
        help="another fastchat-adapter program (e.g. main's venv) to measure "
        "side by side as adapter@base",
    )
    parser.add_argument("--base-port", type=int, default=29100)
    parser.add_argument(
        "--peers", type=Path, default=Path(os.environ.get("FCA_PEERS_DIR", ROOT / ".peers"))
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results")
    args = parser.parse_args()
    if args.quick:
        args.reps = 1
    args.phases = set(args.phases.split(","))
    run = args.out / time.strftime("%Y%m%d-%H%M%S")
    run.mkdir(parents=True, exist_ok=True)
    procs = Processes(run)
    want = set(args.only.split(",")) | {"direct"}
    results: dict[str, Any] = {"started": time.strftime("%F %T"), "args": vars(args)}
    try:
        relays = start_relays(
            procs, run, want, args.base_port, args.peers.resolve(), args.baseline_adapter
        )
        results["pids"] = {r.name: r.pids for r in relays}
        results.update(asyncio.run(run_all(args, relays)))
        results["table"] = table(results, [r.name for r in relays])
        print("\n" + results["table"])
    finally:
        procs.stop_all()
        (run / "results.json").write_text(json.dumps(results, indent=1, default=str))
        print(f"\nresults: {run / 'results.json'}")


if __name__ == "__main__":
    main()
