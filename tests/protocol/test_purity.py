"""protocol/ is pure: it imports no HTTP, server or event-loop library (in the spirit of h11)."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import protocol

FORBIDDEN = ("httpx", "fastapi", "uvicorn", "asyncio", "starlette", "anyio", "aiohttp", "requests")
PACKAGE = Path(protocol.__file__).resolve().parent
SOURCES = sorted(PACKAGE.glob("*.py"))


def test_importing_protocol_loads_no_io_library() -> None:
    probe = (
        "import json, sys\n"
        "import protocol, protocol.translate, protocol.framing, protocol.conversation\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        cwd=PACKAGE.parent,
    )
    loaded = json.loads(result.stdout)
    offenders = [m for m in loaded if m.split(".")[0] in FORBIDDEN]
    assert offenders == []


def _imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            roots.add("<dynamic import>")
    return roots


def test_sources_are_found() -> None:
    names = {path.name for path in SOURCES}
    assert {"errors.py", "fastchat.py", "dbgpt.py", "framing.py", "translate.py"} <= names


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_no_io_import_in_the_source(path: Path) -> None:
    roots = _imported_roots(path)
    assert roots.isdisjoint(FORBIDDEN), roots & set(FORBIDDEN)
    assert "<dynamic import>" not in roots
    assert "importlib" not in roots


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_public_surface_is_explicit(path: Path) -> None:
    """Every public module names its surface in ``__all__``, and every name exists."""
    if path.name.startswith("_"):
        return
    module = importlib.import_module(f"protocol.{path.stem}")
    exported = module.__all__
    assert sorted(exported) == sorted(set(exported))
    assert all(hasattr(module, name) for name in exported), path.name
