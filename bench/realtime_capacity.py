"""Closed-loop capacity of one model's single-item realtime requests, for an A/B of two checkouts
(e.g. before and after the traffic classes, issue #21): each root's serve_config.yaml with only
that model, its replicas pinned, `hey` for --seconds at --connections, rounds alternating.

    python -m bench.realtime_capacity --roots /tmp/before . [--model minilm] [--rounds 2] [--out DIR]

Prints one row per run and writes realtime_capacity.json under --out (default $OUT, else .).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import yaml

from bench.hey import require_hey, run_hey
from bench.traffic_classes import one_model_config
from deployments.control import wait_ready


def _config(root: Path, model: str, replicas: int) -> Path:
    config = one_model_config(yaml.safe_load((root / "serve_config.yaml").read_text()), model, replicas)
    path = Path(tempfile.mkdtemp()) / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def measure_root(root: Path, model: str, replicas: int, seconds: float, connections: int) -> dict:
    # The root's own packages first: Ray's workers inherit PYTHONPATH from the `serve run` that starts them.
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    server = subprocess.Popen([sys.executable, "-m", "ray.serve.scripts", "run", str(_config(root, model, replicas))],
                              cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = "http://127.0.0.1:8000"
    try:
        wait_ready(url, timeout_s=300)
        body = json.dumps({"instances": ["The quick brown fox jumps over the lazy dog."]}).encode()
        target = f"{url}/v1/models/{model}:predict"
        run_hey(target, body, connections, 3, require_hey())  # warm-up
        return {"root": str(root), **asdict(run_hey(target, body, connections, seconds, require_hey()))}
    finally:
        server.terminate()
        server.wait(timeout=60)
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--roots", nargs="+", required=True, help="checkouts to compare, each with its serve_config.yaml")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args(argv)
    rows = []
    print(f"{'round':<6}{'root':<40}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'non-200':>9}")
    for k in range(a.rounds):
        for root in a.roots:
            r = measure_root(Path(root).resolve(), a.model, a.replicas, a.seconds, a.connections)
            rows.append({"round": k, **r})
            print(f"{k:<6}{root:<40}{r['ok_per_s']:>9.1f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}"
                  f"{r['requests'] - r['ok']:>9}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "realtime_capacity.json").write_text(json.dumps({"args": vars(a), "runs": rows, "at": time.time()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
