"""The request path's transports on one GPU, as shipped: fused replicas, the split over the direct
link, the split over Serve handles (gRPC), and the no-op ceiling (issue #18, step 5).

Run from the checkout whose code is to be measured (its `deployments.builder` serves the configs):

    python bench/transport.py --rows noop fast split-direct split-handle --concurrency 128 256 \\
        --tokenizer DIR --label new --out $OUT/transport_new.json

Each row deploys a config file of the checkout as it is (`serve_config.fast.yaml`,
`serve_config.split.yaml`; `split-handle` is the split with `gather.transport: handle` and handle
calls over gRPC), waits for ready, warms up, and drives `hey` at each concurrency. Cluster-wide
flags come from the environment (README: HAProxy + direct ingress; add
RAY_SERVE_THROUGHPUT_OPTIMIZED=1 for Serve's throughput mode). Standalone on purpose: it runs
against older checkouts too, which lack the rest of `bench/`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

TEXT = "the quick brown fox jumps over the lazy dog " * 10  # ~100 tokens, cut at the models' 128


def v2_body(n: int = 1) -> bytes:
    return json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [n], "data": [TEXT] * n}]}).encode()


def config_doc(root: Path, row: str, tokenizer: str | None) -> dict[str, Any]:
    if row == "noop":
        return {"applications": [{"name": "noop", "route_prefix": "/", "import_path": "bench.noop:build_noop"
                                  if (root / "bench" / "noop.py").exists() else "deployments.noop:build_noop",
                                  "args": {"num_replicas": 8, "num_cpus": 1, "flavour": "fastapi"},
                                  "logging_config": {"enable_access_log": False}}]}
    name = "serve_config.fast.yaml" if row == "fast" else "serve_config.split.yaml"
    doc = yaml.safe_load((root / name).read_text())
    app = doc["applications"][0]
    for m in app["args"]["models"]:
        if tokenizer:
            m["source"]["tokenizer_path"] = tokenizer
    if row == "split-handle":
        app["args"]["ingress"]["gather"]["transport"] = "handle"
        app["args"]["ingress"]["gather"].pop("max_calls_in_flight", None)  # the measured best for handles
        env = app.setdefault("runtime_env", {}).setdefault("env_vars", {})
        env["RAY_SERVE_USE_GRPC_BY_DEFAULT"] = "1"
    return doc


def deploy(doc: dict[str, Any], url: str, timeout_s: float = 180) -> float:
    from bench.harness import redeploy

    return redeploy(doc, url, "/v2/health/ready", timeout_s)


def hey(hey_bin: str, url: str, body: bytes, concurrency: int, seconds: float) -> dict[str, Any]:
    path = Path("/tmp/transport_body.json")
    path.write_bytes(body)
    out = subprocess.run([hey_bin, "-z", f"{seconds}s", "-c", str(concurrency), "-m", "POST", "-T", "application/json",
                          "-D", str(path), url], capture_output=True, text=True, timeout=seconds + 120).stdout
    codes = {int(c): int(n) for c, n in re.findall(r"\[(\d+)\]\s+(\d+) responses", out)}
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = re.search(r"99%+ in ([\d.]+) secs", out)
    total = sum(codes.values()) or 1
    return {"req_per_s": rps * codes.get(200, 0) / total, "p99_ms": float(p99.group(1)) * 1000 if p99 else None,
            "codes": codes}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=["noop", "fast", "split-direct", "split-handle"],
                   choices=["noop", "fast", "split-direct", "split-handle"])
    p.add_argument("--concurrency", type=int, nargs="+", default=[128, 256])
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--tokenizer", help="directory with the BERT uncased tokenizer (tokenizer.json)")
    p.add_argument("--label", default="this checkout")
    p.add_argument("--hey", default=os.environ.get("HEY", "hey"))
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "transport.json"))
    ns = p.parse_args()
    root = Path.cwd()
    sys.path.insert(0, str(root))
    os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
    os.environ.setdefault("RAY_SERVE_ENABLE_DIRECT_INGRESS", "1")
    import ray
    from ray import serve

    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    url = "http://127.0.0.1:8000"
    flags = {k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")}
    rows: list[dict[str, Any]] = []
    infer = "/v2/models/bert/infer"
    for row in ns.rows:
        try:
            took = deploy(config_doc(root, row, ns.tokenizer), url)
        except Exception as e:  # noqa: BLE001 - a row that cannot deploy is reported, the others still run
            rows.append({"label": ns.label, "row": row, "error": f"{type(e).__name__}: {e}"})
            print(f"{ns.label:>6} {row:<13} deploy failed: {e}", flush=True)
            Path(ns.out).write_text(json.dumps(rows, indent=1))
            continue
        path = "/v2/models/noop/infer" if row == "noop" else infer
        hey(ns.hey, url + path, v2_body(), 32, 3.0)  # warm-up
        for c in ns.concurrency:
            r = {"label": ns.label, "row": row, "concurrency": c, "deploy_s": took, "flags": flags,
                 **hey(ns.hey, url + path, v2_body(), c, ns.duration)}
            rows.append(r)
            print(f"{ns.label:>6} {row:<13} c={c:<4} {r['req_per_s']:>9,.0f} req/s  p99 {r['p99_ms'] or 0:6.1f} ms  "
                  f"codes {r['codes']}", flush=True)
            Path(ns.out).write_text(json.dumps(rows, indent=1))
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
