"""One settings model for the whole process (like uvicorn's Config).

Precedence, highest first: command-line flags, environment variables ``FASTCHAT_ADAPTER_<NAME>``,
the optional config file (``--config FILE``, TOML or JSON), then the defaults below. List options
take a comma-separated string everywhere (flags may also be repeated), like DB-GPT's own
``controller_addr``, or a JSON list (``'["http://a:1", "http://b:2"]'``, as pydantic-settings
users write lists in the environment).

Values are checked where they are read, so a mistake stops the start with one line naming the
option (exit status 2) instead of a process that runs and never gets ready: every address is an
``http(s)://`` URL, ``register_host`` is a bare host name or IP address, and a config file may
hold only known keys (``ConfigFileError`` names the file, and the line of a syntax error).
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import sys
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from protocol.reasoning import ReasoningMode

ENV_PREFIX = "FASTCHAT_ADAPTER_"

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CommaList = Annotated[list[str], NoDecode]

CONFIG_SUFFIXES = (".toml", ".json")
# Labels of letters, digits, '-' and '_' (compose service names have underscores), dot-separated.
_HOST_NAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_][A-Za-z0-9_-]{0,62}(\.[A-Za-z0-9_-]{1,63})*\.?$"
)


class ConfigFileError(ValueError):
    """The config file cannot be used; the message names the file (and the line, if known)."""


class Settings(BaseSettings):
    """Every option of ``fastchat-adapter serve``; the field description is the ``--help`` text."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", validate_default=True, frozen=True
    )

    # --- where the adapter listens and how it is advertised -------------------------------
    host: str = Field("127.0.0.1", description="Bind address (loopback unless told otherwise).")
    port: int = Field(8100, ge=1, le=65535, description="Bind port for the DB-GPT worker API.")
    register_host: str | None = Field(
        None,
        description="Host advertised to DB-GPT controllers (default: the bind host, or the "
        "machine's primary address when binding 0.0.0.0).",
    )

    # --- upstream FastChat workers ----------------------------------------------------------
    worker_address: CommaList = Field(
        default_factory=list, description="FastChat LLM worker URL(s), comma-separated."
    )
    embedding_worker_address: CommaList = Field(
        default_factory=list,
        description="FastChat embedding worker URL(s); registered as name@text2vec.",
    )
    model_names: CommaList = Field(
        default_factory=list,
        description="Serve only these model names (default: every name the workers report).",
    )
    multimodal_models: CommaList = Field(
        default_factory=list,
        description="Models whose FastChat workers take images (sent as FastChat's images "
        "parameter); a FastChat controller's multimodal models count too. Others: dropped.",
    )
    fastchat_controller_address: str | None = Field(
        None,
        description="Mirror every model of this FastChat controller and dispatch through it.",
    )
    status_interval: float = Field(
        2.0, gt=0, description="Seconds between worker status polls (liveness, queue length)."
    )
    connect_timeout: float = Field(3.0, gt=0, description="Connect timeout to workers, seconds.")
    idle_timeout: float = Field(
        120.0, gt=0, description="Longest silence between two upstream frames, seconds."
    )
    generate_timeout: float = Field(
        600.0,
        gt=0,
        description="Longest wait for a whole non-stream generation (/generate), seconds: it "
        "sends no frames, so the idle timeout cannot bound it.",
    )
    keepalive_interval: float = Field(
        5.0, gt=0, description="Send an empty frame downstream after this many idle seconds."
    )
    always_count_tokens: bool = Field(
        False,
        description="Ask the worker's /count_token for every request; by default only when "
        "the prompt may be long enough for max_new_tokens to be clamped.",
    )
    default_temperature: float = Field(
        0.0,
        ge=0,
        le=2,
        description="Temperature when a request has none (DB-GPT's apiserver drops 0).",
    )
    embedding_batch_size: int = Field(
        1,
        ge=1,
        description="Inputs per upstream embeddings call (1: exact vectors, see README).",
    )
    sep_style_numbering: Literal["auto", "0.2.36", "main"] = Field(
        "auto", description="FastChat SeparatorStyle numbering of the workers' templates."
    )
    reasoning: ReasoningMode = Field(
        "auto",
        description="<think> blocks: split them into DB-GPT's thinking part (auto: for "
        "reasoning models and outputs that start one; split: always), strip them, or pass "
        "them through in the text.",
    )

    # --- DB-GPT cluster -------------------------------------------------------------------
    controller_address: CommaList = Field(
        default_factory=list,
        description="DB-GPT controller URL(s), comma-separated; none: serve the controller "
        "API ourselves (standalone).",
    )
    controller_mode: Literal["fanout", "failover"] = Field(
        "fanout",
        description="With several controllers: fanout registers with each (independent "
        "controllers); failover sends each call to one and moves on when it fails "
        "(controllers sharing one registry database).",
    )
    heartbeat_interval: float = Field(
        20.0, gt=0, description="Seconds between heartbeats (DB-GPT's own default)."
    )
    register_service: bool = Field(
        False, description="Also register WorkerManager@service (for dbgpt model CLI)."
    )
    standalone_heartbeat_timeout: float = Field(
        60.0, gt=0, description="Standalone controller: mark unhealthy after this silence."
    )
    shutdown_grace: float = Field(
        30.0, ge=0, description="On SIGTERM, seconds to let in-flight streams finish."
    )

    # --- operability ----------------------------------------------------------------------
    api_key: str | None = Field(None, description="Bearer token required on /api/worker/*.")
    max_body_bytes: int = Field(
        16 * 1024 * 1024, gt=0, description="Largest request body accepted, bytes."
    )
    log_format: Literal["text", "json"] = Field("text", description="Log line format.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Least severe level logged (request bodies: never at info)."
    )

    # --- hardening: who may write the standalone registry, request bounds, read timeouts -
    controller_accept_workers: bool = Field(
        False,
        description="Standalone controller: accept registrations, heartbeats and deletes from "
        "other workers (the adapter's own entries stay protected).",
    )
    controller_allow_hosts: CommaList = Field(
        default_factory=list,
        description="Standalone controller: client addresses allowed to write, comma-separated "
        "(default: any, when other workers are accepted).",
    )
    max_embedding_inputs: int = Field(
        2048, ge=1, description="Most inputs one embeddings request may carry."
    )
    embedding_concurrency: int = Field(
        4, ge=1, description="Upstream calls one embeddings request may have running at once."
    )
    header_timeout: float = Field(
        10.0, gt=0, description="Seconds a request head (line and headers) may take to arrive."
    )
    body_timeout: float = Field(
        30.0,
        gt=0,
        description="Seconds a request body may take, plus one per body_min_rate bytes received.",
    )
    body_min_rate: int = Field(
        1024, ge=0, description="Bytes per second that earn a slow request body more time."
    )

    @field_validator(
        "worker_address",
        "embedding_worker_address",
        "model_names",
        "multimodal_models",
        "controller_address",
        "controller_allow_hosts",
        mode="before",
    )
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str) and value.lstrip().startswith("["):
            try:  # a JSON list, as pydantic-settings users write lists in the environment
                value = json.loads(value)
            except ValueError:
                raise ValueError(f"not a JSON list of strings: {value}") from None
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, list | tuple):
            parts = [p for item in items for p in str(item).split(",")]
            return [p.strip().rstrip("/") for p in parts if p.strip()]
        return items

    @field_validator("fastchat_controller_address")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else None

    @field_validator(
        "worker_address",
        "embedding_worker_address",
        "controller_address",
        "fastchat_controller_address",
    )
    @classmethod
    def _http_urls(cls, value: list[str] | str | None) -> list[str] | str | None:
        for url in [value] if isinstance(value, str) else value or []:
            check_http_url(url)
        return value

    @field_validator("register_host")
    @classmethod
    def _bare_host(cls, value: str | None) -> str | None:
        if value is not None and not is_bare_host(value):
            raise ValueError(
                f"{value!r} is not a bare host name or IP address (no scheme, port or path: "
                "the port advertised is --port)"
            )
        return value

    @model_validator(mode="after")
    def _needs_upstream(self) -> Settings:
        sources = self.worker_address or self.embedding_worker_address
        if not sources and not self.fastchat_controller_address:
            raise ValueError(
                "no upstream: give --worker-address, --embedding-worker-address or "
                "--fastchat-controller-address"
            )
        # One URL is one worker of one type: a worker listed as both would be registered as
        # only one of them, silently.
        both = sorted(set(self.worker_address) & set(self.embedding_worker_address))
        if both:
            raise ValueError(
                f"{', '.join(both)} given as both --worker-address and "
                "--embedding-worker-address; list each worker once"
            )
        return self

    @property
    def standalone(self) -> bool:
        """No DB-GPT controller given: the adapter serves the controller API itself."""
        return not self.controller_address

    @property
    def advertised_host(self) -> str:
        if self.register_host:
            return self.register_host
        if self.host in ("0.0.0.0", "::", ""):
            return primary_address()
        return self.host

    @property
    def effective_controllers(self) -> list[str]:
        """Controllers to register with; standalone means our own embedded controller."""
        return self.controller_address or [f"http://127.0.0.1:{self.port}"]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init = the CLI flags actually given, then the environment, then the config file.
        return (init_settings, env_settings, _ConfigFileSource(settings_cls))


