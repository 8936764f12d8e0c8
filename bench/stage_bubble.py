"""Encoder stage pipeline (app/runners/stage_pipeline.py) against its bubble bound, on CPU cores.

    python -m bench.stage_bubble --pp 2 --chunks 1,2,4,8 --batch 32 --out DIR

Each stage is one process with one torch thread (one core stands for one device); the reference
is the whole model in one process with one thread. Throughput = items per second over --rounds
batches, median of the rounds; the bound for p stages and m micro-batches is p*m/(m+p-1) times
the reference. No Ray: the ranks are plain processes joined over gloo, exactly the rank code the
runner's actors run (EncoderStageRank.setup / run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from app.config import ModelSpec
from app.planner import plan_model

VOCAB = 30522


def _spec(ns: argparse.Namespace, chunks: int, pp: int) -> ModelSpec:
    parallel = {"strategy": "replicated"} if pp == 1 else {
        "strategy": "tp_pp", "tp": 1, "pp": pp, "chunks": chunks, "rank_num_cpus": 1,
        "devices": {"kind": "cpu", "per_node": 1, "nodes": pp}}
    return ModelSpec.model_validate({
        "name": "bubble", "task": "embed", "max_seq_len": ns.seq, "dtype": "float32", "device": "cpu",
        "source": {"kind": "random_init", "architecture": "llama", "seed": 1,
                   "config": {"hidden_size": ns.hidden, "intermediate_size": 4 * ns.hidden,
                              "num_hidden_layers": ns.layers, "num_attention_heads": 8, "num_key_value_heads": 8}},
        "parallel": parallel})


def _batch(ns: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (ns.batch, ns.seq), generator=g)
    return ids, torch.ones_like(ids)


def _rank(rank: int, world: int, ns: argparse.Namespace, chunks: int, port: int, q) -> None:
    from app.runners.stage_pipeline import EncoderStageRank

    torch.set_num_threads(1)
    spec = _spec(ns, chunks, world)
    r = EncoderStageRank(rank, world)
    r.setup(spec, plan_model(spec, VOCAB), VOCAB, "127.0.0.1", port, None)
    batch = _batch(ns)
    times = []
    for i in range(ns.rounds + 1):
        t0 = time.perf_counter()
        r.run(batch)
        times.append(time.perf_counter() - t0)
    if rank == world - 1:
        q.put(times[1:])  # the first round warms up


def pipeline_items_per_s(ns: argparse.Namespace, pp: int, chunks: int, port: int) -> float:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(i, pp, ns, chunks, port, q)) for i in range(pp)]
    for p in procs:
        p.start()
    times = q.get(timeout=600)
    for p in procs:
        p.join()
    return ns.batch / statistics.median(times)


def one_process_items_per_s(ns: argparse.Namespace) -> float:
    from app.runners.local import LocalRunner

    torch.set_num_threads(1)
    local = LocalRunner(_spec(ns, 1, 1), VOCAB)
    local.start()
    batch = _batch(ns)
    times = []
    for _ in range(ns.rounds + 1):
        t0 = time.perf_counter()
        local.infer(*batch)
        times.append(time.perf_counter() - t0)
    return ns.batch / statistics.median(times[1:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--chunks", default="1,2,4,8")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    ns = ap.parse_args()
    one = one_process_items_per_s(ns)
    rows = [{"layout": "one process", "chunks": 1, "items_per_s": one, "vs_one": 1.0, "bound": 1.0}]
    print(f"{'layout':<16}{'m':>4}{'items/s':>10}{'vs one':>8}{'bound':>8}{'of bound':>10}\n"
          f"{'one process':<16}{1:>4}{one:>10.1f}{1.0:>8.2f}{1.0:>8.2f}{1.0:>10.2f}", flush=True)
    for i, m in enumerate(int(c) for c in ns.chunks.split(",")):
        got = pipeline_items_per_s(ns, ns.pp, m, 29400 + i)
        bound = ns.pp * m / (m + ns.pp - 1)
        rows.append({"layout": f"pp={ns.pp}", "chunks": m, "items_per_s": got, "vs_one": got / one, "bound": bound})
        print(f"{f'pp={ns.pp}':<16}{m:>4}{got:>10.1f}{got / one:>8.2f}{bound:>8.2f}{got / one / bound:>10.2f}", flush=True)
    if ns.out:
        Path(ns.out).mkdir(parents=True, exist_ok=True)
        (Path(ns.out) / "bubble.json").write_text(json.dumps({"args": vars(ns), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
