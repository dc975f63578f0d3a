"""deploy/: the example config, the Kubernetes example, the systemd unit, the Prometheus config
and rules and the Grafana dashboard, each checked offline against what the adapter really does.

- Kubernetes: the manifest is validated against the Kubernetes OpenAPI schemas shipped by the
  ``kubernetes-validate`` package (strict: unknown fields are errors), then its adapter container
  is read back into the adapter's own settings.
- systemd: ``systemd-analyze verify`` when the machine has it, and always a parse of the unit
  whose ExecStart is run through the adapter's own argument parser.
- Prometheus and Grafana: every metric name an expression uses is one ``/metrics`` exports, and
  every label it selects or groups by is one of that metric's labels.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from adapter.cli import ExitCode, build_parser, settings_from_args
from adapter.metrics import Metrics
from adapter.settings import ENV_PREFIX, Settings, load_settings, read_config_file

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
# The oldest Kubernetes release still in wide use, and the newest the package knows.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


# --- the example config -------------------------------------------------------------------


def test_example_config_loads_into_the_settings_it_says() -> None:
    path = DEPLOY / "adapter.example.toml"
    table = read_config_file(path)  # refuses unknown keys
    settings = load_settings({}, path)
    assert settings.worker_address == ["http://127.0.0.1:21002"]
    assert settings.embedding_worker_address == ["http://127.0.0.1:21003"]
    assert settings.controller_address == ["http://dbgpt-controller:8000"]
    assert settings.advertised_host == "10.0.0.9" and not settings.standalone
    assert "api_key" not in table  # secrets belong in the environment
    # Every value in the file is the one in force (nothing silently ignored).
    for key, value in table.items():
        assert getattr(settings, key) == value, key


# --- Kubernetes -----------------------------------------------------------------------------


def _manifests() -> list[dict[str, Any]]:
    path = DEPLOY / "kubernetes" / "fastchat-worker-with-adapter.yaml"
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_example_is_valid_against_the_schemas(version: str) -> None:
    for manifest in _manifests():
        kubernetes_validate.validate(manifest, version, strict=True)


def test_kubernetes_validation_catches_a_mistake() -> None:
    """The validation above can fail: a misspelt field is an error in strict mode."""
    [deployment] = _manifests()
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][1]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def _env_settings(container: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The container's settings: its args through the CLI parser, its env as the environment
    (the downward API's status.podIP stands in as 10.1.2.3)."""
    for name in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)
    for variable in container["env"]:
        assert variable["name"].startswith(ENV_PREFIX)
        assert variable["name"][len(ENV_PREFIX) :].lower() in Settings.model_fields
        if "valueFrom" in variable:
            assert variable["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
            monkeypatch.setenv(variable["name"], "10.1.2.3")
        else:
            monkeypatch.setenv(variable["name"], variable["value"])
    return settings_from_args(build_parser().parse_args(container["args"]))


def test_kubernetes_sidecar_wiring(monkeypatch: pytest.MonkeyPatch) -> None:
    [deployment] = _manifests()
    pod = deployment["spec"]["template"]
    worker, adapter = pod["spec"]["containers"]
    settings = _env_settings(adapter, monkeypatch)
    # Registered under the Pod's IP (downward API) and the adapter's port.
    assert settings.advertised_host == "10.1.2.3" and not settings.standalone
    # The worker on localhost, at the port and address it was started with.
    flags = dict(zip(worker["command"], [*worker["command"][1:], ""], strict=True))
    assert settings.worker_address == [f"http://127.0.0.1:{flags['--port']}"]
    assert flags["--worker-address"] == settings.worker_address[0]
    assert "--no-register" in worker["command"]  # no FastChat controller in the Pod
    # Probes and the metrics port on the adapter's one port.
    [port] = adapter["ports"]
    assert port["containerPort"] == settings.port and settings.host == "0.0.0.0"
    assert adapter["livenessProbe"]["httpGet"] == {"path": "/livez", "port": port["name"]}
    assert adapter["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.port)
    assert annotations["prometheus.io/path"] == "/metrics"
    # SIGTERM: deregister, then drain for shutdown_grace; the Pod must wait for that.
    assert pod["spec"]["terminationGracePeriodSeconds"] > settings.shutdown_grace
    assert pod["spec"]["securityContext"]["runAsUser"] == _image_user()


def _image_user() -> int:
    users = re.findall(r"^USER (\d+)$", (ROOT / "Dockerfile").read_text(), re.M)
    return int(users[-1])


# --- systemd --------------------------------------------------------------------------------

UNIT = DEPLOY / "systemd" / "fastchat-adapter.service"


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def test_systemd_unit_runs_the_adapter_and_respects_its_exit_codes() -> None:
    unit = _unit()
    assert set(unit.sections()) == {"Unit", "Service", "Install"}
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"])
    assert Path(argv[0]).name == "fastchat-adapter" and argv[1] == "serve"
    ns = build_parser().parse_args(argv[1:])  # the flags exist (argparse exits otherwise)
    assert ns.config == Path("/etc/fastchat-adapter/adapter.toml")
    # The shipped example is what that file is meant to start from.
    assert load_settings({}, DEPLOY / "adapter.example.toml")
    assert service["KillSignal"] == "SIGTERM"
    grace = Settings.model_fields["shutdown_grace"].default
    assert int(service["TimeoutStopSec"]) > grace
    # Settings errors and a port in use do not fix themselves by restarting.
    no_restart = {int(code) for code in service["RestartPreventExitStatus"].split()}
    assert no_restart == {ExitCode.USAGE, ExitCode.CANNOT_START}
    assert unit["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify wants the ExecStart binary to exist: point it at a stand-in at the same name.
    binary = tmp_path / "bin" / "fastchat-adapter"
    binary.parent.mkdir()
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    text = UNIT.read_text().replace("/opt/fastchat-adapter/bin/fastchat-adapter", str(binary))
    unit = tmp_path / "fastchat-adapter.service"
    unit.write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = [line for line in done.stderr.splitlines() if unit.name in line]
    assert done.returncode == 0 and not lines, done.stderr


# --- Prometheus and Grafana -------------------------------------------------------------------


def _metric_labels() -> dict[str, set[str]]:
    """Exposed sample name -> its labels (``le`` on histogram buckets)."""
    metrics = Metrics()
    labels: dict[str, set[str]] = {}
    families = {
        wrapper._name: set(wrapper._labelnames)
        for wrapper in vars(metrics).values()
        if isinstance(wrapper, MetricWrapperBase)
    }
    for name in metrics.exposed_names():
        family = next((f for f in families if name.startswith(f)), None)
        extra = {"le"} if name.endswith("_bucket") else set()
        labels[name] = families.get(family, set()) | extra if family else set()
    return labels


# A metric name in PromQL: a word starting with one of the prefixes /metrics uses.
_METRIC = re.compile(r"\b(?:fastchat_adapter|process|python)_[a-zA-Z0-9_]+")
_SELECTOR = re.compile(r"\b((?:fastchat_adapter|process|python)_\w+)\{([^}]*)\}")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
# Labels Prometheus adds at scrape time.
_TARGET_LABELS = {"job", "instance", "pod"}


def check_promql(expr: str) -> None:
    exported = _metric_labels()
    used = _METRIC.findall(expr)
    assert used, f"no adapter metric in {expr!r}"
    for name in used:
        assert name in exported, f"{name} is not exported (in {expr!r})"
    for name, matchers in _SELECTOR.findall(expr):
        for matcher in filter(None, (m.strip() for m in matchers.split(","))):
            label = re.split(r"[=!~]", matcher, maxsplit=1)[0].strip()
            assert label in exported[name] | _TARGET_LABELS, f"{name} has no label {label}"
    known = set().union(*(exported[name] for name in used)) | _TARGET_LABELS
    for grouping in _GROUPING.findall(expr):
        for label in filter(None, (g.strip() for g in grouping.split(","))):
            assert label in known, f"no metric of {expr!r} has label {label}"


def test_promql_check_catches_unknown_names_and_labels() -> None:
    check_promql('sum by (model_name) (rate(fastchat_adapter_requests_total{outcome="ok"}[5m]))')
    for wrong in (
        "fastchat_adapter_time_to_first_frame_seconds_bucket",  # the old name
        'fastchat_adapter_requests_total{model="m"}',  # the old label
        "sum by (controller) (fastchat_adapter_requests_total)",
        "fastchat_adapter_requests",  # a counter is exposed as _total
    ):
        with pytest.raises(AssertionError):
            check_promql(wrong)


def test_prometheus_config_scrapes_the_adapter() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    static = jobs["fastchat-adapter"]
    assert static["metrics_path"] == "/metrics"
    port = Settings.model_fields["port"].default
    assert static["static_configs"][0]["targets"] == [f"127.0.0.1:{port}"]
    pods = jobs["fastchat-adapter-pods"]
    [deployment] = _manifests()
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    keep = pods["relabel_configs"][0]
    assert keep["action"] == "keep" and keep["regex"] == annotations["prometheus.io/scrape"]
    for rules in config["rule_files"]:
        assert (DEPLOY / "prometheus" / rules).is_file()


def test_prometheus_rules_use_only_exported_metrics() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "fastchat-adapter.rules.yml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    assert exprs
    for expr in exprs:
        check_promql(expr)


def test_grafana_dashboard_uses_only_exported_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "fastchat-adapter.json").read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    variables = [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    for expr in exprs + [q.removeprefix("label_values(").removesuffix(")") for q in variables]:
        check_promql(expr.replace("$__rate_interval", "5m"))
    # The vLLM-named request metrics each have a panel.
    text = " ".join(exprs)
    for name in (
        "time_to_first_token_seconds_bucket", "e2e_request_latency_seconds_bucket",
        "num_requests_running", "num_requests_waiting", "prompt_tokens_total",
        "generation_tokens_total", "request_success_total",
    ):  # fmt: skip
        assert f"fastchat_adapter_{name}" in text, name
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
