"""HTTP load generator: closed loop (fixed concurrency) or open loop (Poisson arrivals)."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Sequence

import httpx
from tqdm import tqdm

from bench.stats import Summary, summarize

SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Dynamic batching trades a little latency for a lot of throughput.",
    "A man is playing a guitar on the street corner.",
    "Tensor parallelism splits each layer across several devices.",
    "The weather tomorrow will be sunny with a light breeze.",
    "Serving systems are judged by their tail latency under load.",
]


@dataclass
class LoadResult:
    latencies_s: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    ok: int = 0
    errors: int = 0
    items: int = 0
    status_counts: dict[int, int] = field(default_factory=dict)


def _body(items_per_request: int, rng: random.Random, texts: Sequence[str] = SAMPLE_TEXTS) -> dict:
    return {"instances": [rng.choice(texts) for _ in range(items_per_request)]}


async def _one(client: httpx.AsyncClient, path: str, body: dict, res: LoadResult, bar: tqdm | None) -> None:
    t0 = time.perf_counter()
    try:
        r = await client.post(path, json=body)
        status = r.status_code
    except httpx.HTTPError:
        status = 0
        r = None
    dt = time.perf_counter() - t0
    res.status_counts[status] = res.status_counts.get(status, 0) + 1
    if status == 200 and r is not None:
        res.ok += 1
        res.items += len(body["instances"])
        res.latencies_s.append(dt)
        bs = r.headers.get("x-batch-size")
        if bs is not None:
            res.batch_sizes.append(int(bs))
    else:
        res.errors += 1
    if bar is not None:
        bar.update(1)


async def run_load(
    url: str,
    model: str,
    duration_s: float,
    concurrency: int | None = None,
    rate: float | None = None,
    items_per_request: int = 1,
    seed: int = 0,
    progress: bool = True,
    warmup_requests: int = 4,
    texts: Sequence[str] = SAMPLE_TEXTS,
) -> tuple[Summary, LoadResult]:
    """Drive `POST /v1/models/{model}:predict` for `duration_s` seconds; return the summary."""
    if (concurrency is None) == (rate is None):
        raise ValueError("give exactly one of concurrency (closed loop) or rate (open loop)")
    rng = random.Random(seed)
    path = f"/v1/models/{model}:predict"
    limits = httpx.Limits(max_connections=max(concurrency or 0, 256), max_keepalive_connections=max(concurrency or 0, 256))
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        for _ in range(warmup_requests):
            await client.post(path, json=_body(items_per_request, rng, texts))
        res = LoadResult()
        bar = tqdm(desc=f"{model} load", unit="req", disable=not progress, leave=False)
        start = time.perf_counter()
        deadline = start + duration_s
        if concurrency is not None:
            async def worker() -> None:
                while time.perf_counter() < deadline:
                    await _one(client, path, _body(items_per_request, rng, texts), res, bar)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            tasks = []
            next_t = start
            while next_t < deadline:
                delay = next_t - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(_one(client, path, _body(items_per_request, rng, texts), res, bar)))
                next_t += rng.expovariate(rate)
            await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
        bar.close()
    return summarize(res.latencies_s, res.ok, res.errors, res.items, elapsed, res.batch_sizes), res
