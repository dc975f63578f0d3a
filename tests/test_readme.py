"""The README's promises: its first two commands, its settings table, its metrics list."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from adapter.metrics import PREFIX, Metrics

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_starts_with_the_two_commands() -> None:
    lines = README.splitlines()
    assert lines[2] == "```bash"
    assert lines[3].startswith("make demo ")
    assert lines[4].startswith("make test ")
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo: venv\n\t\$\(BIN\)/python scripts/demo.py$", makefile, re.M)
    assert re.search(r"^test: ", makefile, re.M)


def test_settings_table_is_up_to_date() -> None:
    script = load_script("settings_table")
    assert script.with_table(README) == README, "run: python scripts/settings_table.py --write"
    assert script.main(["--check"]) == 0


def test_metrics_list_names_every_metric() -> None:
    families = {m.name: m.type for m in Metrics().registry.collect()}
    listed = set(re.findall(r"^\| `(fastchat_adapter_\w+)` \|", README, re.M))
    ours = {
        name + "_total" if kind == "counter" else name
        for name, kind in families.items()
        if name.startswith(PREFIX)
    }
    assert listed == ours  # every metric, and no metric that is not exported
    others = {name.split("_", 1)[0] + "_*" for name in families if not name.startswith(PREFIX)}
    assert others == {"process_*", "python_*"}
    assert all(f"`{pattern}`" in README for pattern in others)


def test_demo_streams_a_chat_end_to_end() -> None:
    """`make demo` (the README's first command) on its embedded defaults."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert '"model_name": "reference-model@llm"' in out
    answer = out.split("ai: ", 1)[1].split("(finish_reason", 1)[0].strip()
    assert len(answer.split()) > 5, out  # streamed words arrived
    assert "finish_reason length" in out or "finish_reason stop" in out
    assert "stopped the adapter and the reference worker" in out
