"""Generation benchmark: continuous batching (the service's engine) against static batching (whole
batches through `model.generate`, each waiting for its longest member), same model, same process,
same arrivals.

    python -m bench.generate --rates 2,4,8 --duration-s 20 --out bench-notes/generate

Open-loop Poisson arrivals at each rate; prompt and output lengths drawn uniformly from
--prompt-tokens and --output-tokens (seeded, identical for both engines). Reports output tokens/s,
time to first token and inter-token latency (p50 / p99), and the share of requests that met the
SLA (TTFT <= --sla-ttft-ms); writes JSON and, with matplotlib, throughput against TTFT p99.
Static batching cannot stream: its first token arrives with the whole batch's answer.

The model is the shipped serve_config.generate.yaml's unless --config names another.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml

from app.config import ModelSpec
from app.engine.generation import GenerationEngine, SamplingParams
from app.kv_cache import kv_budget, kv_bytes_per_token
from app.models.loader import build_backbone
from app.quantiles import percentile

ROOT = Path(__file__).resolve().parents[1]


def workload(rate: float, duration_s: float, prompt: tuple[int, int], output: tuple[int, int], vocab: int,
             seed: int) -> list[tuple[float, list[int], int]]:
    rng = random.Random(seed)
    t, out = 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t > duration_s:
            return out
        n = rng.randint(*prompt)
        out.append((t, [rng.randrange(1000, vocab) for _ in range(n)], rng.randint(*output)))


def summarise(name: str, rate: float, records: list[dict], wall_s: float, sla_ms: float) -> dict:
    ttft = sorted(r["ttft_ms"] for r in records)
    itl = sorted(x for r in records for x in r["itl_ms"])
    tokens = sum(r["tokens"] for r in records)
    return {"engine": name, "rate": rate, "requests": len(records), "output_tokens": tokens,
            "output_tokens_per_s": tokens / wall_s, "ttft_p50_ms": percentile(ttft, 50), "ttft_p99_ms": percentile(ttft, 99),
            "itl_p50_ms": percentile(itl, 50) if itl else None, "itl_p99_ms": percentile(itl, 99) if itl else None,
            "sla_met": sum(t <= sla_ms for t in ttft) / max(1, len(ttft)), "wall_s": wall_s}


async def run_continuous(engine: GenerationEngine, work) -> tuple[list[dict], float]:
    t0 = time.perf_counter()

    async def one(at: float, prompt: list[int], n: int) -> dict:
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        start = time.perf_counter()
        first, last, itl, tokens = None, None, [], 0
        async for ev in engine.stream(prompt, SamplingParams(max_new_tokens=n)):
            now = time.perf_counter()
            if first is None:
                first = now
            elif ev.tokens:
                itl.extend([(now - last) * 1000.0 / len(ev.tokens)] * len(ev.tokens))
            last = now
            tokens += len(ev.tokens)
        return {"ttft_ms": (first - start) * 1000.0, "itl_ms": itl, "tokens": tokens}

    records = await asyncio.gather(*(one(*w) for w in work))
    return list(records), time.perf_counter() - t0


async def run_static(model, work, max_batch: int, pad_id: int, device: str = "cpu") -> tuple[list[dict], float]:
    """Batches formed from whatever has arrived when the device frees, run to the longest member."""
    t0 = time.perf_counter()
    queue: asyncio.Queue = asyncio.Queue()
    pool = ThreadPoolExecutor(1)
    records: list[dict] = []

    async def arrive():
        for at, prompt, n in work:
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            queue.put_nowait((time.perf_counter(), prompt, n))

    def generate(batch):
        width = max(len(p) for _, p, _ in batch)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for _, p, _ in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for _, p, _ in batch], device=device)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max(n for *_, n in batch),
                                 eos_token_id=None, pad_token_id=pad_id)
        return out.shape[1] - width

    producer = asyncio.create_task(arrive())
    done = 0
    loop = asyncio.get_running_loop()
    while done < len(work):
        batch = [await queue.get()]
        while not queue.empty() and len(batch) < max_batch:
            batch.append(queue.get_nowait())
        await loop.run_in_executor(pool, generate, batch)
        end = time.perf_counter()
        for arrived, _, n in batch:  # every member answers when the batch does
            records.append({"ttft_ms": (end - arrived) * 1000.0, "itl_ms": [], "tokens": n})
        done += len(batch)
    await producer
    pool.shutdown()
    return records, time.perf_counter() - t0


def plot_throughput_vs_ttft(rows: list[dict], path: Path) -> None:
    """Output tokens/s against TTFT p99, a line per engine (skipped without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["engine"] for r in rows):
        pts = [r for r in rows if r["engine"] == name and r["ttft_p99_ms"] is not None]
        ax.plot([r["ttft_p99_ms"] for r in pts], [r["output_tokens_per_s"] for r in pts], "o-", label=name)
    ax.set_xlabel("TTFT p99 (ms)")
    ax.set_ylabel("output tokens/s")
    ax.set_xscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "serve_config.generate.yaml"))
    ap.add_argument("--rates", default="2,4,8", help="arrival rates, requests/s")
    ap.add_argument("--duration-s", type=float, default=20.0)
    ap.add_argument("--prompt-tokens", default="32,128")
    ap.add_argument("--output-tokens", default="16,64")
    ap.add_argument("--sla-ttft-ms", type=float, default=1000.0)
    ap.add_argument("--static-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-running", type=int, default=None, help="sequences per step (default: the config's)")
    ap.add_argument("--out", default=None, help="directory for results.json and the plot")
    ns = ap.parse_args()
    torch.set_num_threads(ns.threads)
    raw = yaml.safe_load(Path(ns.config).read_text())["applications"][0]["args"]["models"][0]
    spec = ModelSpec.model_validate(raw)
    from app.models.chat import GenerationText

    text = GenerationText(spec)
    model = build_backbone(spec, len(text))
    g = spec.generation
    budget = kv_budget(16 * 2**30, kv_bytes_per_token(model.config, torch.float32.itemsize), g.kv_cache_memory_fraction,
                       g.kv_cache_max_tokens)
    running = ns.max_running or g.max_running_sequences
    # Everything offered is admitted (open loop: the queue is the engine's own, as static batching's is).
    engine = GenerationEngine(model, [-1], budget, max_running=running, max_sequences=100_000,
                              max_step_tokens=g.max_step_tokens,
                              page_size=g.page_size, max_context_tokens=spec.max_seq_len)
    p_lo, p_hi = map(int, ns.prompt_tokens.split(","))
    o_lo, o_hi = map(int, ns.output_tokens.split(","))
    rows = []
    print(f"{'engine':<12}{'rate':>6}{'reqs':>6}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}{'ITL p99':>9}{'SLA':>6}")
    for rate in [float(r) for r in ns.rates.split(",")]:
        work = workload(rate, ns.duration_s, (p_lo, p_hi), (o_lo, o_hi), len(text), seed=int(rate * 1000))
        for name in ("continuous", "static"):
            if name == "continuous":
                records, wall = asyncio.run(run_continuous(engine, work))
            else:
                records, wall = asyncio.run(run_static(model, work, ns.static_batch, text.tok.pad_token_id or 0))
            row = summarise(name, rate, records, wall, ns.sla_ttft_ms)
            rows.append(row)
            itl50 = f"{row['itl_p50_ms']:.1f}" if row["itl_p50_ms"] is not None else "-"
            itl99 = f"{row['itl_p99_ms']:.1f}" if row["itl_p99_ms"] is not None else "-"
            print(f"{name:<12}{rate:>6g}{row['requests']:>6}{row['output_tokens_per_s']:>9.1f}{row['ttft_p50_ms']:>10.0f}"
                  f"{row['ttft_p99_ms']:>10.0f}{itl50:>9}{itl99:>9}{row['sla_met']:>6.2f}", flush=True)
        cb, st = rows[-2], rows[-1]
        print(f"  continuous / static output tokens/s at {rate:g} req/s: {cb['output_tokens_per_s'] / st['output_tokens_per_s']:.2f}x")
    engine.shutdown()
    if ns.out:
        out = Path(ns.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"args": vars(ns), "rows": rows}, indent=1))
        plot_throughput_vs_ttft(rows, out / "throughput_vs_ttft.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
