"""The generation engine alone, in this process (no HTTP, no Ray): time per output token (TPOT) of
N concurrent greedy streams, for manager variants, beside `model.generate` of the same batch.
Tells the served path's cost apart from the engine's, and which manager settings a device wants.

    python -m bench.generate_engine --config bench/generate_h200.yaml --device cuda --dtype bfloat16 \\
        --tokenizer DIR --variants kv=262144 kv=16384 kv=262144,graph=1 --out DIR

A variant is comma-separated: kv=TOKENS (cache size), graph=0|1 (CUDA graphs; unset: the
manager decides), async=0|1 (the manager's double-buffered batch preparation), compile=LEVEL
(the manager's default_compile_level), qpad=/kvpad=TOKENS (graph padding intervals), temp=T
(seeded sampling at temperature T; default greedy), fusednorm=1 (bench/fused_norm.py; reverted
after the variant), running=N (max_running_sequences), seqattn=0 (transformers' packed attention
instead of app/models/sequence_sdpa.py's per-sequence call), head=auto|linear|transposed (the CPU
output projection's layout, app/models/output_projection.py; unset: auto, as served). Each
variant's tokens are compared with the first variant's of the same temperature: `same` is the
fraction of streams whose tokens match. Each stream: a --prompt-tokens prompt, then --new-tokens
tokens; TPOT = (last token - first token) / (tokens - 1), median over the streams. On CUDA the
host's cost of one kernel launch is measured first (a decoding step launches hundreds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from app.config import ModelSpec
from app.engine.generation import GenerationEngine, SamplingParams
from app.kv_cache import KVBudget, kv_bytes_per_token
from app.models import output_projection, sequence_sdpa


async def tpot_ms(engine: GenerationEngine, streams: int, prompt: int, new: int, temperature: float = 0.0,
                  tokens: Optional[dict[int, list[int]]] = None) -> float:
    """Median TPOT of `streams` concurrent streams; stream i samples with seed i when temperature > 0,
    and its tokens land in `tokens[i]` when given."""
    async def one(i: int) -> float:
        first = last = None
        got: list[int] = []
        async for ev in engine.stream([1000 + (i * 7 + j) % 20000 for j in range(prompt)],
                                      SamplingParams(max_new_tokens=new, temperature=temperature, seed=i)):
            last = time.perf_counter()
            first = first or last
            got += ev.tokens
        if tokens is not None:
            tokens[i] = got
        return (last - first) * 1000.0 / max(1, len(got) - 1)

    times = sorted(await asyncio.gather(*(one(i) for i in range(streams))))
    return times[len(times) // 2]


def generate_tpot_ms(model, streams: int, prompt: int, new: int, device: str) -> float:
    ids = torch.randint(1000, 20000, (streams, prompt), device=device)
    run = lambda n: model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,  # noqa: E731
                                   max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    with torch.no_grad():
        run(4)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        run(1)
        sync()
        t1 = time.perf_counter()
        run(new)
        sync()
        t2 = time.perf_counter()
    return ((t2 - t1) - (t1 - t0)) * 1000.0 / (new - 1)  # the prefill taken out


def launch_us(n: int = 2000) -> float:
    """Host microseconds per launch of a tiny kernel, queued back to back (the device idles)."""
    x = torch.zeros(16, device="cuda")
    for _ in range(100):
        x.add_(1)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        x.add_(1)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e6 / n


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """The bench model's arguments: its config file, device, dtype and tokenizer directory."""
    ap.add_argument("--config", default="bench/generate_cpu.yaml")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--tokenizer", default=None)


