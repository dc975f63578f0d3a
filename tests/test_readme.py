"""The README's promises: its first two commands, its settings table, its metrics list."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from adapter import __version__
from adapter.cli import ExitCode
from adapter.metrics import PREFIX, Metrics
from adapter.settings import Settings
from adapter.startup import startup_line

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


def test_exit_codes_table_lists_every_exit_code() -> None:
    section = README.split("### Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| ([^|]+) \|", section, re.M)
    assert [int(code) for code, _ in rows] == [int(code) for code in ExitCode]
    assert all(text.strip() for _, text in rows)


def test_startup_line_example_is_what_serve_logs() -> None:
    example = README.split("```text\n", 2)[2].split("\n", 1)[0]
    message = example.split(" fastchat_adapter.server ", 1)[1]
    settings = Settings(
        host="0.0.0.0",
        register_host="10.0.0.9",
        worker_address=["http://10.0.0.5:21002"],
        controller_address=["http://dbgpt-controller:8000"],
    )
    assert message == startup_line(settings).replace(__version__, "0.1.0")


def test_install_section_names_real_files_and_the_compose_version() -> None:
    section = README.split("## Install", 1)[1].split("\n## ", 1)[0]
    for path in ("docker/adapter-constraints.txt", "deploy/adapter.example.toml"):
        assert path.split("/")[-1] in section and (ROOT / path).is_file(), path
    assert "make venv" in section and re.search(r"^venv: ", (ROOT / "Makefile").read_text(), re.M)
    assert "docker build -t fastchat-adapter ." in section
    compose = (ROOT / "compose.yaml").read_text()
    assert "content: |" in compose  # configs.content: Docker Compose 2.23.1 and newer
    assert "Docker Compose 2.23.1 or newer" in README
