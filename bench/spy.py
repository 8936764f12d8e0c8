"""Where a replica's CPU goes: find a replica's process, per-thread CPU time, and py-spy profiles
(collapsed stacks of the thread holding the GIL) labelled by Python thread."""

from __future__ import annotations

import re
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import psutil

SPY_RATE_HZ = 200


def replica_pid(class_fragment: str, timeout_s: float = 30.0) -> int:
    """The replica's process: Ray titles an actor's worker `ray::ServeReplica:<app>:<deployment>`."""
    deadline = time.monotonic() + timeout_s
    titles: list[str] = []
    while time.monotonic() < deadline:
        titles = []
        for proc in psutil.process_iter(["cmdline"]):
            title = " ".join(proc.info["cmdline"] or [])
            if title.startswith("ray::"):
                titles.append(title)
            if title.startswith("ray::ServeReplica:") and title.split()[0].split(":")[-1] == class_fragment:
                return proc.pid
        time.sleep(1.0)
    raise RuntimeError(f"no Serve replica process for deployment {class_fragment!r}; Ray processes: {titles}")


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread of a process, keyed `name/tid` (a thread's name is its creator's
    process title at the time: Ray's event-loop thread reads `ray::IDLE`)."""
    out: dict[str, float] = defaultdict(float)
    for t in psutil.Process(pid).threads():
        try:
            name = Path(f"/proc/{pid}/task/{t.id}/comm").read_text().strip()
        except OSError:
            continue  # the thread ended between the listing and the read
        out[f"{name}/{t.id}"] += t.user_time + t.system_time
    return dict(out)


def start_py_spy(pid: int, output: Path, duration_s: float, rate_hz: int = SPY_RATE_HZ,
                 gil: bool = False) -> subprocess.Popen:
    """`py-spy record` of `pid` in the background: raw collapsed stacks per thread, into `output`.
    `gil`: only the thread holding the GIL is sampled; otherwise every thread, idle ones included."""
    return subprocess.Popen(
        ["py-spy", "record", "--pid", str(pid), "--nonblocking", "--threads", "--format", "raw",
         "--gil" if gil else "--idle", "--rate", str(rate_hz), "--duration", str(int(duration_s)),
         "--output", str(output)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


_SPY_THREAD = re.compile(r"^thread \((\d+)\): ([^;]+)")


def read_profile(raw_profile: Path, rate_hz: int = SPY_RATE_HZ) -> tuple[float, dict[int, str]]:
    """From a `py-spy --gil --threads` raw profile: the milliseconds during which some thread held
    the GIL, and the Python name of each thread seen (by OS thread id)."""
    samples, names = 0, {}
    for line in raw_profile.read_text().splitlines():
        if line.strip():
            samples += int(line.rpartition(" ")[2])
            m = _SPY_THREAD.match(line)
            if m:
                names[int(m.group(1))] = m.group(2).strip()
    return samples * 1000.0 / rate_hz, names


def label_threads(per_thread: dict[str, float], names: dict[int, str]) -> dict[str, float]:
    """`name/tid` keys renamed after the Python thread where py-spy saw one (the event loops, the executor)."""
    out: dict[str, float] = {}
    for key, v in per_thread.items():
        tid = int(key.rpartition("/")[2])
        label = names.get(tid, key)
        out[label] = out.get(label, 0.0) + v
    return out
