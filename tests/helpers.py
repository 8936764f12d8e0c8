"""Small shared helpers for tests: the repo's serve_config.yaml and model specs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


def serve_config() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "serve_config.yaml").read_text())


def app_args(config_name: str = "serve_config.yaml") -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / config_name).read_text())
    return copy.deepcopy(doc["applications"][0]["args"])


def tiny_bert_spec(**overrides: Any) -> dict[str, Any]:
    spec = {
        "name": "tiny",
        "source": {
            "kind": "random_init",
            "architecture": "bert",
            "config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
        },
        "task": "classify",
        "num_labels": 3,
        "max_seq_len": 32,
        # Test apps that are not about shedding keep the unbounded handle queue they were written
        # for (every request answered); the shipped config and the overload tests bound it.
        "autoscaling": {"max_queued_requests": -1},
    }
    spec.update(overrides)
    return spec


def parallel_config() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "serve_config.parallel.yaml").read_text())


def processes_titled(title: str) -> set[int]:
    """Pids of the Ray worker processes whose title (`ray::<what they run>`) names `title`, e.g.
    `ServeReplica:batchserve:Ingress` or `TPRankWorker`. The test cluster's nodes all run on this
    machine; the state API would need the dashboard, which the test cluster does not run."""
    import psutil

    pids = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or ())
        if f"ray::{title}" in cmdline and (f"ray::{title} " in cmdline + " " or f"ray::{title}." in cmdline):
            pids.add(p.info["pid"])
    return pids


def build_wheel(tmp_path: Path) -> list[str]:
    """The service's wheel built as the Dockerfile's pip step builds it, from a clean copy of the
    tree (a stale build/ in a working checkout would otherwise leak old files into it); its names."""
    import shutil
    import subprocess
    import sys
    import zipfile

    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__",
                                                             "bench-notes", "bench-results", ".whl"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("batchserve-*.whl")
    return zipfile.ZipFile(wheel).namelist()


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine still exists (the test cluster's nodes all run here)."""
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
