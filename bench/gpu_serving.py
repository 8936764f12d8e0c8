"""One run on a GPU machine: the raw model, the served model, a batch-size sweep, NVML gauges under
load, and replica scaling (BERT-base-shaped classifier, seq 128, bf16, random weights).

    RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_ENABLE_DIRECT_INGRESS=1 python -m bench.gpu_serving \
        --tokenizer DIR [--gpus 4] [--out DIR]

Prints a table per step and writes gpu_serving.json under --out (default $OUT). Load comes from
several client processes so the client is not the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import threading
from pathlib import Path
from typing import Any, Optional

from bench.harness import BERT_BASE, SEQ, TEXT
from bench.harness import bert_spec as harness_bert_spec
from bench.timing import bf16_matmul_peak_tflops, cuda_median_ms, encoder_flops_per_seq

SMOKE = os.environ.get("GPU_SERVING_SMOKE") == "1"


def bert_spec(tokenizer: str, max_batch: int, wait_s: float, replicas: int = 1, adaptive: bool = False) -> dict:
    """The harness's classifier, one GPU per replica, routed (no graphs); GPU_SERVING_SMOKE=1: a
    tiny float32 model, for checking the script on a CPU machine."""
    spec = harness_bert_spec(tokenizer, max_batch, wait_s, replicas, 1, cuda_graphs=False, num_cpus=0.1 if SMOKE else 2,
                             adaptive=adaptive, torch_threads=None, max_ongoing_requests=1024)
    if SMOKE:
        spec["source"]["config"] = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                    "intermediate_size": 64}
        spec["dtype"] = "float32"
    return spec


# ---------------------------------------------------------------------------------------- raw model


def raw_model(tokenizer: str, batches: list[int]) -> dict[str, Any]:
    import torch

    from app.config import ModelSpec
    from app.runners.local import LocalRunner

    spec = ModelSpec.model_validate(bert_spec(tokenizer, 256, 0.0))
    runner = LocalRunner(spec, 30522)
    runner.start()
    model = runner.model
    flops_per_seq = encoder_flops_per_seq(model, SEQ, BERT_BASE["num_hidden_layers"], BERT_BASE["hidden_size"])

    peak = bf16_matmul_peak_tflops()
    rows = []
    with torch.inference_mode():
        for b in batches:
            ids = torch.randint(1000, 30000, (b, SEQ), device="cuda")
            mask = torch.ones_like(ids)
            ms = cuda_median_ms(lambda: model(ids, mask))
            tflops = flops_per_seq * b / (ms / 1000) / 1e12
            rows.append({"batch": b, "ms": ms, "seq_per_s": b / (ms / 1000), "tflops": tflops, "frac_peak": tflops / peak})
    runner.shutdown()
    torch.cuda.empty_cache()
    return {"matmul_peak_tflops": peak, "rows": rows}


# ---------------------------------------------------------------------------------------- load


def _client_proc(url: str, model: str, conc: int, duration: float, items: int, seed: int, q: Any) -> None:
    from bench.load import run_load

    summary, res = asyncio.run(run_load(url, model, duration, concurrency=conc, items_per_request=items,
                                        seed=seed, progress=False, warmup_requests=2, texts=[TEXT]))
    q.put({"ok": res.ok, "errors": res.errors, "items": res.items, "lat": res.latencies_s,
           "batches": res.batch_sizes, "duration": summary.duration_s})


def load_mp(url: str, model: str, procs: int, conc_per_proc: int, duration: float, items: int = 1) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ps = [ctx.Process(target=_client_proc, args=(url, model, conc_per_proc, duration, items, i, q)) for i in range(procs)]
    for p in ps:
        p.start()
    parts = [q.get() for _ in ps]
    for p in ps:
        p.join()
    lat = sorted(x * 1000 for part in parts for x in part["lat"])
    dur = max(p["duration"] for p in parts)
    batches = [b for p in parts for b in p["batches"]]

    def pct(q_: float) -> float:
        return lat[min(len(lat) - 1, int(q_ / 100 * len(lat)))] if lat else float("nan")

    return {"req_per_s": sum(p["ok"] for p in parts) / dur, "items_per_s": sum(p["items"] for p in parts) / dur,
            "p50_ms": pct(50), "p99_ms": pct(99), "errors": sum(p["errors"] for p in parts),
            "mean_batch": sum(batches) / len(batches) if batches else float("nan"), "concurrency": procs * conc_per_proc,
            "items_per_request": items}


class GaugeSampler:
    """Samples the NVML gauges the service exports (app/metrics.py) from Ray's metrics endpoint."""

    def __init__(self, metrics_url: str, period_s: float = 1.0):
        self.url, self.period_s = metrics_url, period_s
        self.util: list[float] = []
        self.mem: list[float] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def read(self) -> tuple[Optional[float], Optional[float]]:
        from bench.scrape import sample_values

        util_name, mem_name = "ray_batchserve_gpu_utilization_percent", "ray_batchserve_gpu_memory_used_bytes"
        got = sample_values(self.url, {util_name, mem_name})
        if got is None:
            return None, None
        util, mem = got[util_name], got[mem_name]
        return (max(util) if util else None), (max(mem) if mem else None)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            u, m = self.read()
            if u is not None:
                self.util.append(u)
                self.mem.append(m or 0.0)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *a):
        self._stop.set()
        self._t.join()


