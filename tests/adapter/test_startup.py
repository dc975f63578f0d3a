"""``adapter/startup.py``: the registration mode, and ``serve --print-config`` (through the CLI):
the effective settings as a config file that reads back into the same settings, secrets masked.
(The startup line as the real CLI logs it: ``test_server.py``.)"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from adapter.cli import ExitCode, main
from adapter.settings import ENV_PREFIX, Settings
from adapter.startup import is_secret, registration_mode, startup_line
from tests.adapter.helpers import parse_serve

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

pytestmark = pytest.mark.usefixtures("clean_env")

W = "http://127.0.0.1:21002"


@pytest.mark.parametrize(
    ("values", "mode"),
    [
        ({}, "standalone"),
        ({"controller_address": ["http://c:1"]}, "registered, fan-out"),
        ({"controller_address": ["http://c:1", "http://d:1"]}, "registered, fan-out"),
        (
            {"controller_address": ["http://c:1", "http://d:1"], "controller_mode": "failover"},
            "registered, failover",
        ),
        # One controller: failover has nothing to fail over to, and the registrar fans out.
        (
            {"controller_address": ["http://c:1"], "controller_mode": "failover"},
            "registered, fan-out",
        ),
    ],
)
def test_registration_mode(values: dict[str, object], mode: str) -> None:
    settings = Settings(worker_address=[W], **values)  # type: ignore[arg-type]
    assert registration_mode(settings) == mode
    assert f"| mode {mode} |" in startup_line(settings)


def test_secrets_are_named_by_their_words() -> None:
    assert is_secret("api_key") and is_secret("controller_token")
    assert not is_secret("keepalive_interval") and not is_secret("max_body_bytes")


def test_print_config_is_a_config_file_of_the_effective_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "adapter.toml"
    config.write_text('heartbeat_interval = 7.0\nlog_level = "debug"\n')
    monkeypatch.setenv(
        "FASTCHAT_ADAPTER_CONTROLLER_ADDRESS", '["http://c1:8000", "http://c2:8000"]'
    )
    monkeypatch.setenv("FASTCHAT_ADAPTER_API_KEY", "s3cret-value")
    argv = ["--worker-address", W, "--port", "9100", "--config", str(config)]
    effective = parse_serve(*argv)
    assert main(["serve", *argv, "--print-config"]) == ExitCode.OK
    out = capsys.readouterr().out
    assert "s3cret" not in out
    assert "# api_key is set (masked)" in out and "# register_host is unset" in out
    table = tomllib.loads(out)["fastchat_adapter"]
    assert table["port"] == 9100 and table["heartbeat_interval"] == 7.0  # flag, file
    assert table["controller_address"] == ["http://c1:8000", "http://c2:8000"]  # environment
    assert set(table) | {"api_key", "register_host"} >= set(Settings.model_fields) - {
        name for name in Settings.model_fields if getattr(effective, name) is None
    }
    # Read back as a config file, it gives the same settings but the secret.
    printed = tmp_path / "printed.toml"
    printed.write_text(out)
    for name in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)
    assert parse_serve("--config", str(printed)) == effective.model_copy(update={"api_key": None})


def test_print_config_refuses_bad_settings_like_serve(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--worker-address", "localhost:1", "--print-config"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "--worker-address" in captured.err
