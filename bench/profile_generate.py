"""Where a decoding step's time goes on a device: the host's Python speed, one decode forward's
host time against its device time, torch.profiler's top operators over `model.generate`, and a
stack sampler over the continuous-batching manager's thread while the engine decodes.

    python -m bench.profile_generate --config bench/generate_h200.yaml --device cuda --dtype bfloat16 \\
        --tokenizer DIR --streams 8 --out DIR

Prints short tables and writes profile.json under --out. Answers: is a step launch/host-bound
(device busy a small fraction of the step), and which host functions take the step.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import threading
import time
from pathlib import Path

import torch

from app.engine.generation import GenerationEngine
from app.kv_cache import KVBudget, kv_bytes_per_token
from bench.generate_engine import add_model_args, load_model, tpot_ms


def python_loop_s() -> float:
    """Host speed in one number: seconds for a 5M-iteration pure-Python loop (this repo's 2-core
    machine takes ~0.15 s)."""
    t0 = time.perf_counter()
    total = 0
    for i in range(5_000_000):
        total += i
    return time.perf_counter() - t0


def decode_forward_ms(model, streams: int, prompt: int, device: str, reps: int = 20) -> dict[str, float]:
    """One decode forward of `streams` sequences after a `prompt`-token prefill: host wall time
    with a sync after each, host time to enqueue without syncing, and device time by events."""
    from transformers import DynamicCache

    ids = torch.randint(1000, 20000, (streams, prompt), device=device)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        for _ in range(3):
            model(input_ids=nxt, past_key_values=cache, use_cache=True)
        sync()
        walls, enqueues, events = [], [], []
        for _ in range(reps):
            if device == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
            t0 = time.perf_counter()
            model(input_ids=nxt, past_key_values=cache, use_cache=True)
            t1 = time.perf_counter()
            if device == "cuda":
                b.record()
            sync()
            t2 = time.perf_counter()
            enqueues.append((t1 - t0) * 1e3)
            walls.append((t2 - t0) * 1e3)
            if device == "cuda":
                events.append(a.elapsed_time(b))
    med = lambda xs: sorted(xs)[len(xs) // 2] if xs else float("nan")  # noqa: E731
    return {"wall_ms": med(walls), "enqueue_ms": med(enqueues), "device_ms": med(events)}


def profile_generate(model, streams: int, prompt: int, new: int, device: str, top: int) -> dict:
    """torch.profiler over model.generate: top operators by self host time, and device busy time."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(1000, 20000, (streams, prompt), device=device)
    run = lambda: model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,  # noqa: E731
                                 max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.no_grad():
        run()
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            run()
            if device == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
    avgs = prof.key_averages()
    host = sorted(avgs, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    dev_us = sum(getattr(e, "self_device_time_total", 0) for e in avgs)
    return {"wall_s": wall, "device_busy_s": dev_us / 1e6,
            "top_host_ops": [{"op": e.key, "count": e.count, "self_host_ms": e.self_cpu_time_total / 1e3}
                             for e in host]}


class StackSampler:
    """Every `period_s`, the innermost frames of one thread (the manager's): what it is doing."""

    def __init__(self, thread: threading.Thread, period_s: float = 0.002):
        self.ident, self.period = thread.ident, period_s
        self.leaf: collections.Counter = collections.Counter()
        self.inclusive: collections.Counter = collections.Counter()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            frame = sys._current_frames().get(self.ident)
            if frame is None:
                continue
            self.samples += 1
            self.leaf[_where(frame)] += 1
            seen = set()
            while frame is not None:
                key = _where(frame)
                if key not in seen:
                    seen.add(key)
                    self.inclusive[key] += 1
                frame = frame.f_back

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _where(frame) -> str:
    code = frame.f_code
    path = code.co_filename
    for marker in ("site-packages/", "/app/", "/bench/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{code.co_name} ({path}:{code.co_firstlineno})"


def manager_thread(engine: GenerationEngine) -> threading.Thread:
    for name in ("_generation_thread", "generation_thread", "_thread", "thread"):
        t = getattr(engine.manager, name, None)
        if isinstance(t, threading.Thread):
            return t
    known = {threading.main_thread().ident, threading.get_ident()}
    return next(t for t in threading.enumerate() if t.ident not in known and t.is_alive())


def _model_alone(model, ns, report: dict) -> None:
    fwd = decode_forward_ms(model, ns.streams, ns.prompt_tokens, ns.device)
    report["decode_forward"] = fwd
    print(f"one decode forward, {ns.streams} streams: wall {fwd['wall_ms']:.2f} ms, enqueue {fwd['enqueue_ms']:.2f} ms, "
          f"device {fwd['device_ms']:.2f} ms", flush=True)
    gen = profile_generate(model, ns.streams, ns.prompt_tokens, ns.new_tokens, ns.device, ns.top)
    report["generate_profile"] = gen
    print(f"\nmodel.generate {ns.streams}x{ns.new_tokens}: wall {gen['wall_s']:.2f} s, device busy "
          f"{gen['device_busy_s']:.2f} s ({gen['device_busy_s'] / gen['wall_s']:.0%})")
    print(f"{'operator':<48}{'calls':>8}{'self host ms':>14}")
    for row in gen["top_host_ops"]:
        print(f"{row['op'][:47]:<48}{row['count']:>8}{row['self_host_ms']:>14.1f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--kv-tokens", type=int, default=65536)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--manager", default="", help="extra ContinuousBatchingConfig fields, k=v,k=v (bools as 0/1)")
    ap.add_argument("--sdp", default="", help="SDPA backends to turn off, e.g. cudnn,math (torch.backends.cuda.enable_*_sdp)")
    ap.add_argument("--engine-only", action="store_true", help="skip the forward timing and the generate profile")
    ap.add_argument("--out", default=None)
    ns = ap.parse_args()
    torch.set_num_threads(ns.threads)
    for name in filter(None, ns.sdp.split(",")):
        getattr(torch.backends.cuda, f"enable_{name}_sdp")(False)
    spec, model = load_model(ns)
    dtype = getattr(torch, ns.dtype)
    report: dict = {"args": vars(ns), "torch": torch.__version__, "param_device": str(next(model.parameters()).device)}
    report["python_loop_s"] = python_loop_s()
    print(f"params on {report['param_device']}; 5M-iteration Python loop {report['python_loop_s']:.3f} s", flush=True)

    if not ns.engine_only:
        _model_alone(model, ns, report)

    g = spec.generation
    manager = {}
    for kv in filter(None, ns.manager.split(",")):
        k, v = kv.split("=")
        manager[k] = bool(int(v)) if v in ("0", "1") else int(v) if v.isdigit() else v
    per_token = kv_bytes_per_token(model.config, dtype.itemsize)
    engine = GenerationEngine(model, [-1], KVBudget(ns.kv_tokens, per_token, 0, 1.0, "bench"),
                              max_running=max(ns.streams, 1), max_sequences=10_000, max_step_tokens=g.max_step_tokens,
                              page_size=g.page_size, max_context_tokens=spec.max_seq_len, manager_options=manager)
    asyncio.run(tpot_ms(engine, 4, 32, 16))  # warm-up: graph capture, kernels
    with StackSampler(manager_thread(engine)) as sampler:
        t0 = time.perf_counter()
        tpot = asyncio.run(tpot_ms(engine, ns.streams, ns.prompt_tokens, ns.new_tokens))
        wall = time.perf_counter() - t0
    engine.shutdown()
    n = max(1, sampler.samples)
    report["engine"] = {"tpot_ms": tpot, "wall_s": wall, "samples": sampler.samples,
                        "leaf": [{"frame": k, "share": c / n} for k, c in sampler.leaf.most_common(ns.top)],
                        "inclusive": [{"frame": k, "share": c / n} for k, c in sampler.inclusive.most_common(3 * ns.top)]}
    print(f"\nengine {ns.streams} streams: TPOT {tpot:.1f} ms; manager thread sampled {sampler.samples} times")
    print(f"{'innermost frame (share of samples)':<80}{'share':>8}")
    for row in report["engine"]["leaf"]:
        print(f"{row['frame'][:79]:<80}{row['share']:>8.1%}")
    print(f"\n{'frame on the stack (inclusive)':<80}{'share':>8}")
    for row in report["engine"]["inclusive"]:
        print(f"{row['frame'][:79]:<80}{row['share']:>8.1%}")
    if ns.out:
        Path(ns.out).mkdir(parents=True, exist_ok=True)
        (Path(ns.out) / "profile.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
