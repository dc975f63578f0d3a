"""Regenerate tests/protocol/golden/fastchat-v0.2.36-prompts.jsonl.gz with the real fschat 0.2.36.

.venv/bin/python scripts/render_golden.py            # rewrite the committed file
.venv/bin/python scripts/render_golden.py --check    # exit 1 if fschat renders anything else
.venv/bin/python scripts/render_golden.py -o new.jsonl.gz   # write elsewhere

Needs fschat 0.2.36: run from any other interpreter, the script re-executes itself under the
interop suite's cached FastChat venv (`tests/interop/peers.py`, under `.peers/`; built first if
missing, which takes a few minutes and needs PyPI), or under `--python PATH`.

The conversations (template name, system message, turns) are read from the existing file, in its
order: the random generator that first made them is not part of the repository. For each case, the
template JSON is taken afresh from fschat's registry and the prompt is rendered afresh, both exactly
as `tests/interop/drivers/fschat_render.py` does (the worker's `/worker_get_conv_template` JSON; a
new `Conversation` built from it the way `openai_api_server` does, then `get_prompt()`). So
`--check` proves that the committed template JSON and every prompt still come out of fschat 0.2.36
unchanged. Every registry template a worker can start with must have cases, in registry order.

The FastChat-main file (fastchat-main-prompts.jsonl.gz) cannot be regenerated here: fschat 0.2.36
is the only FastChat on PyPI, and main's `conversation.py` differs (see the golden README).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
GOLDEN = REPO_ROOT / "tests" / "protocol" / "golden" / "fastchat-v0.2.36-prompts.jsonl.gz"
DRIVERS = REPO_ROOT / "tests" / "interop" / "drivers"
FASTCHAT_VERSION = "0.2.36"
REEXEC_MARK = "FCA_RENDER_GOLDEN_REEXEC"

# Written as \uXXXX so that readers splitting lines on Unicode line breaks still see one case per
# line; json.dumps(ensure_ascii=False) escapes everything else that needs it.
LINE_BREAK_ESCAPES = {c: f"\\u{ord(c):04x}" for c in "\u0085\u2028\u2029\ufeff"}


# --- finding fschat 0.2.36 ----------------------------------------------------------------------


def fastchat_version() -> str | None:
    try:
        import fastchat
    except ImportError:
        return None
    return str(fastchat.__version__)


def fastchat_python() -> Path:
    """The interop suite's FastChat venv interpreter, built (lock-guarded) if not cached yet."""
    sys.path.insert(0, str(REPO_ROOT))
    from tests.interop import peers

    print("locating the fschat 0.2.36 venv (built first if missing) ...", file=sys.stderr)
    try:
        return peers.ensure_env(peers.FASTCHAT).python
    except peers.PeerSetupError as exc:
        sys.exit(f"render_golden: cannot build the FastChat venv:\n{exc}")


def reexec_under(python: Path, argv: list[str]) -> None:
    if os.environ.get(REEXEC_MARK):
        sys.exit(f"render_golden: {sys.executable} still lacks fschat {FASTCHAT_VERSION}")
    env = dict(os.environ, **{REEXEC_MARK: "1"})
    env.pop("PYTHONPATH", None)  # the project's paths must not shadow the venv's packages
    os.execve(str(python), [str(python), str(Path(__file__).resolve()), *argv], env)


# --- the file format ----------------------------------------------------------------------------


def read_lines(path: Path) -> list[str]:
    # Split on "\n" only (see LINE_BREAK_ESCAPES); the file ends with one.
    text = gzip.decompress(path.read_bytes()).decode("utf-8")
    if text and not text.endswith("\n"):
        sys.exit(f"render_golden: {path} does not end with a newline")
    return text.split("\n")[:-1]


def encode_line(case: dict[str, Any]) -> str:
    line = json.dumps(case, ensure_ascii=False)
    for char, escape in LINE_BREAK_ESCAPES.items():
        line = line.replace(char, escape)
    return line


