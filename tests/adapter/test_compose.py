"""compose.yaml and the Dockerfiles, checked without a Docker engine.

The compose file is validated against the Compose Specification's JSON schema, as vendored by
the check-jsonschema package (a test dependency), then against our own rules: every service has
a healthcheck, every dependency waits for service_healthy, and the adapter's command is valid
for the adapter's own CLI. Every service command is compared with the argument list the interop
suite builds for the same program (`tests.interop.stacks.interop_commands`): same program, same
flags; only hosts, ports, URLs, paths and timing intervals may differ.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import sys
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema.validators import validator_for
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from adapter.cli import build_parser, settings_from_args
from tests.interop.stacks import (
    ADAPTER_HEARTBEAT_INTERVAL_S,
    DBGPT_HEARTBEAT_TIMEOUT_S,
    dbgpt_toml,
    dbgpt_webserver_toml,
    interop_commands,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
SERVICES = {
    "fastchat-controller",
    "fastchat-model-worker",
    "fastchat-embedding-worker",
    "adapter",
    "dbgpt-controller",
    "dbgpt-apiserver",
    "dbgpt-webserver",
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def compose_schema() -> dict[str, Any]:
    vendored = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(vendored.read_text(encoding="utf-8"))
    assert isinstance(schema, dict)
    return schema


def test_compose_file_validates_against_the_compose_spec(compose: dict[str, Any]) -> None:
    schema = compose_schema()
    validator = validator_for(schema)(schema)  # the draft the schema declares (2020-12 now)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []


def test_the_schema_catches_mistakes(compose: dict[str, Any]) -> None:
    """A guard against a schema that accepts anything."""
    broken = json.loads(json.dumps(compose))
    broken["services"]["adapter"]["depends_on"]["dbgpt-controller"]["condition"] = "healthy"
    broken["services"]["adapter"]["healthcheck"]["intervall"] = "5s"
    schema = compose_schema()
    assert len(list(validator_for(schema)(schema).iter_errors(broken))) >= 2


def test_the_migration_topology(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == SERVICES


def test_every_service_has_a_healthcheck(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        check = service.get("healthcheck")
        assert check and not check.get("disable"), name
        assert check["test"][0] == "CMD", name  # exec form: no shell needed in slim images
        assert {"interval", "timeout", "retries", "start_period"} <= set(check), name


def test_dependencies_wait_for_healthy_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        for dependency, spec in service.get("depends_on", {}).items():
            assert dependency in services, (name, dependency)
            assert spec == {"condition": "service_healthy"}, (name, dependency)
    assert set(services["adapter"]["depends_on"]) == {
        "fastchat-model-worker",
        "fastchat-embedding-worker",
        "dbgpt-controller",
    }
    assert "fastchat-controller" in services["fastchat-model-worker"]["depends_on"]
    assert "fastchat-controller" in services["fastchat-embedding-worker"]["depends_on"]
    assert "adapter" in services["dbgpt-apiserver"]["depends_on"]


def _flags(argv: list[str]) -> dict[str, str]:
    return {a: b for a, b in zip(argv, [*argv[1:], ""], strict=True) if a.startswith("--")}


def _interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` with every variable unset: the default."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def _program(argv: list[str]) -> list[str]:
    """The words before the first flag: the program (and `-m module` / subcommand)."""
    head = []
    for word in argv:
        if word.startswith("-") and word != "-m":
            break
        head.append(word)
    return head


# Flags whose values are per deployment: where things listen and are reached, files, timing.
PER_HOST_FLAGS = {
    "--host", "--port", "--register-host", "--worker-address", "--embedding-worker-address",
    "--controller-address", "--model-path", "--heartbeat-interval", "--status-interval", "-c",
}  # fmt: skip


def _compose_argv(name: str, service: dict[str, Any]) -> list[str]:
    argv = [_interpolate(str(word)) for word in service["command"]]
    if name == "adapter":  # the image's ENTRYPOINT is the console script
        argv = ["fastchat-adapter", *argv]
    return argv


def test_every_service_has_an_interop_counterpart(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) <= set(interop_commands())


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_command_matches_the_interop_suite(compose: dict[str, Any], name: str) -> None:
    """Same program, same set of flags, same values for every flag that is not per host."""
    ours = _compose_argv(name, compose["services"][name])
    theirs = interop_commands()[name]
    assert _program(ours) == _program(theirs)
    assert set(_flags(ours)) == set(_flags(theirs))
    assert len(ours) == len(theirs), "a stray word (or a flag without its value)"
    fixed_ours = {k: v for k, v in _flags(ours).items() if k not in PER_HOST_FLAGS}
    fixed_theirs = {k: v for k, v in _flags(theirs).items() if k not in PER_HOST_FLAGS}
    assert fixed_ours == fixed_theirs
    if "--model-path" in _flags(ours):  # the folder name picks FastChat's model adapter
        ours_dir = Path(_flags(ours)["--model-path"]).name
        assert ours_dir == Path(_flags(theirs)["--model-path"]).name


def test_dbgpt_config_has_the_interop_suite_keys(compose: dict[str, Any]) -> None:
    """One TOML, same tables and keys as the one the suite writes (docs/peers.md §2.2)."""
    ours = tomllib.loads(compose["configs"]["dbgpt-cluster"]["content"])
    theirs = tomllib.loads(
        dbgpt_toml(
            controller_port=1,
            heartbeat_interval_secs=5,
            heartbeat_timeout_secs=15,
            api_port=2,
            controller_addr="http://controller:1",
        )
    )

    def shape(table: dict[str, Any]) -> dict[str, Any]:
        return {k: shape(v) if isinstance(v, dict) else None for k, v in table.items()}

    assert shape(ours) == shape(theirs)


def test_adapter_heartbeats_well_within_the_controller_timeout(compose: dict[str, Any]) -> None:
    """Timing differs by design, but in both places the adapter heartbeats at least three
    times per DB-GPT heartbeat timeout (docs/peers.md §2.5)."""
    command = compose["services"]["adapter"]["command"]
    settings = settings_from_args(build_parser().parse_args(command))
    config = tomllib.loads(compose["configs"]["dbgpt-cluster"]["content"])
    timeout = config["service"]["model"]["controller"]["heartbeat_timeout_secs"]
    assert 3 * settings.heartbeat_interval <= timeout
    assert 3 * ADAPTER_HEARTBEAT_INTERVAL_S <= DBGPT_HEARTBEAT_TIMEOUT_S


def test_adapter_command_is_valid_for_the_adapter_cli(compose: dict[str, Any]) -> None:
    command = compose["services"]["adapter"]["command"]
    settings = settings_from_args(build_parser().parse_args(command))
    assert settings.worker_address == ["http://fastchat-model-worker:21002"]
    assert settings.embedding_worker_address == ["http://fastchat-embedding-worker:21003"]
    assert settings.controller_address == ["http://dbgpt-controller:8000"]
    assert f"http://{settings.advertised_host}:{settings.port}" == "http://adapter:8100"
    healthcheck = " ".join(compose["services"]["adapter"]["healthcheck"]["test"])
    assert f":{settings.port}/readyz" in healthcheck


def test_peer_commands_use_the_interop_programs_and_flags(compose: dict[str, Any]) -> None:
    """Same programs and flags as tests/interop (docs/peers.md §2.3, §3.4); values are per host."""
    services = compose["services"]
    controller = services["fastchat-controller"]["command"]
    assert controller[:3] == ["python", "-m", "fastchat.serve.controller"]
    assert set(_flags(controller)) == {"--host", "--port"}

    for name in ("fastchat-model-worker", "fastchat-embedding-worker"):
        worker = services[name]["command"]
        assert worker[:3] == ["python", "-m", "fastchat.serve.model_worker"]
        flags = _flags(worker)
        assert set(flags) == {
            "--host", "--port", "--worker-address", "--controller-address", "--model-path",
            "--model-names", "--device",
        }  # fmt: skip
        assert flags["--worker-address"] == f"http://{name}:{flags['--port']}"
        assert flags["--controller-address"].endswith(":21001")
        assert flags["--device"] == "cpu"
    embedding = _flags(services["fastchat-embedding-worker"]["command"])
    assert "e5-" in _interpolate(embedding["--model-path"])  # selects FastChat's E5 adapter

    config = tomllib.loads(compose["configs"]["dbgpt-cluster"]["content"])
    model = config["service"]["model"]
    for name, kind in (("dbgpt-controller", "controller"), ("dbgpt-apiserver", "apiserver")):
        command = services[name]["command"]
        assert command == ["dbgpt", "start", kind, "-c", "/etc/dbgpt/cluster.toml"]
        assert services[name]["configs"][0]["target"] == "/etc/dbgpt/cluster.toml"
    assert (
        model["api"]["controller_addr"] == f"http://dbgpt-controller:{model['controller']['port']}"
    )
    published = services["dbgpt-apiserver"]["ports"][0]
    assert published == f"127.0.0.1:{model['api']['port']}:{model['api']['port']}"


def _webserver_config(compose: dict[str, Any]) -> dict[str, Any]:
    return tomllib.loads(_interpolate(compose["configs"]["dbgpt-webserver"]["content"]))


def test_webserver_config_has_the_e2e_suite_keys(compose: dict[str, Any]) -> None:
    """Same tables and keys as the TOML the e2e suite runs DB-GPT's app with."""
    theirs = tomllib.loads(
        dbgpt_webserver_toml(
            port=1, controller_addr="http://c:1", home="/h", default_llm="m", default_embedding="e"
        )
    )

    def shape(table: dict[str, Any]) -> dict[str, Any]:
        return {k: shape(v) if isinstance(v, dict) else None for k, v in table.items()}

    assert shape(_webserver_config(compose)) == shape(theirs)


