"""Where a generation step's device time goes: the engine alone (as bench.generate_engine runs it)
under torch.profiler, N concurrent greedy streams; prints the top kernels by device time, the
device-busy share of the wall time, and writes the tables as JSON.

    python -m bench.profile_kernels --config bench/generate_h200.yaml --device cuda --dtype bfloat16 \\
        --tokenizer DIR --streams 64 --out DIR
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import torch

from app.engine.generation import GenerationEngine
from app.kv_cache import KVBudget, kv_bytes_per_token
from bench.generate_engine import add_model_args, load_model, tpot_ms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--steps", type=int, default=20, help="decoding steps profiled")
    ap.add_argument("--kv-tokens", type=int, default=65536)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default=None)
    ns = ap.parse_args()
    torch.set_num_threads(ns.threads)
    spec, model = load_model(ns)
    g = spec.generation
    engine = GenerationEngine(model, [-1], KVBudget(ns.kv_tokens, kv_bytes_per_token(model.config, model.dtype.itemsize),
                                                    0, 1.0, "bench"),
                              max_running=ns.streams, max_sequences=10_000, max_step_tokens=g.max_step_tokens,
                              page_size=g.page_size, max_context_tokens=spec.max_seq_len)
    asyncio.run(tpot_ms(engine, 4, 32, 8))  # warm-up
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if ns.device == "cuda" else [])
    # The profiler records the thread that starts it: the manager's steps run on its own thread,
    # so it is started and stopped there, from the model's forward, around decoding steps only
    # (forward calls past the prefill of every stream: the step count is the new tokens' middle).
    prof = torch.profiler.profile(activities=activities)
    forward, calls, span = model.forward, [0], {}
    first = ns.new_tokens // 4 + ns.streams * ns.prompt_tokens // g.max_step_tokens + 1
    last = first + ns.steps

    def profiled_forward(*args, **kwargs):
        calls[0] += 1
        if calls[0] == first:
            prof.start()
            span["t0"] = time.perf_counter()
        out = forward(*args, **kwargs)
        if calls[0] == last:
            if ns.device == "cuda":
                torch.cuda.synchronize()
            span["t1"] = time.perf_counter()
            prof.stop()
        return out

    model.forward = profiled_forward
    tpot = asyncio.run(tpot_ms(engine, ns.streams, ns.prompt_tokens, ns.new_tokens))
    engine.shutdown()
    model.forward = forward
    if "t1" not in span:
        raise SystemExit(f"only {calls[0]} forward calls; the profile wanted calls {first}..{last}")
    wall_s = span["t1"] - span["t0"]
    events = prof.key_averages()
    dev = "cuda" if ns.device == "cuda" else "cpu"
    key = f"self_{dev}_time_total"

    def rows(sort: str) -> list[dict]:
        out = []
        for e in sorted(events, key=lambda e: getattr(e, sort, 0.0), reverse=True)[: ns.top]:
            out.append({"name": e.key[:90], "calls": e.count, "self_device_ms": getattr(e, key, 0.0) / 1000.0,
                        "self_cpu_ms": e.self_cpu_time_total / 1000.0})
        return out

    by_device, by_cpu = rows(key), rows("self_cpu_time_total")
    device_busy_ms = sum(getattr(e, key, 0.0) for e in events) / 1000.0
    print(f"{ns.streams} streams: TPOT {tpot:.2f} ms; {ns.steps} steps profiled: {wall_s * 1000 / ns.steps:.2f} ms a "
          f"step, device busy {device_busy_ms / ns.steps:.2f} ms a step ({device_busy_ms / 10 / wall_s:.0f} % of wall)")
    for title, table in (("by device time", by_device), ("by host (self CPU) time", by_cpu)):
        print(f"\n{title}:\n{'kernel / op':<92}{'calls':>8}{'device ms':>12}{'cpu ms':>10}")
        for r in table:
            print(f"{r['name']:<92}{r['calls']:>8}{r['self_device_ms']:>12.1f}{r['self_cpu_ms']:>10.1f}")
    if ns.out:
        Path(ns.out).mkdir(parents=True, exist_ok=True)
        (Path(ns.out) / "kernels.json").write_text(json.dumps(
            {"args": vars(ns), "tpot_ms": tpot, "wall_s": wall_s, "steps": ns.steps, "device_busy_ms": device_busy_ms,
             "by_device": by_device, "by_cpu": by_cpu}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