def load_model(ns: argparse.Namespace) -> tuple[ModelSpec, Any]:
    """The first model of --config, its tokenizer from --tokenizer if given, on --device in --dtype."""
    from app.models.chat import GenerationText
    from app.models.loader import build_backbone

    raw = yaml.safe_load(Path(ns.config).read_text())["applications"][0]["args"]["models"][0]
    if ns.tokenizer:
        raw["source"]["tokenizer_path"] = str(Path(ns.tokenizer).resolve())
    spec = ModelSpec.model_validate(raw)
    text = GenerationText(spec)
    return spec, build_backbone(spec, len(text), device=ns.device, dtype=getattr(torch, ns.dtype))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--variants", nargs="+", default=["kv=32768"])
    ap.add_argument("--streams", default="1,8,64")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2, help="runs per stream count; the last is kept")
    ap.add_argument("--out", default=None)
    ns = ap.parse_args()
    torch.set_num_threads(ns.threads)
    spec, model = load_model(ns)
    per_token = kv_bytes_per_token(model.config, getattr(torch, ns.dtype).itemsize)
    streams = [int(s) for s in ns.streams.split(",")]
    rows: list[dict[str, Any]] = []
    if ns.device == "cuda":
        rows.append({"variant": "kernel launch", "launch_us": launch_us()})
        print(f"one kernel launch: {rows[-1]['launch_us']:.1f} us on the host", flush=True)
    print(f"{'variant':<28}" + "".join(f"{f'{n} streams':>12}" for n in streams) + "   (TPOT ms, median)", flush=True)
    gen = {n: generate_tpot_ms(model, n, ns.prompt_tokens, ns.new_tokens, ns.device) for n in streams}
    rows.append({"variant": "model.generate", "tpot_ms": gen})
    print(f"{'model.generate':<28}" + "".join(f"{gen[n]:>12.2f}" for n in streams), flush=True)
    g = spec.generation
    references: dict[float, dict[int, list[int]]] = {}  # temperature -> the first variant's tokens
    for v in ns.variants:
        opts = dict(kv.split("=") for kv in v.split(","))
        tokens_kv = int(opts.get("kv", g.kv_cache_max_tokens))
        manager = {}
        if "graph" in opts:
            manager["use_cuda_graph"] = opts["graph"] == "1"
        if "async" in opts:
            manager["use_async_batching"] = opts["async"] == "1"
        for key, field in (("compile", "default_compile_level"), ("qpad", "q_padding_interval_size"),
                           ("kvpad", "kv_padding_interval_size")):
            if key in opts:
                manager[field] = int(opts[key])
        t0 = time.perf_counter()
        temp = float(opts.get("temp", 0.0))
        tokens: dict[int, list[int]] = {}
        engine = None
        saved_forwards = {}
        if opts.get("fusednorm") == "1":
            from bench.fused_norm import fuse_rms_norms

            saved_forwards = {m: m.__dict__.get("forward") for m in model.modules()}
            fuse_rms_norms(model)
        original_head = model.get_output_embeddings()
        if "head" in opts:
            os.environ[output_projection.LAYOUT_ENV] = opts["head"]
        if opts.get("seqattn") == "0":  # the engine's install() leaves transformers' packed call
            os.environ[sequence_sdpa.ENABLE_ENV] = "0"
            sequence_sdpa.uninstall()
        try:
            running = int(opts.get("running", max(streams)))
            output_projection.use_faster_head_layout(model, max_rows=running)  # as build_engine does
            engine = GenerationEngine(model, [-1], KVBudget(tokens_kv, per_token, 0, 1.0, "bench"),
                                      max_running=running, max_sequences=10_000,
                                      max_step_tokens=g.max_step_tokens, page_size=g.page_size,
                                      max_context_tokens=spec.max_seq_len, manager_options=manager)
            asyncio.run(tpot_ms(engine, 4, 32, 16))  # warm-up (graph capture, kernels)
            # Each stream count twice, the second kept: the first pays for the graphs its shapes need.
            got = {n: [asyncio.run(tpot_ms(engine, n, ns.prompt_tokens, ns.new_tokens, temp, tokens))
                       for _ in range(ns.repeat)][-1] for n in streams}
            engine.shutdown()
        except Exception as e:  # noqa: BLE001 - a variant the device cannot run is a result too
            if engine is not None:
                engine.shutdown()
            rows.append({"variant": v, "error": f"{type(e).__name__}: {e}"[:500]})
            print(f"{v:<28}failed: {rows[-1]['error'][:200]}", flush=True)
            write(ns, rows)
            continue
        finally:
            os.environ.pop(sequence_sdpa.ENABLE_ENV, None)
            os.environ.pop(output_projection.LAYOUT_ENV, None)
            model.set_output_embeddings(original_head)  # the engine may have replaced it
            for m, fwd in saved_forwards.items():  # the next variant gets the model as loaded
                if fwd is None:
                    m.__dict__.pop("forward", None)
                else:
                    m.forward = fwd
        reference = references.setdefault(temp, tokens)
        same = sum(tokens[i] == reference.get(i) for i in tokens) / max(1, len(tokens))
        rows.append({"variant": v, "tpot_ms": got, "setup_s": time.perf_counter() - t0, "same_tokens": same})
        print(f"{v:<28}" + "".join(f"{got[n]:>12.2f}" for n in streams) + f"   same {same:.2f}", flush=True)
        write(ns, rows)  # after each variant: a call that runs out of time keeps what it measured
        del engine
        if ns.device == "cuda":
            torch.cuda.empty_cache()
    write(ns, rows)
    return 0


def write(ns: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    if ns.out:
        Path(ns.out).mkdir(parents=True, exist_ok=True)
        (Path(ns.out) / "engine.json").write_text(json.dumps({"args": vars(ns), "rows": rows}, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