class _ConfigFileSource(PydanticBaseSettingsSource):
    """Values from the config file; lowest precedence above the defaults."""

    values: ClassVar[dict[str, Any]] = {}  # set by load_settings for one construction only

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self.values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.values)


def read_config_file(path: Path) -> dict[str, Any]:
    """A flat table of settings, keys spelt like the fields (``worker_address`` ...) or the
    flags (``worker-address``), optionally under ``[fastchat_adapter]``. The file type comes
    from its extension; a YAML file is refused rather than misread as TOML."""
    if path.suffix not in CONFIG_SUFFIXES:
        raise ConfigFileError(
            f"{path}: unsupported config file type {path.suffix or '(no extension)'!r}; "
            "use a .toml or .json file"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"{path}: cannot read it: {exc}") from None
    try:
        data: Any = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigFileError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"{path}: invalid TOML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}: expected a table of settings")
    table = data.get("fastchat_adapter", data)
    if not isinstance(table, dict):
        raise ConfigFileError(f"{path}: [fastchat_adapter] must be a table of settings")
    values = {str(k).replace("-", "_"): v for k, v in table.items()}
    unknown = [str(k) for k in table if str(k).replace("-", "_") not in Settings.model_fields]
    if unknown:
        listed = ", ".join(f"`{k}`" for k in unknown)
        raise ConfigFileError(f"unknown key {listed} in {path}")
    return values


def load_settings(cli_values: dict[str, Any], config_file: Path | None = None) -> Settings:
    """Build the settings from flags given on the command line, the environment and a file."""
    _ConfigFileSource.values = read_config_file(config_file) if config_file else {}
    try:
        return Settings(**cli_values)
    finally:
        _ConfigFileSource.values = {}


def check_http_url(url: str) -> None:
    """Raise ``ValueError`` unless ``url`` is an absolute http(s) URL with a host."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises on a port that is not a number
    except ValueError as exc:
        raise ValueError(f"not an http(s) URL: {url} ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url} (expected http://HOST:PORT)")


def is_bare_host(value: str) -> bool:
    """A host name or an IPv4/IPv6 address: what goes between ``http://`` and ``:port``."""
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return bool(_HOST_NAME.match(value))


def primary_address() -> str:
    """The address of the interface that routes outward; no packet is sent (UDP connect)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed, nothing is sent
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"
