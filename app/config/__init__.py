"""Typed application arguments, validated once when the app is built.

Everything below the builder receives these objects, never raw dicts. Every model forbids unknown
fields so a typo in serve_config.yaml fails `serve run` with the field's name instead of being
silently ignored.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from app.config.application import AppArgs, CostConfig, GatherOptions, IngressOptions
from app.config.model import ModelSpec
from app.config.sections import (AccelerationConfig, AutoscalingOptions, BackendOptions, BatchingConfig, DeploymentOptions,
                                 DeviceBudget, GenerationOptions, LimitsConfig, LocalDirSource, PackagedSource,
                                 ParallelConfig, RandomInitSource)

__all__ = ["AccelerationConfig", "AppArgs", "AutoscalingOptions", "BackendOptions", "BatchingConfig", "ConfigError", "CostConfig",
           "DeploymentOptions", "DeviceBudget", "GatherOptions", "GenerationOptions", "IngressOptions", "LimitsConfig",
           "LocalDirSource", "ModelSpec", "PackagedSource", "ParallelConfig", "RandomInitSource", "parse_app_args"]


class ConfigError(ValueError):
    """Bad application config; the message names each offending field."""


def _field_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_app_args(raw: dict[str, Any]) -> AppArgs:
    """Validate raw `args` into AppArgs, turning pydantic's errors into one readable message."""
    try:
        return AppArgs.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            path = _field_path(tuple(err["loc"])) or "args"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown field"
            lines.append(f"  {path}: {msg}")
        raise ConfigError("invalid serve_config.yaml application args:\n" + "\n".join(lines)) from None
