"""``adapter/settings.py``: one settings model, three sources: flags > environment > config file >
defaults, comma lists, and what is refused (through the CLI, exit code 2 with one line)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapter.cli import main
from tests.adapter.helpers import parse_serve

WORKER = ["--worker-address", "http://127.0.0.1:21002"]


pytestmark = pytest.mark.usefixtures("clean_env")


def write_config(tmp_path: Path, table: dict[str, object], suffix: str = ".toml") -> Path:
    path = tmp_path / f"adapter{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(table))
    else:
        lines = [f"{key} = {json.dumps(value)}" for key, value in table.items()]
        path.write_text("\n".join(lines) + "\n")
    return path


def test_defaults() -> None:
    settings = parse_serve(*WORKER)
    assert settings.host == "127.0.0.1"  # loopback unless told otherwise
    assert settings.port == 8100
    assert settings.api_key is None
    assert settings.log_format == "text"
    assert settings.standalone


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_precedence_flag_over_env_over_file_over_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    config = write_config(
        tmp_path,
        {"port": 9001, "heartbeat_interval": 7.0, "log_level": "debug", "max_body_bytes": 1000},
        suffix,
    )
    monkeypatch.setenv("FASTCHAT_ADAPTER_PORT", "9002")
    monkeypatch.setenv("FASTCHAT_ADAPTER_HEARTBEAT_INTERVAL", "8")
    settings = parse_serve(*WORKER, "--config", str(config), "--port", "9003")
    assert settings.port == 9003  # flag beats env and file
    assert settings.heartbeat_interval == 8.0  # env beats file
    assert settings.log_level == "debug"  # file beats default
    assert settings.max_body_bytes == 1000
    assert settings.shutdown_grace == 30.0  # default


def test_config_file_table_and_dashes(tmp_path: Path) -> None:
    path = tmp_path / "adapter.toml"
    path.write_text(
        '[fastchat_adapter]\nworker-address = "http://a:1,http://b:2"\nregister-service = true\n'
    )
    settings = parse_serve("--config", str(path))
    assert settings.worker_address == ["http://a:1", "http://b:2"]
    assert settings.register_service is True


def test_comma_lists_from_every_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flags = parse_serve(
        "--worker-address", "http://a:1/, http://b:2", "--worker-address", "http://c:3"
    )
    assert flags.worker_address == ["http://a:1", "http://b:2", "http://c:3"]

    monkeypatch.setenv("FASTCHAT_ADAPTER_CONTROLLER_ADDRESS", "http://x:8000,http://y:8000/")
    monkeypatch.setenv("FASTCHAT_ADAPTER_MODEL_NAMES", "m1, m2")
    env = parse_serve(*WORKER)
    assert env.controller_address == ["http://x:8000", "http://y:8000"]
    assert env.model_names == ["m1", "m2"]
    assert not env.standalone

    config = write_config(tmp_path, {"embedding_worker_address": ["http://e:1", "http://f:2"]})
    assert parse_serve("--config", str(config)).embedding_worker_address == [
        "http://e:1",
        "http://f:2",
    ]


def test_invalid_value_in_config_file_names_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, {"log_format": "xml"})
    assert main(["serve", *WORKER, "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--log-format" in err


def test_unknown_key_in_config_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, {"prot": 1})
    assert main(["serve", *WORKER, "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "prot" in err


def test_missing_upstream_and_missing_config_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--worker-address" in err
    assert main(["serve", *WORKER, "--config", str(tmp_path / "absent.toml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "absent.toml" in err


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        ([], ["no upstream", "--worker-address"]),
        (
            ["--worker-address", "http://w:1", "--embedding-worker-address", "http://w:1/"],
            ["http://w:1", "both", "--embedding-worker-address"],
        ),
    ],
)
def test_inconsistent_upstreams_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], words: list[str]
) -> None:
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert all(word in err for word in words), err


# --- say what is wrong, at once (issue 11) ----------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "option", "words"),
    [
        (["--worker-address", "127.0.0.1:21002"], "--worker-address", ["not an http(s) URL"]),
        (
            [*WORKER, "--embedding-worker-address", "http://ok:1,ftp://e:2"],
            "--embedding-worker-address",
            ["ftp://e:2"],
        ),
        ([*WORKER, "--controller-address", "dbgpt-controller:8000"], "--controller-address", []),
        (
            [*WORKER, "--fastchat-controller-address", "c:21001"],
            "--fastchat-controller-address",
            [],
        ),
        ([*WORKER, "--controller-address", "http://c:port"], "--controller-address", []),
        ([*WORKER, "--register-host", "http://10.0.0.9"], "--register-host", ["bare host"]),
        ([*WORKER, "--register-host", "10.0.0.9:8100"], "--register-host", ["bare host"]),
    ],
)
def test_bad_address_exits_2_naming_the_option(
    capsys: pytest.CaptureFixture[str], argv: list[str], option: str, words: list[str]
) -> None:
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert option in err and all(word in err for word in words), err


@pytest.mark.parametrize("host", ["10.0.0.9", "adapter", "fastchat_adapter.svc.local", "::1"])
def test_register_host_takes_a_bare_host_or_ip(host: str) -> None:
    settings = parse_serve(*WORKER, "--register-host", host)
    assert settings.advertised_host == host


def test_env_list_as_json_is_a_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTCHAT_ADAPTER_WORKER_ADDRESS", '["http://a:1", "http://b:2/"]')
    assert parse_serve().worker_address == ["http://a:1", "http://b:2"]
    monkeypatch.setenv("FASTCHAT_ADAPTER_CONTROLLER_ADDRESS", '["http://c:8000"')
    assert main(["serve"]) == 2  # a broken JSON list is an error, not a URL "[http://c:8000"


def test_bad_toml_names_the_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "adapter.toml"
    path.write_text('port = 8100\nhost = \nworker_address = "http://a:1"\n')
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "line 2" in err, err


def test_bad_json_names_the_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "adapter.json"
    path.write_text('{\n  "port": 8100,\n  "host": ,\n}\n')
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}:3" in err, err


@pytest.mark.parametrize("name", ["adapter.yaml", "adapter.yml", "adapter"])
def test_config_file_other_than_toml_or_json_is_refused_by_extension(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    path = tmp_path / name
    path.write_text("port = 8100\n")  # valid TOML: it must not be read as such
    assert main(["serve", *WORKER, "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and ".toml or .json" in err, err


def test_unknown_key_names_the_key_and_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, {"workers": "http://a:1", "port": 8100})
    assert main(["serve", *WORKER, "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err == f"fastchat-adapter: unknown key `workers` in {config}\n"
