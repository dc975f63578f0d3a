"""What this process is, said once when it starts and printed on demand.

- ``registration_mode``: how the models are registered; the one place that names the mode.
- ``startup_line``: version, mode, advertised URL, workers and controllers, logged by
  ``adapter/server.py`` once the port is bound (with the same facts as JSON fields).
- ``render_config``: the effective settings (flags > environment > config file > defaults) as a
  TOML config file, for ``fastchat-adapter serve --print-config``; secrets are never printed.
"""

from __future__ import annotations

import json
from typing import Any, Final

from adapter import __version__
from adapter.settings import Settings

# A setting whose name has one of these words is a secret: printed only as "set" or unset.
SECRET_WORDS: Final = frozenset({"key", "token", "password", "secret"})


def registration_mode(settings: Settings) -> str:
    """``standalone`` (no ``--controller-address``: the adapter serves the controller API
    itself); ``registered, failover`` (``--controller-mode failover`` with several controllers:
    one at a time, the next on failure); else ``registered, fan-out`` (every instance on every
    controller given). ``Registrar.create`` makes the same choice."""
    if settings.standalone:
        return "standalone"
    if settings.controller_mode == "failover" and len(settings.controller_address) > 1:
        return "registered, failover"
    return "registered, fan-out"


def advertised_url(settings: Settings) -> str:
    return f"http://{settings.advertised_host}:{settings.port}"


def startup_facts(settings: Settings) -> dict[str, Any]:
    """The startup line's facts, as the JSON log line's fields."""
    workers = [f"llm {url}" for url in settings.worker_address]
    workers += [f"text2vec {url}" for url in settings.embedding_worker_address]
    if settings.fastchat_controller_address:
        workers.append(f"fastchat-controller {settings.fastchat_controller_address}")
    return {
        "version": __version__,
        "mode": registration_mode(settings),
        "advertised_url": advertised_url(settings),
        "listen": f"{settings.host}:{settings.port}",
        "workers": workers,
        "controllers": settings.controller_address or ["self (standalone)"],
    }


def startup_line(settings: Settings) -> str:
    facts = startup_facts(settings)
    return (
        f"fastchat-adapter {facts['version']} | mode {facts['mode']} | "
        f"advertised {facts['advertised_url']} | listening {facts['listen']} | "
        f"workers {', '.join(facts['workers'])} | controllers {', '.join(facts['controllers'])}"
    )


def is_secret(name: str) -> bool:
    return not SECRET_WORDS.isdisjoint(name.split("_"))


def render_config(settings: Settings) -> str:
    """A TOML config file that ``--config`` reads back into the same settings, except secrets
    (commented out, never shown) and unset options (commented out)."""
    lines = [
        f"# fastchat-adapter {__version__}: effective settings "
        "(flags > environment > config file > defaults).",
        "# Secrets are masked and unset options commented out; usable as --config FILE.",
        f"# mode: {registration_mode(settings)}; advertised as {advertised_url(settings)}",
        "[fastchat_adapter]",
    ]
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if value is None:
            lines.append(f"# {name} is unset")
        elif is_secret(name):
            lines.append(f"# {name} is set (masked)")
        else:
            lines.append(f"{name} = {_toml(value)}")
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    # JSON's string escapes are valid in TOML basic strings.
    return json.dumps(str(value), ensure_ascii=False)