def test_webserver_uses_the_cluster_and_the_fastchat_models(compose: dict[str, Any]) -> None:
    services = compose["services"]
    web = _webserver_config(compose)["service"]["web"]
    cluster = tomllib.loads(compose["configs"]["dbgpt-cluster"]["content"])["service"]["model"]
    # No model workers of its own; models and embeddings from the DB-GPT controller.
    assert web["light"] is True and web["remote_embedding"] is True
    assert web["controller_addr"] == f"http://dbgpt-controller:{cluster['controller']['port']}"
    service = services["dbgpt-webserver"]
    assert set(service["depends_on"]) == {"dbgpt-controller", "adapter"}
    assert service["ports"] == [f"127.0.0.1:{web['port']}:{web['port']}"]
    assert f":{web['port']}/" in service["healthcheck"]["test"][3]
    models = _webserver_config(compose)["models"]
    worker = _flags([_interpolate(w) for w in services["fastchat-model-worker"]["command"]])
    embedder = _flags([_interpolate(w) for w in services["fastchat-embedding-worker"]["command"]])
    assert models["default_llm"] == worker["--model-names"]
    assert models["default_embedding"] == embedder["--model-names"]
    # Metadata and vectors in the volume mounted at the image's DBGPT_HOME.
    home = service["volumes"][0].split(":")[1]
    dockerfile = (ROOT / "docker" / "dbgpt-app.Dockerfile").read_text()
    assert f"DBGPT_HOME={home}" in dockerfile
    database = _webserver_config(compose)["service"]["web"]["database"]
    assert database["path"] == f"{home}/pilot/meta_data/dbgpt.db"
    assert _webserver_config(compose)["rag"]["storage"]["vector"]["persist_path"].startswith(home)


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = path.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def test_adapter_dockerfile() -> None:
    steps = _instructions(ROOT / "Dockerfile")
    assert steps[0] == ("FROM", "python:3.11-slim")
    user = [arg for op, arg in steps if op == "USER"]
    assert user and user[-1] not in ("root", "0")
    run = " ".join(arg for op, arg in steps if op == "RUN")
    assert "pip install --constraint adapter-constraints.txt ." in run and "useradd" in run
    copied = [shlex.split(arg) for op, arg in steps if op == "COPY"]
    assert ["docker/adapter-constraints.txt", "./"] in copied
    assert "!docker/adapter-constraints.txt" in (ROOT / ".dockerignore").read_text().split()
    assert ("EXPOSE", "8100") in steps
    healthcheck = next(arg for op, arg in steps if op == "HEALTHCHECK")
    assert "/readyz" in healthcheck and "curl" not in healthcheck
    exec_form = json.loads(healthcheck[healthcheck.index("CMD") + 3 :])
    assert exec_form[:2] == ["python", "-c"]
    compile(exec_form[2], "healthcheck", "exec")  # the one-liner is valid Python
    assert json.loads(next(arg for op, arg in steps if op == "ENTRYPOINT")) == ["fastchat-adapter"]


