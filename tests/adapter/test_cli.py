"""``adapter/cli.py``: the ``serve`` flags generated from the settings model (``--help``, boolean
``--no-`` flags, choices), its one-line errors with exit code 2, and ``--version``. (What the
settings are and where they come from: ``test_settings.py``; the ``check`` command:
``tools/test_check.py``; ``--print-config``: ``test_startup.py``.)"""

from __future__ import annotations

import pytest

from adapter import __version__
from adapter.cli import main
from adapter.settings import ENV_PREFIX, Settings
from tests.adapter.helpers import parse_serve

pytestmark = pytest.mark.usefixtures("clean_env")

WORKER = ["--worker-address", "http://127.0.0.1:21002"]


def test_boolean_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_serve(*WORKER, "--register-service").register_service is True
    monkeypatch.setenv("FASTCHAT_ADAPTER_REGISTER_SERVICE", "true")
    assert parse_serve(*WORKER, "--no-register-service").register_service is False


@pytest.mark.parametrize(
    ("argv", "env", "option"),
    [
        (["--port", "0"], {}, "--port"),
        (["--port", "abc"], {}, "--port"),
        (["--heartbeat-interval", "-1"], {}, "--heartbeat-interval"),
        ([], {"FASTCHAT_ADAPTER_MAX_BODY_BYTES": "lots"}, "--max-body-bytes"),
        ([], {"FASTCHAT_ADAPTER_DEFAULT_TEMPERATURE": "3"}, "--default-temperature"),
    ],
)
def test_invalid_setting_exits_2_with_one_line_naming_it(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    env: dict[str, str],
    option: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["serve", *WORKER, *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert option in err
    assert ENV_PREFIX + option[2:].replace("-", "_").upper() in err


def test_bad_choice_on_the_command_line_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", *WORKER, "--log-format", "xml"])
    assert exc.value.code == 2
    assert "--log-format" in capsys.readouterr().err


def test_serve_help_lists_every_setting_with_default_and_env(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in text
        assert ENV_PREFIX + name.upper() in text
    assert "[default: '127.0.0.1'; env FASTCHAT_ADAPTER_HOST]" in text
    assert "[default: 8100; env FASTCHAT_ADAPTER_PORT]" in text
    assert text.count("[default:") >= len(Settings.model_fields)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"fastchat-adapter {__version__}\n"
