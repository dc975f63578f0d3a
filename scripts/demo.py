"""`make demo`: the adapter end to end on its embedded defaults, in about five seconds.

1. starts the reference worker (a FastChat-protocol worker with a scripted model) and the
   adapter in standalone mode (it serves DB-GPT's controller API itself), on free loopback ports,
   as the real CLI commands in subprocesses;
2. waits until the adapter's /readyz says it is ready;
3. shows the model registered at GET /api/controller/models, as a DB-GPT apiserver would see it;
4. streams a chat through DB-GPT's worker API (POST /api/worker/generate_stream), printing the
   text as it arrives (each frame carries the cumulative text: only the new suffix is printed);
5. stops both processes with SIGTERM.

Exits non-zero, with the tail of each process's log, if any step fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from protocol.framing import FrameDecoder

CLI = [sys.executable, "-m", "adapter"]  # the same program as `fastchat-adapter`
MODEL = "reference-model"
HOST = "127.0.0.1"
QUESTION = "Say hello to DB-GPT from FastChat."


class DemoFailed(Exception):
    pass


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


class Process:
    def __init__(self, name: str, args: list[str], logs: Path) -> None:
        self.name = name
        self.log = logs / f"{name}.log"
        print(f"$ fastchat-adapter {' '.join(args)}")
        with self.log.open("wb") as out:
            self.popen = subprocess.Popen(
                [*CLI, *args], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise DemoFailed(f"{self.name} exited with status {self.popen.returncode}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(f"  {self.name}| {line}" for line in text)


def wait_until(ready: Callable[[], bool], process: Process, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        process.check_alive()
        try:
            if ready():
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise DemoFailed(f"{what} not ready after {timeout:.0f} s")
        time.sleep(0.1)


def stream_chat(client: httpx.Client, adapter: str) -> None:
    request = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant.", "round_index": 0},
            {"role": "human", "content": QUESTION, "round_index": 0},
        ],
        "echo": False,
        "max_new_tokens": 64,
    }
    print(f"\n> POST {adapter}/api/worker/generate_stream\n  human: {QUESTION}\n  ai: ", end="")
    decoder = FrameDecoder()
    shown, finish, usage = "", None, None  # the cumulative text printed so far
    with client.stream("POST", f"{adapter}/api/worker/generate_stream", json=request) as reply:
        if reply.status_code != 200:
            raise DemoFailed(f"generate_stream answered HTTP {reply.status_code}")
        for data in reply.iter_raw():
            for frame in decoder.feed(data):
                if frame.get("error_code"):
                    raise DemoFailed(f"error frame {frame['error_code']}: {frame.get('text')}")
                text = str(frame.get("text", ""))
                new = text[len(shown) :] if text.startswith(shown) else "\n" + text
                print(new, end="", flush=True)
                shown = text
                finish, usage = frame.get("finish_reason") or finish, frame.get("usage") or usage
    decoder.close()
    print(f"\n\n(finish_reason {finish}, usage {usage})")


def run(logs: Path) -> None:
    worker_port, adapter_port = free_port(), free_port()
    worker_url, adapter_url = f"http://{HOST}:{worker_port}", f"http://{HOST}:{adapter_port}"
    processes: list[Process] = []
    try:
        with httpx.Client(timeout=10, trust_env=False) as client:
            worker = Process(
                "reference-worker",
                [
                    *("reference-worker", "--host", HOST, "--port", str(worker_port)),
                    *("--model-names", MODEL, "--tokens-per-second", "25"),
                ],
                logs,
            )
            processes.append(worker)
            wait_until(
                lambda: client.post(f"{worker_url}/worker_get_status").is_success,
                worker,
                "reference worker",
            )
            adapter = Process(
                "adapter",
                ["serve", "--port", str(adapter_port), "--worker-address", worker_url],
                logs,
            )
            processes.append(adapter)
            wait_until(lambda: client.get(f"{adapter_url}/readyz").is_success, adapter, "adapter")
            print(f"\nadapter ready at {adapter_url} (GET /readyz: 200)")

            listed = client.get(f"{adapter_url}/api/controller/models").json()
            print(f"\n> GET {adapter_url}/api/controller/models")
            for instance in listed:
                print("  " + json.dumps({k: instance[k] for k in ("model_name", "host", "port")}))
            if not any(i["model_name"] == f"{MODEL}@llm" for i in listed):
                raise DemoFailed(f"{MODEL}@llm is not registered")
            stream_chat(client, adapter_url)
    except (DemoFailed, httpx.HTTPError) as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        for process in processes:
            print(process.tail(), file=sys.stderr)
        raise
    finally:
        for process in reversed(processes):
            process.stop()
        print("stopped the adapter and the reference worker")


def main() -> int:
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    with tempfile.TemporaryDirectory(prefix="fastchat-adapter-demo-") as logs:
        try:
            run(Path(logs))
        except (DemoFailed, httpx.HTTPError):
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
