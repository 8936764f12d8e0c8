"""Issue #21's traffic-class protocol: single-item realtime requests (open loop) against a
saturating bulk load (closed-loop clients sending 64-item bulk requests), each alone and together,
and the same mix sent without classes (bulk as realtime) to show what the classes buy.

    python -m bench.traffic_classes [--config serve_config.yaml] [--model minilm] [--rate 20] [--bulk-clients 4] [--out DIR]

The acceptance test (tests/integration/test_traffic.py) calls `measure` against the test
cluster. Prints one table and writes traffic_classes.json under --out (default $OUT, else .).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.overload import ROOT, quantile_ms

TEXT = "The quick brown fox jumps over the lazy dog and keeps running."
BULK_ITEMS = 64


def bodies(bulk_items: int = BULK_ITEMS) -> tuple[str, str, str]:
    """(realtime, bulk, bulk sent as realtime) request bodies."""
    texts = [f"{TEXT} ({i})" for i in range(bulk_items)]
    return (json.dumps({"instances": [TEXT]}), json.dumps({"instances": texts, "priority": "bulk"}),
            json.dumps({"instances": texts}))


def _load(url: str, workdir: Path, seconds: float, realtime_rate: float, bulk_body: str | None,
          bulk_clients: int, tag: str) -> tuple[list, list]:
    """Realtime arrivals (open loop) and bulk clients (closed loop), concurrently, in processes of
    their own; either may be left out (rate 0 / no body)."""
    rt_body = bodies()[0]
    jobs, outs = [], []
    if realtime_rate > 0:
        jobs.append(["--url", url, "--rate", str(realtime_rate), "--duration", str(seconds), "--body", rt_body])
        outs.append(workdir / f"{tag}_realtime.json")
    if bulk_body is not None:
        jobs.append(["--url", url, "--closed", str(bulk_clients), "--duration", str(seconds), "--body", bulk_body,
                     "--timeout", "60"])
        outs.append(workdir / f"{tag}_bulk.json")
    procs = [subprocess.Popen([sys.executable, "-m", "tests.openloop", *a, "--out", str(o)], cwd=ROOT)
             for a, o in zip(jobs, outs)]
    for p in procs:
        if p.wait(timeout=seconds + 120) != 0:
            raise RuntimeError(f"load client exited {p.returncode}")
    rows = [json.loads(o.read_text())["results"] for o in outs]
    rt = rows.pop(0) if realtime_rate > 0 else []
    bulk = rows.pop(0) if bulk_body is not None else []
    return rt, bulk


def _realtime(rows: list) -> dict[str, Any]:
    ok = [lat for _, s, lat, *_ in rows if s == 200]
    return {"requests": len(rows), "ok": len(ok), "p50_ms": quantile_ms(ok, 50), "p99_ms": quantile_ms(ok, 99),
            "not_ok": {str(s): sum(1 for _, t, *_ in rows if t == s) for s in {s for _, s, *_ in rows if s != 200}}}


def _bulk(rows: list, seconds: float) -> dict[str, Any]:
    ok = sum(1 for _, s, *_ in rows if s == 200)
    return {"requests": len(rows), "ok": ok, "items_per_s": ok * BULK_ITEMS / seconds,
            "shed_503": sum(1 for _, s, *_ in rows if s == 503)}


def measure(base_url: str, workdir: Path, path: str = "/v1/models/minilm:predict", seconds: float = 10.0,
            realtime_rate: float = 20.0, bulk_clients: int = 4) -> dict[str, Any]:
    url = base_url + path
    _, bulk_body, bulk_as_realtime = bodies()
    _load(url, workdir, 5.0, realtime_rate, bulk_body, bulk_clients, "warm")
    # Realtime alone before and after the mixed run, pooled: drift over the run (a replica added
    # by the autoscaler, a warming cache) then weighs on both sides of the ratio alike.
    rt_before, _ = _load(url, workdir, seconds / 2, realtime_rate, None, 0, "rt_before")
    _, bulk_alone = _load(url, workdir, seconds, 0, bulk_body, bulk_clients, "bulk_alone")
    rt_mixed, bulk_mixed = _load(url, workdir, seconds, realtime_rate, bulk_body, bulk_clients, "mixed")
    rt_after, _ = _load(url, workdir, seconds / 2, realtime_rate, None, 0, "rt_after")
    rt_alone = rt_before + rt_after
    rt_flat, bulk_flat = _load(url, workdir, seconds, realtime_rate, bulk_as_realtime, bulk_clients, "no_classes")
    return {"seconds": seconds, "realtime_rate": realtime_rate, "bulk_clients": bulk_clients, "bulk_items": BULK_ITEMS,
            "realtime_alone": _realtime(rt_alone), "bulk_alone": _bulk(bulk_alone, seconds),
            "realtime_with_bulk": _realtime(rt_mixed), "bulk_with_realtime": _bulk(bulk_mixed, seconds),
            "realtime_without_classes": _realtime(rt_flat), "bulk_without_classes": _bulk(bulk_flat, seconds)}


def one_model_config(config: dict, model: str, replicas: int | None) -> dict:
    """A serve config with only `model` left, its replicas pinned (autoscaling off) when given."""
    for app in config["applications"]:
        app["args"]["models"] = [m for m in app["args"]["models"] if m["name"] == model]
        for m in app["args"]["models"] if replicas else []:
            m["autoscaling"] = {**m.get("autoscaling", {}), "enabled": False}
            m["deployment"] = {**m.get("deployment", {}), "num_replicas": replicas}
    return config


def print_table(r: dict[str, Any]) -> None:
    alone = r["realtime_alone"]["p99_ms"]
    print(f"{'run':<28}{'realtime p50 ms':>16}{'realtime p99 ms':>16}{'p99 / alone':>12}{'bulk items/s':>14}")
    for name, rt, bulk in (("realtime alone", "realtime_alone", None), ("bulk alone", None, "bulk_alone"),
                           ("classes: realtime + bulk", "realtime_with_bulk", "bulk_with_realtime"),
                           ("no classes: both realtime", "realtime_without_classes", "bulk_without_classes")):
        p50 = f"{r[rt]['p50_ms']:.1f}" if rt else "-"
        p99 = f"{r[rt]['p99_ms']:.1f}" if rt else "-"
        ratio = f"{r[rt]['p99_ms'] / alone:.2f}" if rt else "-"
        items = f"{r[bulk]['items_per_s']:.0f}" if bulk else "-"
        print(f"{name:<28}{p50:>16}{p99:>16}{ratio:>12}{items:>14}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "serve_config.yaml"))
    ap.add_argument("--url", help="measure a service already running there instead of starting --config")
    ap.add_argument("--rate", type=float, default=20.0, help="realtime arrivals per second")
    ap.add_argument("--bulk-clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--replicas", type=int, help="pin each model to this many replicas (autoscaling off)")
    ap.add_argument("--model", default="minilm", help="the model measured; the others are left out of the config")
    ap.add_argument("--one-lane", action="store_true",
                    help="realtime and bulk share one device lane (realtime first): the A/B of the two lanes")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args(argv)
    server = None
    url = a.url
    if url is None:
        import yaml

        from app.engine.batcher import ONE_LANE_ENV
        from deployments.control import wait_ready

        config = one_model_config(yaml.safe_load(Path(a.config).read_text()), a.model, a.replicas)
        if a.one_lane:
            for app in config["applications"]:
                app.setdefault("runtime_env", {}).setdefault("env_vars", {})[ONE_LANE_ENV] = "1"
        path = Path(tempfile.mkdtemp()) / "serve_config.yaml"
        path.write_text(yaml.safe_dump(config))
        # A module, not the console script: on the GPU machine the carried packages are on PYTHONPATH only.
        server = subprocess.Popen([sys.executable, "-m", "ray.serve.scripts", "run", str(path)], cwd=ROOT)
        url = "http://127.0.0.1:8000"
        wait_ready(url, timeout_s=300)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            r = measure(url, Path(tmp), path=f"/v1/models/{a.model}:predict", seconds=a.seconds,
                        realtime_rate=a.rate, bulk_clients=a.bulk_clients)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    print_table(r)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "traffic_classes.json").write_text(json.dumps({**r, "at": time.time()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
