"""Read the service's own metrics back from a Prometheus endpoint (Ray's metrics port)."""

from __future__ import annotations

from typing import Optional

import httpx


def sample_values(url: str, names: set[str], model: Optional[str] = None) -> Optional[dict[str, list[float]]]:
    """Values of the named samples (optionally only those labelled with `model`); None if unreachable."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(url, timeout=5).text
    except httpx.HTTPError:
        return None
    out: dict[str, list[float]] = {n: [] for n in names}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in out and (model is None or s.labels.get("model") == model):
                out[s.name].append(s.value)
    return out