# ---------------------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_serving")
    p.add_argument("--tokenizer", required=True, help="directory with tokenizer.json / vocab.txt (BERT uncased)")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--procs", type=int, default=12)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--skip-raw", action="store_true")
    ns = p.parse_args(argv)
    out: dict[str, Any] = {"haproxy": os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1"}
    Path(ns.out).mkdir(parents=True, exist_ok=True)

    def save() -> None:
        (Path(ns.out) / "gpu_serving.json").write_text(json.dumps(out, indent=2))

    if not ns.skip_raw:
        raw = raw_model(ns.tokenizer, [1, 8, 32, 64, 128, 256])
        out["raw"] = raw
        print(f"\nraw BERT-base bf16 seq {SEQ}: measured bf16 matmul peak {raw['matmul_peak_tflops']:.0f} TFLOP/s")
        print(f"{'batch':>6}{'ms':>9}{'seq/s':>10}{'TFLOP/s':>9}{'of peak':>9}")
        for r in raw["rows"]:
            print(f"{r['batch']:>6}{r['ms']:>9.2f}{r['seq_per_s']:>10.0f}{r['tflops']:>9.0f}{r['frac_peak']:>9.2f}")
        save()

    import ray
    from ray import serve

    from bench.retune import apply_batching
    from deployments.control import deploy_config, wait_ready

    ray.init(num_gpus=ns.gpus, num_cpus=2 if SMOKE else None, _metrics_export_port=8080, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    url, metrics = "http://127.0.0.1:8000", "http://127.0.0.1:8080/metrics"

    def deploy(replicas: int, max_batch: int, wait_s: float) -> dict:
        # One ingress replica per model replica: JSON parsing of many-item requests is CPU work too.
        args = {"models": [bert_spec(ns.tokenizer, max_batch, wait_s, replicas)],
                "ingress": {"num_replicas": replicas, "num_cpus": 1}}
        doc = {"applications": [{"name": "gpu", "route_prefix": "/", "import_path": "deployments.builder:build_app",
                                 "args": args}]}
        deploy_config(doc)
        wait_ready(url, timeout_s=300, period_s=1)
        load_mp(url, "bert", 2, 8, 3)  # warm-up
        return doc

    def show(title: str, r: dict) -> None:
        print(f"{title:<34} {r['req_per_s']:>9.0f} req/s {r['items_per_s']:>9.0f} items/s  p50 {r['p50_ms']:>7.1f}  "
              f"p99 {r['p99_ms']:>7.1f} ms  batch {r['mean_batch']:>6.1f}  errors {r['errors']}", flush=True)

    # 1 replica: single-item requests with GPU gauges, then the batch-size sweep, then 32-item requests.
    doc = deploy(1, 128, 0.005)
    sampler = GaugeSampler(metrics)
    idle_util, idle_mem = sampler.read()
    with sampler:
        single = load_mp(url, "bert", ns.procs, 32, ns.duration)
    out["single_item"] = single
    out["gpu_gauges"] = {"idle_util": idle_util, "idle_mem": idle_mem,
                         "load_util_mean": statistics.mean(sampler.util) if sampler.util else None,
                         "load_util_samples": sampler.util, "load_mem_max": max(sampler.mem) if sampler.mem else None}
    print("\nserved, 1 replica (GPU gauges: idle util {} % mem {:.2f} GiB; under load util mean {} % mem {:.2f} GiB)".format(
        idle_util, (idle_mem or 0) / 2**30, out["gpu_gauges"]["load_util_mean"], (out["gpu_gauges"]["load_mem_max"] or 0) / 2**30))
    show("single-item, concurrency %d" % single["concurrency"], single)
    save()

    sweep = []
    print(f"\nsweep (concurrency {ns.procs * 32}, single-item):")
    for b in (1, 8, 32, 128):
        doc = apply_batching(url, doc, "gpu", "bert", {"max_batch_size": b, "batch_wait_timeout_s": 0.005 if b > 1 else 0.0,
                                                        "max_concurrent_batches": 1})
        s = GaugeSampler(metrics)
        with s:
            r = load_mp(url, "bert", ns.procs, 32, ns.duration)
        r["max_batch_size"], r["gpu_util"] = b, statistics.mean(s.util) if s.util else None
        sweep.append(r)
        show(f"max_batch_size {b} (util {r['gpu_util']})", r)
    out["sweep"] = sweep
    best = max(sweep, key=lambda r: r["items_per_s"])
    print(f"batching gain: {best['items_per_s'] / sweep[0]['items_per_s']:.2f}x")
    save()

    doc = apply_batching(url, doc, "gpu", "bert", {"max_batch_size": 128, "batch_wait_timeout_s": 0.005,
                                                    "max_concurrent_batches": 1})
    multi1 = load_mp(url, "bert", ns.procs, 4, ns.duration, items=32)
    out["multi_item_1_replica"] = multi1
    show("32-item requests, 1 replica", multi1)
    save()

    if ns.gpus > 1:
        deploy(ns.gpus, 128, 0.005)
        multin = load_mp(url, "bert", ns.procs, 4 * ns.gpus, ns.duration, items=32)
        out["multi_item_n_replicas"] = multin
        show(f"32-item requests, {ns.gpus} replicas", multin)
        eff = multin["items_per_s"] / (ns.gpus * multi1["items_per_s"])
        out["scaling_efficiency"] = eff
        print(f"scaling: {multin['items_per_s']:.0f} / ({ns.gpus} x {multi1['items_per_s']:.0f}) = {eff:.2f}")
        save()
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
