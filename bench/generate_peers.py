"""Served generation against its peers, same model, same arrivals, same machine, one run:

- `ours`: `serve run` of this service (one generator replica, continuous batching) over HTTP;
  `ours-tp2` / `ours-pp2` (any N): the same replica as a DeepSpeed TP gang or a pipeline of N
  layer stages (app/runners/gang_generation.py), each rank with --threads torch threads;
- `transformers`: `transformers serve --continuous-batching` (the OpenAI-compatible server in the
  transformers package) over HTTP, with the same KV cache size and step token budget;
- `static`: whole batches through `model.generate` in this process (no HTTP: its best case).

    python -m bench.generate_peers --config bench/generate_cpu.yaml --rates 1,2,4 --out bench-notes/generate/peers
    python -m bench.generate_peers --config bench/generate_h200.yaml --device cuda --dtype bfloat16 ...

The model is the config's first `models` entry (random_init), saved once with its tokenizer as a
`save_pretrained` directory that both servers load, so the weights are the same bytes. Prompts are
text (decoded from seeded random token ids, lengths uniform in --prompt-tokens), greedy, with
`max_tokens` uniform in --output-tokens; every request streams. Per rate: output tokens/s, TTFT
p50/p99, time per output token (TPOT, a request's decode time over its tokens after the first)
p50/p99, the share that met --sla-ttft-ms, and errors. Prints the table, writes results.json and a
plot of output tokens/s against TTFT p99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson
import torch
import yaml

from app.config import ModelSpec
from app.quantiles import percentile
from bench.generate import plot_throughput_vs_ttft, run_static
from bench.generate_servers import (MODEL, ROOT, gang_parallel, parse_ours, peer_threads, start_ours,
                                    start_transformers, stop, wait_ready)


# ---------------------------------------------------------------- workload and client

def workload(rate: float, duration_s: float, prompt: tuple[int, int], output: tuple[int, int], tok,
             seed: int) -> list[tuple[float, str, int]]:
    rng = random.Random(seed)
    t, out = 0.0, []
    special = set(tok.all_special_ids)
    words = [i for i in range(1000, len(tok)) if i not in special]
    while True:
        t += rng.expovariate(rate)
        if t > duration_s:
            return out
        ids = [rng.choice(words) for _ in range(rng.randint(*prompt))]
        out.append((t, tok.decode(ids), rng.randint(*output)))


async def _one_stream(c: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = last = None
    chunks, usage = 0, None
    try:
        async with c.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return {"status": r.status_code}
            async for line in r.aiter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                ev = orjson.loads(line[5:])
                if "error" in ev:
                    return {"status": "error"}
                if ev.get("usage"):
                    usage = ev["usage"]
                if any(ch.get("text") for ch in ev.get("choices") or []):
                    last = time.perf_counter()
                    first = first or last
                    chunks += 1
    except httpx.HTTPError as e:
        return {"status": type(e).__name__}
    if first is None:
        return {"status": "no tokens"}
    tokens = usage["completion_tokens"] if usage else chunks
    tpot = (last - first) * 1000.0 / (tokens - 1) if tokens > 1 else None
    return {"status": 200, "ttft_ms": (first - start) * 1000.0, "tpot_ms": tpot, "tokens": tokens}


async def run_http(url: str, model: str, work) -> tuple[list[dict], float]:
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=4096)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:
        t0 = time.perf_counter()

        async def at(when: float, prompt: str, n: int) -> dict:
            await asyncio.sleep(max(0.0, t0 + when - time.perf_counter()))
            return await _one_stream(c, model, prompt, n)

        records = await asyncio.gather(*(at(*w) for w in work))
        return list(records), time.perf_counter() - t0


def summarise(engine: str, rate: float, records: list[dict], wall_s: float, sla_ms: float) -> dict:
    ok = [r for r in records if r["status"] == 200]
    ttft = sorted(r["ttft_ms"] for r in ok)
    tpot = sorted(r["tpot_ms"] for r in ok if r.get("tpot_ms") is not None)
    tokens = sum(r["tokens"] for r in ok)
    errors: dict[str, int] = {}
    for r in records:
        if r["status"] != 200:
            errors[str(r["status"])] = errors.get(str(r["status"]), 0) + 1
    p = lambda xs, q: percentile(xs, q) if xs else None  # noqa: E731
    return {"engine": engine, "rate": rate, "requests": len(records), "ok": len(ok), "errors": errors,
            "output_tokens": tokens, "output_tokens_per_s": tokens / wall_s, "ttft_p50_ms": p(ttft, 50),
            "ttft_p99_ms": p(ttft, 99), "tpot_p50_ms": p(tpot, 50), "tpot_p99_ms": p(tpot, 99),
            "sla_met": sum(t <= sla_ms for t in ttft) / max(1, len(records)), "wall_s": wall_s}


def save_model(spec: ModelSpec, model_dir: Path, dtype: torch.dtype):
    from app.models.chat import GenerationText
    from app.models.loader import build_backbone

    text = GenerationText(spec)
    if not (model_dir / "config.json").exists():
        t0 = time.perf_counter()
        model = build_backbone(spec, len(text), dtype=dtype)
        model.generation_config.pad_token_id = text.tok.pad_token_id or 0
        model.save_pretrained(model_dir)
        text.tok.save_pretrained(model_dir)
        n = sum(p.numel() for p in model.parameters())
        print(f"saved {n / 1e9:.2f} B parameters to {model_dir} in {time.perf_counter() - t0:.0f} s", flush=True)
        del model
    return text


def copy_bandwidth_bytes_per_s() -> float:
    """Device memory bandwidth as measured: a 4 GiB device-to-device copy (bytes read + written),
    median of 20 after warm-up, timed with CUDA events on random data."""
    src = torch.randn(2**29, device="cuda", dtype=torch.float32)  # 2 GiB
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1000.0)
    assert torch.equal(dst[:1024], src[:1024])
    del src, dst
    torch.cuda.empty_cache()
    return 2 * 2**31 / sorted(times)[len(times) // 2]


# ---------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "bench" / "generate_cpu.yaml"))
    ap.add_argument("--peers", default="ours,transformers,static",
                    help="comma-separated; ours@N: ours with N running sequences; ours~I: streams send at most "
                         "every I ms (generation.stream_interval_ms); ours+di: behind HAProxy with direct "
                         "ingress (the README's command), not Serve's Python proxy; ours.inproc: the engine in the "
                         "replica's own process (generation.engine_process: false); PEER/tT: that peer with T "
                         "torch threads instead of --threads")
    ap.add_argument("--rates", default="1,2,4")
    ap.add_argument("--duration-s", type=float, default=20.0)
    ap.add_argument("--prompt-tokens", default="32,256")
    ap.add_argument("--output-tokens", default="16,512")
    ap.add_argument("--sla-ttft-ms", type=float, default=1000.0)
    ap.add_argument("--static-batch", type=int, default=16)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each server (and of static)")
    ap.add_argument("--port", type=int, default=8010)
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory for a random_init model (its tokenizer_path)")
    ap.add_argument("--model-dir", default=None, help="where the model is saved (default: a temporary directory)")
    ap.add_argument("--ready-timeout-s", type=float, default=400)
    ap.add_argument("--max-running", type=int, default=None,
                    help="ours: generation.max_running_sequences instead of the config's")
    ap.add_argument("--max-step-tokens", type=int, default=None,
                    help="generation.max_step_tokens instead of the config's, for ours and transformers serve alike")
    ap.add_argument("--out", default=None)
    ns = ap.parse_args()
    raw = yaml.safe_load(Path(ns.config).read_text())["applications"][0]["args"]["models"][0]
    if ns.max_step_tokens is not None:  # a lever of the benchmark: both servers' step budget (--cb-max-batch-tokens)
        raw.setdefault("generation", {})["max_step_tokens"] = ns.max_step_tokens
    if ns.tokenizer:
        raw["source"]["tokenizer_path"] = str(Path(ns.tokenizer).resolve())
    spec = ModelSpec.model_validate(raw)
    dtype = getattr(torch, ns.dtype)
    work_dir = Path(ns.model_dir or tempfile.mkdtemp(prefix="genpeers-"))
    model_dir = work_dir / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    meta: dict = {"args": vars(ns), "ready_s": {}}
    text = save_model(spec, model_dir, dtype)
    weight_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    meta["weight_bytes"] = weight_bytes
    if ns.device == "cuda":
        meta["copy_bandwidth_bytes_per_s"] = copy_bandwidth_bytes_per_s()
        print(f"device copy bandwidth {meta['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s; weights {weight_bytes / 1e9:.2f} GB: "
              f"a decoding step reads them once, >= {weight_bytes / meta['copy_bandwidth_bytes_per_s'] * 1e3:.2f} ms", flush=True)
    p_lo, p_hi = map(int, ns.prompt_tokens.split(","))
    o_lo, o_hi = map(int, ns.output_tokens.split(","))
    rates = [float(r) for r in ns.rates.split(",")]
    works = {r: workload(r, ns.duration_s, (p_lo, p_hi), (o_lo, o_hi), text.tok, seed=int(r * 1000)) for r in rates}
    hdr = f"{'engine':<13}{'rate':>6}{'reqs':>6}{'ok':>6}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p99':>10}{'TPOT p50':>10}{'TPOT p99':>10}{'SLA':>6}"
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731

    def show(row):
        bw = meta.get("copy_bandwidth_bytes_per_s")
        if bw and row["tpot_p50_ms"]:
            # One decoding step reads every weight once; TPOT p50 is the typical step's time.
            row["bandwidth_fraction"] = weight_bytes / (row["tpot_p50_ms"] / 1000.0) / bw
        rows.append(row)
        save(ns.out, meta, rows)  # each row as it comes: a run cut off at its time limit keeps its rows
        print(f"{row['engine']:<13}{row['rate']:>6g}{row['requests']:>6}{row['ok']:>6}{row['output_tokens_per_s']:>9.1f}"
              f"{fmt(row['ttft_p50_ms'], '.0f'):>10}{fmt(row['ttft_p99_ms'], '.0f'):>10}{fmt(row['tpot_p50_ms'], '.1f'):>10}"
              f"{fmt(row['tpot_p99_ms'], '.1f'):>10}{row['sla_met']:>6.2f}"
              + (f"  bw {row['bandwidth_fraction']:.3f}" if "bandwidth_fraction" in row else "") + (f"  errors {row['errors']}" if row["errors"] else ""),
              flush=True)

    print(hdr, flush=True)
    for peer in ns.peers.split(","):
        if peer == "static":
            from transformers import AutoModelForCausalLM

            torch.set_num_threads(ns.threads)
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(ns.device).eval()
            for r in rates:
                work = [(at, text.tok(p)["input_ids"], n) for at, p, n in works[r]]
                records, wall = asyncio.run(run_static(model, work, ns.static_batch, text.tok.pad_token_id or 0,
                                                       device=ns.device))
                show(summarise("static", r, [{**x, "status": 200, "tpot_ms": None} for x in records], wall,
                               ns.sla_ttft_ms))
            del model
            continue
        ours = peer.startswith("ours")
        ns_peer = peer_threads(peer, ns)
        log_path = work_dir / f"{peer.replace('/', '_')}.log"
        with open(log_path, "w") as log:
            if ours:
                o = parse_ours(peer.partition("/t")[0])
                proc = start_ours(model_dir, raw, ns_peer, ns.port, log, gang_parallel(o.base, ns),
                                  o.max_running if o.max_running is not None else ns.max_running,
                                  direct_ingress=o.direct_ingress, stream_interval_ms=o.stream_interval_ms,
                                  in_process=o.in_process)
            else:
                proc = start_transformers(model_dir, raw, ns_peer, ns.port, log)
            try:
                url = f"http://127.0.0.1:{ns.port}"
                meta["ready_s"][peer] = wait_ready(url, MODEL if ours else str(model_dir), ns.ready_timeout_s, proc)
                for r in rates:
                    records, wall = asyncio.run(run_http(url, MODEL if ours else str(model_dir), works[r]))
                    show(summarise(peer, r, records, wall, ns.sla_ttft_ms))
            except Exception as e:  # noqa: BLE001 - a peer that fails is reported, the others still run
                print(f"{peer}: {type(e).__name__}: {e}; last log lines:", flush=True)
                print("".join(log_path.read_text().splitlines(keepends=True)[-15:]), flush=True)
            finally:
                stop(proc)
                if ours:
                    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True)
                    if o.direct_ingress:  # `ray stop` can leave Serve's HAProxy holding the port
                        subprocess.run(["pkill", "-9", "haproxy"], capture_output=True)
    for r in rates:
        by = {x["engine"]: x for x in rows if x["rate"] == r}
        for o in (p for p in by if p.startswith("ours")):
            ratios = [f"{by[o]['output_tokens_per_s'] / by[p]['output_tokens_per_s']:.2f}x {p}"
                      for p in by if not p.startswith("ours") and by[p]["output_tokens_per_s"]]
            print(f"  {o} output tokens/s at {r:g} req/s: " + ", ".join(ratios))
    save(ns.out, meta, rows)  # also when no row came (every peer failed): the meta says what was tried
    if ns.out:
        plot_throughput_vs_ttft(rows, Path(ns.out) / "throughput_vs_ttft.png")
    return 0


def save(out: str | None, meta: dict, rows: list[dict]) -> None:
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "results.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
