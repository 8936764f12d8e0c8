"""Batch-size sweep: retune max_batch_size live, drive load at each size, tabulate and plot.

The seed's table: batch size, device utilisation, p50, p99, throughput; plus PNG plots of
throughput and p99 against batch size and the latency CDF of each size.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


from bench.load import run_load
from bench.retune import apply_batching, current_batching
from bench.scrape import sample_values


class UtilisationSampler:
    """Mean device utilisation over a run: NVML gauges from the metrics endpoint when the model has
    GPUs, else the host's CPU utilisation (psutil)."""

    def __init__(self, metrics_url: Optional[str], model: str, period_s: float = 1.0):
        self.metrics_url, self.model, self.period_s = metrics_url, model, period_s
        self.samples: list[float] = []
        self.kind = "cpu"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _gpu_util(self) -> Optional[float]:
        name = "ray_batchserve_gpu_utilization_percent"
        got = sample_values(self.metrics_url, {name}, self.model) if self.metrics_url else None
        vals = got[name] if got else []
        return sum(vals) / len(vals) if vals else None

    def _run(self) -> None:
        import psutil

        psutil.cpu_percent(None)
        while not self._stop.wait(self.period_s):
            gpu = self._gpu_util()
            if gpu is not None:
                self.kind = "gpu"
                self.samples.append(gpu)
            else:
                self.samples.append(psutil.cpu_percent(None))

    def __enter__(self) -> "UtilisationSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float:
        return sum(self.samples) / len(self.samples) if self.samples else float("nan")


@dataclass
class SweepRow:
    max_batch_size: int
    utilisation_pct: float
    utilisation_kind: str
    p50_ms: float
    p99_ms: float
    throughput_rps: float
    items_per_s: float
    mean_batch_size: float
    errors: int
    latencies_ms: list[float] = field(default_factory=list, repr=False)


def run_sweep(url: str, config: dict[str, Any], app: str, model: str, batch_sizes: list[int], *,
              concurrency: Optional[int] = 32, rate: Optional[float] = None, duration_s: float = 15.0,
              items_per_request: int = 1, metrics_url: Optional[str] = None, progress: bool = True,
              batch_wait_s: Optional[float] = None) -> list[SweepRow]:
    """`batch_wait_s` sets the wait for every size (default: keep the deployment's)."""
    original = current_batching(url, model)
    rows: list[SweepRow] = []
    try:
        for b in batch_sizes:
            uc = {**original, "max_batch_size": b}
            if batch_wait_s is not None:
                uc["batch_wait_timeout_s"] = batch_wait_s
            apply_batching(url, config, app, model, uc)
            with UtilisationSampler(metrics_url, model) as util:
                summary, res = asyncio.run(run_load(url, model, duration_s, concurrency=concurrency, rate=rate,
                                                    items_per_request=items_per_request, progress=progress))
            rows.append(SweepRow(b, util.mean, util.kind, summary.p50_ms, summary.p99_ms, summary.throughput_rps,
                                 summary.items_per_s, summary.mean_batch_size, summary.errors,
                                 [x * 1000 for x in res.latencies_s]))
            if progress:
                print(format_row(rows[-1]), flush=True)
    finally:
        apply_batching(url, config, app, model, original)
    return rows


HEADER = f"{'batch':>6} {'util %':>8} {'p50 ms':>9} {'p99 ms':>9} {'req/s':>9} {'items/s':>9} {'mean batch':>11} {'errors':>7}"


def format_row(r: SweepRow) -> str:
    return (f"{r.max_batch_size:>6} {r.utilisation_pct:>7.1f}{r.utilisation_kind[0]} {r.p50_ms:>9.1f} {r.p99_ms:>9.1f} "
            f"{r.throughput_rps:>9.1f} {r.items_per_s:>9.1f} {r.mean_batch_size:>11.2f} {r.errors:>7}")


def write_outputs(rows: list[SweepRow], out_dir: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sweep.json").write_text(json.dumps(
        [{k: v for k, v in r.__dict__.items() if k != "latencies_ms"} for r in rows], indent=2))
    sizes = [r.max_batch_size for r in rows]
    fig, ax1 = plt.subplots(figsize=(7, 4))
    ax1.plot(sizes, [r.items_per_s for r in rows], "o-", color="tab:blue", label="throughput (items/s)")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("max_batch_size")
    ax1.set_ylabel("items/s", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(sizes, [r.p99_ms for r in rows], "s--", color="tab:red", label="p99 (ms)")
    ax2.set_ylabel("p99 latency (ms)", color="tab:red")
    ax1.set_title(title)
    fig.tight_layout()
    p1 = out_dir / "sweep_throughput_p99.png"
    fig.savefig(p1, dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        lat = sorted(r.latencies_ms)
        if lat:
            ax.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))], label=f"batch {r.max_batch_size}")
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("latency CDF by max_batch_size")
    ax.legend()
    fig.tight_layout()
    p2 = out_dir / "sweep_latency_cdf.png"
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [out_dir / "sweep.json", p1, p2]