@pytest.mark.parametrize(
    "name", ["fastchat.Dockerfile", "dbgpt.Dockerfile", "dbgpt-app.Dockerfile"]
)
def test_peer_dockerfiles_install_the_interop_lock_files(name: str) -> None:
    steps = _instructions(ROOT / "docker" / name)
    assert steps[0] == ("FROM", "python:3.11-slim")
    copied = [shlex.split(arg)[0] for op, arg in steps if op == "COPY"]
    assert all((ROOT / path).is_file() for path in copied), copied
    assert any(path.startswith("tests/interop/locks/") for path in copied)
    assert [arg for op, arg in steps if op == "USER"][-1] != "root"


def test_compose_healthchecks_are_valid_python(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        test = service["healthcheck"]["test"]
        assert test[1:3] == ["python", "-c"], name
        compile(test[3], f"{name} healthcheck", "exec")


def _runtime_requirements(distribution: str) -> list[Requirement]:
    """What ``distribution`` (as installed here) needs at run time on this Python, no extras."""
    requirements = [Requirement(text) for text in metadata.requires(distribution) or []]
    return [r for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})]


def test_adapter_image_pins_every_runtime_dependency() -> None:
    """The image installs docker/adapter-constraints.txt: one exact pin for each dependency in
    pyproject (within its range), and for each dependency of a pinned package. The latter is
    read from the package as installed here, so only where that is the pinned version: a newer
    release in a fresh test environment does not make the image's lock wrong."""
    pins: dict[str, str] = {}
    for line in (ROOT / "docker" / "adapter-constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not an exact pin: {line}"
            pins[canonicalize_name(name)] = version
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for requirement in map(Requirement, declared):
        if requirement.marker is None or requirement.marker.evaluate():  # the image's 3.11
            pin = pins.get(canonicalize_name(requirement.name))
            assert pin and requirement.specifier.contains(pin), (str(requirement), pin)
    checked = 0
    for name, version in pins.items():
        with contextlib.suppress(metadata.PackageNotFoundError):
            if metadata.version(name) == version:
                checked += 1
                for requirement in _runtime_requirements(name):
                    assert canonicalize_name(requirement.name) in pins, (name, str(requirement))
    assert checked, "no pinned version is installed here: regenerate the file (see its header)"
