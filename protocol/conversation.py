"""Placeholder: being written (render_prompt). Replaced by the real module."""

from typing import Any


def render_prompt(
    conv: dict[str, Any],
    turns: list[tuple[int, str | None]],
    system_message: str | None = None,
) -> str:
    raise NotImplementedError("render_prompt is being written")
