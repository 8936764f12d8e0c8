"""Local vs DeepSpeed TP=2 vs Fairscale PP=2 on a Llama-shaped ~7B model in bf16 (needs 2 GPUs).

    python -m bench.parallel_gpu [--layers 32] [--batches 1,16,64,128] [--out DIR]

Runs each strategy through the project's own runners (the ones Serve replicas use), one after the
other on the same seeded weights, and prints batch-1 latency, best-batch throughput and the relative
error of each against the local runner. Writes parallel_gpu.json under --out (default $OUT or .).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from app.config import ModelSpec
from bench.timing import median_wall_s
from app.planner import plan_model

VOCAB = 32000


SHAPE = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32}
DEVICE = {"device": "cuda", "kind": "gpu", "dtype": "bfloat16"}


def llama_spec(layers: int, strategy: str, seq: int, **parallel: Any) -> ModelSpec:
    return ModelSpec.model_validate({
        "name": "llama7b",
        "source": {"kind": "random_init", "architecture": "llama", "seed": 0,
                   "config": {**SHAPE, "num_hidden_layers": layers, "vocab_size": VOCAB,
                              "max_position_embeddings": 4096}},
        "task": "embed",
        "max_seq_len": seq,
        "dtype": DEVICE["dtype"],
        "device": DEVICE["device"],
        "batching": {"max_batch_size": 1024},
        "parallel": {"strategy": strategy, "devices": {"kind": DEVICE["kind"], "per_node": 2, "memory_gib": 80},
                     "rank_num_cpus": 1, **parallel},
    })


def make_inputs(batch: int, seq: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    return ids, mask


def measure(name: str, runner: Any, batches: list[int], seq: int, reference: torch.Tensor | None) -> dict[str, Any]:
    ids, mask = make_inputs(8, seq, seed=1)
    ids[3, seq // 2:] = 0
    mask[3, seq // 2:] = 0
    for _ in range(3):
        out = runner.infer(ids, mask)
    rel = None if reference is None else float((out - reference).norm() / reference.norm())
    one = make_inputs(1, seq)
    for _ in range(5):
        runner.infer(*one)
    lat_ms = median_wall_s(lambda: runner.infer(*one), 30) * 1000
    thr: dict[int, float] = {}
    for b in batches:
        x = make_inputs(b, seq, seed=b)
        try:
            runner.infer(*x)
            dt = median_wall_s(lambda: runner.infer(*x), 5)
            thr[b] = b / dt
        except torch.OutOfMemoryError:  # a batch too large for the device: skip it
            thr[b] = float("nan")
            torch.cuda.empty_cache()
        print(f"  {name} batch {b}: {thr[b]:.1f} seq/s", flush=True)
    best_b = max((b for b in thr if thr[b] == thr[b]), key=lambda b: thr[b])
    return {"name": name, "batch1_latency_ms": lat_ms, "throughput": thr, "best_batch": best_b,
            "best_throughput": thr[best_b], "rel_err_vs_local": rel, "output": out}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.parallel_gpu")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batches", default="1,16,64,128")
    p.add_argument("--chunks", default="4,8", help="PP micro-batch counts to try")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="float32 with few --layers checks equivalence at full precision")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the script, measures nothing")
    ns = p.parse_args(argv)
    batches = [int(x) for x in ns.batches.split(",")]
    DEVICE["dtype"] = ns.dtype
    if ns.smoke:
        SHAPE.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)
        DEVICE.update(device="cpu", kind="cpu", dtype="float32")
    elif torch.cuda.device_count() < 2:
        raise SystemExit("needs 2 GPUs")
    results: list[dict[str, Any]] = []

    from app.runners.local import LocalRunner

    spec = llama_spec(ns.layers, "replicated", ns.seq)
    t0 = time.perf_counter()
    local = LocalRunner(spec, VOCAB)
    local.start()
    params = sum(p.numel() for p in local.model.parameters())
    print(f"local: {params / 1e9:.2f} B parameters, built in {time.perf_counter() - t0:.1f}s", flush=True)
    r = measure("local (1 GPU)", local, batches, ns.seq, None)
    reference = r["output"]
    results.append(r)
    local.shutdown()
    del local
    gc.collect()
    torch.cuda.empty_cache()

    import ray

    from app.runners.deepspeed_tp import TensorParallelRunner

    ray.init(num_gpus=0 if ns.smoke else 2, num_cpus=8, include_dashboard=False)
    tp_spec = llama_spec(ns.layers, "deepspeed_tp", ns.seq, tp=2)
    t0 = time.perf_counter()
    tp = TensorParallelRunner(tp_spec, VOCAB, plan_model(tp_spec, VOCAB))
    tp.start()
    print(f"tp=2 started in {time.perf_counter() - t0:.1f}s", flush=True)
    results.append(measure("deepspeed TP=2", tp, batches, ns.seq, reference))
    tp.shutdown()
    ray.shutdown()

    from app.runners.fairscale_pp import PipelineRunner

    for m in [int(x) for x in ns.chunks.split(",")]:
        pp_spec = llama_spec(ns.layers, "fairscale_pp", ns.seq, pp=2, chunks=m)
        plan = plan_model(pp_spec, VOCAB)
        pp = PipelineRunner(pp_spec, VOCAB, plan)
        pp.start()
        res = measure(f"fairscale PP=2 m={m}", pp, batches, ns.seq, reference)
        res["chunks"], res["balance"] = m, list(plan.balance or ())
        results.append(res)
        pp.shutdown()
        del pp
        gc.collect()
        torch.cuda.empty_cache()

    base = results[0]
    print(f"\n{params / 1e9:.2f} B parameters, {DEVICE['dtype']}, seq {ns.seq}")
    print(f"{'runner':<24}{'b1 ms':>9}{'best seq/s':>12}{'@b':>6}{'rel err':>10}  vs goal")
    for r in results:
        goal = ""
        if r["name"].startswith("deepspeed"):
            ratio = r["batch1_latency_ms"] / base["batch1_latency_ms"]
            goal = f"b1 latency {ratio:.2f} x local (goal <= 0.60)"
        elif r["name"].startswith("fairscale"):
            m, pp_ = r["chunks"], 2
            ideal = pp_ * m / (m + pp_ - 1)
            ratio = r["best_throughput"] / base["best_throughput"]
            goal = f"throughput {ratio:.2f} x local; goal >= 0.85 x {ideal:.2f} = {0.85 * ideal:.2f}"
        err = "-" if r["rel_err_vs_local"] is None else f"{r['rel_err_vs_local']:.1e}"
        print(f"{r['name']:<24}{r['batch1_latency_ms']:>9.2f}{r['best_throughput']:>12.1f}{r['best_batch']:>6}{err:>10}  {goal}")
    Path(ns.out).mkdir(parents=True, exist_ok=True)
    doc = {"params": params, "seq": ns.seq, "dtype": DEVICE["dtype"], "layers": ns.layers, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "results": [{k: v for k, v in r.items() if k != "output"} for r in results]}
    (Path(ns.out) / f"parallel_gpu_{DEVICE['dtype']}_{ns.layers}l.json").write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
