"""``fastchat-adapter check URL``: conformance check of one worker endpoint.

``--kind fastchat`` (default, ``check_fastchat.py``) checks a FastChat worker the way the adapter
uses it; ``--kind dbgpt`` (``check_dbgpt.py``) checks a DB-GPT worker API endpoint such as the
adapter itself. Prints a PASS/FAIL table; exits 0 if all passed, 1 on any failure, 2 on a usage
error (bad URL, no model to check).
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

import httpx

from adapter.tools.check_common import Endpoint, Run, UsageError
from adapter.tools.check_dbgpt import check_dbgpt
from adapter.tools.check_fastchat import check_fastchat


def render_table(url: str, kind: str, run: Run, out: TextIO) -> None:
    width = max(len(o.name) for o in run.outcomes)
    print(f"fastchat-adapter check {url} ({kind})", file=out)
    for outcome in run.outcomes:
        print(f"  {outcome.status:4}  {outcome.name:{width}}  {outcome.detail}", file=out)
    counts = {s: sum(o.status == s for o in run.outcomes) for s in ("PASS", "FAIL", "SKIP")}
    print(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped", file=out)


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", help="Worker base URL, e.g. http://127.0.0.1:21002")
    parser.add_argument(
        "--kind",
        choices=["fastchat", "dbgpt"],
        default="fastchat",
        help="fastchat: a FastChat worker; dbgpt: a DB-GPT worker API endpoint.",
    )
    parser.add_argument("--model", help="Model to check (default: the first one served).")
    parser.add_argument(
        "--embeddings",
        nargs="?",
        const="",
        default=None,
        metavar="MODEL",
        help="Also check embeddings (optionally of another model).",
    )
    parser.add_argument(
        "--embeddings-only",
        action="store_true",
        help="Check an embedding worker: no generation requests.",
    )
    parser.add_argument("--api-key", help="Bearer token for a DB-GPT endpoint that needs one.")
    parser.add_argument("--timeout", type=float, default=60.0, help="Seconds per request.")


def run_check(ns: argparse.Namespace, out: TextIO | None = None) -> int:
    url = str(ns.url).rstrip("/")
    if not url.startswith(("http://", "https://")):
        print(f"fastchat-adapter check: not an http(s) URL: {ns.url}", file=sys.stderr)
        return 2
    if not ns.timeout > 0:  # also NaN; httpx would raise deep inside the first request
        print(f"fastchat-adapter check: --timeout must be > 0, not {ns.timeout}", file=sys.stderr)
        return 2
    only: bool = ns.embeddings_only
    embeddings = "" if only and ns.embeddings is None else ns.embeddings
    headers = {"authorization": f"Bearer {ns.api_key}"} if ns.api_key else {}
    with httpx.Client(timeout=ns.timeout, headers=headers, trust_env=False) as client:
        checks = check_fastchat if ns.kind == "fastchat" else check_dbgpt
        try:
            run = checks(Endpoint(url, client), ns.model, embeddings, embeddings_only=only)
        except UsageError as exc:
            print(f"fastchat-adapter check: {exc}", file=sys.stderr)
            return 2
    render_table(url, ns.kind, run, out or sys.stdout)
    return 0 if run.ok else 1
