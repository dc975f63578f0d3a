"""A private MariaDB server for the HA-controller tests (issue 10 part 2): Debian's
`mariadb-server`, installed here when missing (apt-get, as root), started on a fresh data
directory in $RUN and a loopback port, as this test run's own process (stopped by pid).

`ensure_mariadb()` says why it cannot be had; the tests skip with that message, except under
CI=true, where the leg must run and a missing server is a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

from tests.interop.procs import LOOPBACK, Proc, RunDir

PACKAGE = "mariadb-server"
INSTALL_TIMEOUT_S = 900.0
READY_TIMEOUT_S = 60.0


def _binaries() -> tuple[str, str] | None:
    server = shutil.which("mariadbd") or shutil.which("mariadbd", path="/usr/sbin")
    install = shutil.which("mariadb-install-db")
    return (server, install) if server and install else None


def ensure_mariadb() -> tuple[str, str] | str:
    """(mariadbd, mariadb-install-db), installing Debian's package if needed; else the reason."""
    found = _binaries()
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"Debian's {PACKAGE} is not installed and cannot be installed here (needs root)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", PACKAGE],
    ):
        done = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False
        )
        if done.returncode != 0:
            return f"installing Debian's {PACKAGE} failed: {done.stderr[-500:]}"
    return _binaries() or f"Debian's {PACKAGE} installed no mariadbd"


def _greets(client: object, url: str) -> bool:
    """Ready when the server sends its protocol greeting on the port."""
    port = int(url.rsplit(":", 1)[1])
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1.0) as sock:
            return len(sock.recv(64)) > 0
    except OSError:
        return False


class MariaDb(Proc):
    """`mariadbd` on a private data directory; root without a password (grant tables off),
    loopback only."""

    def __init__(self, run: RunDir, name: str, *, server: str, install_db: str) -> None:
        self.datadir = run.path / f"{name}-data"
        self.database = "dbgpt"
        self._install_db = install_db

        def command(port: int) -> list[str]:
            return [
                server, "--no-defaults", f"--datadir={self.datadir}", "--user=root",
                f"--port={port}", f"--bind-address={LOOPBACK}",
                f"--socket={run.path / (name + '.sock')}",
                f"--pid-file={run.path / (name + '.pid')}", "--skip-grant-tables",
                "--skip-log-bin",
            ]  # fmt: skip

        super().__init__(run, name, command, _greets, ready_timeout=READY_TIMEOUT_S)

    def initialise(self) -> None:
        """Lay out the system tables in the data directory (once)."""
        if (self.datadir / "mysql").is_dir():
            return
        self.datadir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                self._install_db,
                "--no-defaults",
                f"--datadir={self.datadir}",
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ],
            capture_output=True,
            check=True,
            timeout=120,
        )

    @property
    def sqlalchemy_url(self) -> str:
        return f"mysql+pymysql://root@{LOOPBACK}:{self.port}/{self.database}"

    @property
    def dbgpt_registry(self) -> dict[str, object]:
        """DB-GPT's `[service.model.controller.registry.database]` table for this server."""
        return {
            "type": "mysql",
            "host": LOOPBACK,
            "port": self.port,
            "user": "root",
            "password": "",
            "database": self.database,
        }


def sqlite_registry(path: Path) -> dict[str, object]:
    return {"type": "sqlite", "path": str(path)}
