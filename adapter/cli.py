"""``fastchat-adapter`` (also ``python -m adapter``): serve, reference-worker, check.

The ``serve`` flags are generated from the one settings model, so ``--help`` always lists every
option with its default and environment variable, and nothing can drift between the two.
Exit statuses are ``ExitCode`` (the README lists them).
"""

from __future__ import annotations

import argparse
import sys
import typing
from collections.abc import Sequence
from enum import IntEnum
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from adapter import __version__
from adapter.settings import ENV_PREFIX, ConfigFileError, Settings, load_settings


class ExitCode(IntEnum):
    """Exit statuses of every command; documented in the README's "Exit codes"."""

    OK = 0  # serve: a clean shutdown (SIGTERM/SIGINT); check: every check passed
    FAILED = 1  # check: a check failed; serve: an unexpected error (a traceback is printed)
    USAGE = 2  # a bad flag, setting or config file: one line on stderr names it
    CANNOT_START = 3  # serve: the port cannot be bound, or the startup failed; nothing registered


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _choices(annotation: Any) -> list[str] | None:
    if typing.get_origin(annotation) is typing.Literal:
        return [str(a) for a in typing.get_args(annotation)]
    return None


def _default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return "none"
    return "none" if field.default is None else repr(field.default)


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, help="TOML (.toml) or JSON (.json) file of settings (lowest rank)."
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="Print the effective settings as a TOML config file (secrets masked) and exit.",
    )
    for name, field in Settings.model_fields.items():
        annotation = field.annotation
        env = ENV_PREFIX + name.upper()
        help_text = f"{field.description or ''} [default: {_default_text(field)}; env {env}]"
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is list:
            kwargs["action"] = "append"
            kwargs["metavar"] = "A[,B]"
        else:
            choices = _choices(annotation)
            if choices:
                kwargs["choices"] = choices
        parser.add_argument(_flag(name), **kwargs)


def settings_from_args(ns: argparse.Namespace) -> Settings:
    values = {k: v for k, v in vars(ns).items() if k in Settings.model_fields}
    return load_settings(values, getattr(ns, "config", None))


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming the option, whichever source the bad value came from."""
    first = exc.errors()[0]
    loc = [str(part) for part in first.get("loc", ())]
    where = f"{_flag(loc[0])} ({ENV_PREFIX}{loc[0].upper()})" if loc else ""
    message = first.get("msg", "invalid value")
    return f"invalid setting {where}: {message}" if where else f"invalid settings: {message}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastchat-adapter",
        description="Serve a DB-GPT model cluster from existing FastChat workers.",
    )
    parser.add_argument("--version", action="version", version=f"fastchat-adapter {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="Run the adapter (the main job).")
    add_settings_arguments(serve)

    from adapter.tools import reference_worker

    worker = commands.add_parser(
        "reference-worker", help="Run a FastChat-protocol worker with a scripted model."
    )
    reference_worker.add_reference_worker_arguments(worker)

    from adapter.tools import check

    conformance = commands.add_parser(
        "check", help="Conformance check of a FastChat worker or a DB-GPT worker endpoint."
    )
    check.add_check_arguments(conformance)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command == "serve":
        try:
            settings = settings_from_args(ns)
        except ValidationError as exc:
            print(f"fastchat-adapter: {describe_validation_error(exc)}", file=sys.stderr)
            return ExitCode.USAGE
        except ConfigFileError as exc:
            print(f"fastchat-adapter: {exc}", file=sys.stderr)
            return ExitCode.USAGE
        except (OSError, ValueError) as exc:
            print(f"fastchat-adapter: invalid settings: {exc}", file=sys.stderr)
            return ExitCode.USAGE
        if ns.print_config:
            from adapter.startup import render_config

            print(render_config(settings), end="")
            return ExitCode.OK
        from adapter.server import serve as run_server

        return run_server(settings)
    if ns.command == "check":
        from adapter.tools import check

        return check.run_check(ns)
    if ns.command == "reference-worker":
        from adapter.tools import reference_worker

        config = reference_worker.config_from_args(ns)
        reference_worker.serve(config, ns.host, ns.port)
        return ExitCode.OK
    parser.error(f"unknown command {ns.command}")
    return ExitCode.USAGE


if __name__ == "__main__":
    sys.exit(main())
