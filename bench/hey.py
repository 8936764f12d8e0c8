"""Drive load with `hey` (a compiled HTTP load generator) and read its report.

At thousands of requests per second a Python client is the bottleneck and would measure itself;
`hey` (Debian package `hey`, or `go install github.com/rakyll/hey@latest`) is not. Falls back to
nothing: callers decide what to do when it is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional


def find_hey() -> Optional[str]:
    for candidate in (os.environ.get("HEY"), shutil.which("hey"), ".whl/bin/hey"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(Path(candidate).resolve())
    return None


def require_hey() -> str:
    """`find_hey()`, or exit with how to get it (every benchmark that drives load needs it)."""
    hey = find_hey()
    if hey is None:
        raise SystemExit("hey not found: set HEY=/path/to/hey (Debian package `hey`)")
    return hey


@dataclass
class HeyReport:
    requests: int
    ok: int
    seconds: float
    ok_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    statuses: dict[int, int]
    errors: list[str]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_PCT = re.compile(r"^\s*(\d+)%% in ([\d.]+) secs".replace("%%", "%"), re.M)
_STATUS = re.compile(r"^\s*\[(\d+)\]\s+(\d+) responses", re.M)
_TOTAL = re.compile(r"^\s*Total:\s+([\d.]+) secs", re.M)
_SLOWEST = re.compile(r"^\s*Slowest:\s+([\d.]+) secs", re.M)


def parse_report(text: str) -> HeyReport:
    """Parse hey's default text summary (the format of hey 0.1.4)."""
    total = _TOTAL.search(text)
    if total is None:
        raise ValueError(f"not a hey report: {text[:300]!r}")
    seconds = float(total.group(1))
    pct = {int(p): float(v) * 1000.0 for p, v in _PCT.findall(text) if int(p) > 0}
    slowest = _SLOWEST.search(text)
    if 99 not in pct and slowest is not None:
        # hey 0.1.4 prints "0% in 0.0000 secs" for p99 when it has under ~100 samples: report the
        # slowest request instead, an upper bound of the p99.
        pct[99] = float(slowest.group(1)) * 1000.0
    statuses = {int(code): int(n) for code, n in _STATUS.findall(text)}
    errors = []
    if "Error distribution:" in text:
        errors = [ln.strip() for ln in text.split("Error distribution:", 1)[1].splitlines() if ln.strip()]
    ok = statuses.get(200, 0)
    return HeyReport(
        requests=sum(statuses.values()) + sum(int(e.split("]")[0].strip("[")) for e in errors if e.startswith("[")),
        ok=ok, seconds=seconds, ok_per_s=ok / seconds if seconds else 0.0,
        p50_ms=pct.get(50, float("nan")), p90_ms=pct.get(90, float("nan")), p99_ms=pct.get(99, float("nan")),
        statuses=statuses, errors=errors,
    )


def run_hey(url: str, body: bytes, concurrency: int, duration_s: float, hey: str,
            content_type: str = "application/json", timeout_s: int = 20) -> HeyReport:
    """Closed loop: `concurrency` connections each sending `body` back to back for `duration_s`."""
    with tempfile.NamedTemporaryFile(suffix=".body") as f:
        f.write(body)
        f.flush()
        cmd = [hey, "-z", f"{duration_s}s", "-c", str(concurrency), "-m", "POST", "-T", content_type,
               "-D", f.name, "-t", str(timeout_s), url]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + timeout_s + 60)
    if out.returncode != 0:
        raise RuntimeError(f"hey failed ({out.returncode}): {out.stderr[-500:]}")
    return parse_report(out.stdout)
