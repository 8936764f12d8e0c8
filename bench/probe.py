"""What a load run does inside the server, sampled while it runs (issue #7's bench).

`hey` reports only what a client sees. Alongside it, `LoadProbe` sends one extra request every
`period_s` and reads the timing headers every answer carries (items in the batch it ran in, the
wait in the replica's queue, the batch's time), and samples GPU utilisation with `nvidia-smi` when
there is one. The figures say whether a run was bound by the device (busy GPU, long batches) or by
the serving path (idle GPU, small batches, long queue waits).
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import threading
from typing import Any, Optional

import httpx


class LoadProbe:
    def __init__(self, url: str, body: bytes, period_s: float = 0.2):
        self.url, self.body, self.period_s = url, body, period_s
        self._stop = threading.Event()
        self._rows: list[dict[str, float]] = []
        self._thread = threading.Thread(target=self._sample, name="load-probe", daemon=True)
        self._smi: Optional[subprocess.Popen] = None
        self._smi_text = ""  # nvidia-smi's samples, read when the probe stops

    def __enter__(self) -> "LoadProbe":
        if shutil.which("nvidia-smi"):
            self._smi = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "250"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self._smi is not None:
            self._smi.terminate()
            self._smi_text, _ = self._smi.communicate(timeout=10)

    def _sample(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.wait(self.period_s):
                try:
                    r = client.post(self.url, content=self.body, headers={"content-type": "application/json"})
                except httpx.HTTPError:
                    continue
                h = r.headers
                if r.status_code == 200 and "x-batch-size" in h:
                    self._rows.append({"batch_size": float(h["x-batch-size"]),
                                       "queue_wait_ms": float(h["x-queue-wait-ms"]),
                                       "batch_ms": float(h["x-batch-ms"]),
                                       "latency_ms": r.elapsed.total_seconds() * 1000.0})

    def summary(self) -> dict[str, Any]:
        """Medians of what the answers carried, and the mean GPU utilisation; after the `with` block."""
        out: dict[str, Any] = {"probes": len(self._rows)}
        for key in ("batch_size", "queue_wait_ms", "batch_ms", "latency_ms"):
            values = [r[key] for r in self._rows]
            if values:
                out[f"{key}_median"] = statistics.median(values)
        # One line per GPU per sample; the first GPU is the one the single-GPU runs use.
        util = [float(line.split(",")[0]) for line in self._smi_text.splitlines() if line.strip()[:1].isdigit()]
        if util:
            out["gpu_util_percent_mean"] = statistics.fmean(util)
        return out
