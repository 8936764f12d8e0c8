"""Traffic classes at the edge: which class a request belongs to (README "Traffic classes").

A request names its class with the `X-Priority` header or a `priority` field in its body (the
body wins when both are given); otherwise it takes its model's `traffic.default_class`.
"""

from __future__ import annotations

from typing import Any, Optional

from app.config.sections import TRAFFIC_CLASSES
from app.errors import InvalidInput

PRIORITY_HEADER = "x-priority"


def traffic_class(value: Any, where: str) -> str:
    """A class name as a client sent it, checked."""
    if not isinstance(value, str) or value.strip().lower() not in TRAFFIC_CLASSES:
        raise InvalidInput(f"{where}: {value!r} is not a traffic class; use one of {list(TRAFFIC_CLASSES)}")
    return value.strip().lower()


def header_class(header: Optional[str], default: str) -> str:
    """The class an `X-Priority` header names, or the model's default when there is none."""
    return default if header is None else traffic_class(header, "X-Priority")
