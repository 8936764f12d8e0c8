"""Summary statistics of a load run: pure functions, checked against numpy in tests."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

from app.quantiles import percentile


@dataclass
class Summary:
    requests: int
    ok: int
    errors: int
    items: int
    duration_s: float
    throughput_rps: float
    items_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    mean_batch_size: float

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(latencies_s: Sequence[float], ok: int, errors: int, items: int, duration_s: float,
              batch_sizes: Sequence[int]) -> Summary:
    lat = sorted(x * 1000.0 for x in latencies_s)
    n = ok + errors
    return Summary(
        requests=n,
        ok=ok,
        errors=errors,
        items=items,
        duration_s=duration_s,
        throughput_rps=ok / duration_s if duration_s > 0 else 0.0,
        items_per_s=items / duration_s if duration_s > 0 else 0.0,
        p50_ms=percentile(lat, 50),
        p95_ms=percentile(lat, 95),
        p99_ms=percentile(lat, 99),
        mean_ms=sum(lat) / len(lat) if lat else float("nan"),
        mean_batch_size=sum(batch_sizes) / len(batch_sizes) if batch_sizes else float("nan"),
    )