def gzip_bytes(data: bytes) -> bytes:
    """As `gzip -9 -n` makes them (the committed files were), or zlib's level 9 without gzip."""
    gzip_cmd = shutil.which("gzip")
    if gzip_cmd:
        return subprocess.run(
            [gzip_cmd, "-9", "-n", "-c"], input=data, capture_output=True, check=True
        ).stdout
    return gzip.compress(data, compresslevel=9, mtime=0)


# --- rendering (under fschat 0.2.36) ------------------------------------------------------------


def render_file(source: Path) -> tuple[list[str], list[str]]:
    """The regenerated lines, in the source file's order, and the problems found on the way."""
    sys.path.insert(0, str(DRIVERS))
    import fschat_render  # the interop oracle's driver: same template JSON, same rendering path

    dumped = fschat_render.dump_templates()
    registry = {t["name"]: t["conv"] for t in dumped["templates"]}
    problems: list[str] = []
    lines: list[str] = []
    seen: list[str] = []
    for lineno, old_line in enumerate(read_lines(source), start=1):
        old = json.loads(old_line)
        name = old["template"]
        if name not in registry:
            problems.append(f"line {lineno}: template {name!r} is not servable in fschat 0.2.36")
            continue
        if not seen or seen[-1] != name:
            seen.append(name)
        case = {
            "template": name,
            "fastchat": dumped["fastchat"],
            "conv": registry[name],
            "system_message": old["system_message"],
            "turns": old["turns"],
        }
        try:
            case["prompt"] = fschat_render.render(case)
        except Exception as exc:  # the committed files hold no failing case
            problems.append(f"line {lineno}: get_prompt() raised {type(exc).__name__}: {exc}")
            continue
        lines.append(encode_line(case))
    if seen != list(registry):
        missing = [name for name in registry if name not in seen]
        problems.append(
            "the file's templates are not fschat's servable registry, each once, in registry "
            f"order (without cases: {missing or 'none'})"
        )
    return lines, problems


def describe(lineno: int, old: str, new: str) -> str:
    a, b = json.loads(old), json.loads(new)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)] or ["encoding"]
    where = f"line {lineno} ({b.get('template', a.get('template'))}): differs in {', '.join(keys)}"
    if "prompt" in keys:
        where += f"\n    committed: {a.get('prompt')!r}\n    fschat:    {b.get('prompt')!r}"
    return where


def check(committed: Path, lines: list[str]) -> list[str]:
    old_lines = read_lines(committed)
    diffs = [
        describe(n, old, new)
        for n, (old, new) in enumerate(zip(old_lines, lines, strict=False), start=1)
        if old != new
    ]
    if len(old_lines) != len(lines):
        diffs.append(f"{len(old_lines)} lines committed, {len(lines)} rendered")
    return diffs


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="render_golden.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--check", action="store_true", help="compare with --output instead of writing it"
    )
    parser.add_argument(
        "-o", "--output", type=Path, default=GOLDEN, help="output file (default: the committed one)"
    )
    parser.add_argument(
        "--cases", type=Path, default=GOLDEN, help="file to read the conversations from"
    )
    parser.add_argument("--python", type=Path, help="an interpreter that has fschat 0.2.36")
    args = parser.parse_args(argv)

    if fastchat_version() != FASTCHAT_VERSION:
        reexec_under(args.python or fastchat_python(), argv)

    lines, problems = render_file(args.cases.resolve())
    for problem in problems:
        print(f"render_golden: {problem}", file=sys.stderr)
    if args.check:
        diffs = check(args.output, lines)
        for diff in diffs[:20]:
            print(diff)
        total = len(diffs) + len(problems)
        print(f"{len(lines)} cases rendered with fschat {FASTCHAT_VERSION}; {total} differences")
        return 1 if total else 0
    if problems:
        print("render_golden: nothing written", file=sys.stderr)
        return 1
    args.output.write_bytes(gzip_bytes(("\n".join(lines) + "\n").encode("utf-8")))
    print(f"wrote {len(lines)} cases to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
