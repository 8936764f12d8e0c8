"""python -m app.bench load --url http://127.0.0.1:8000 --model minilm --concurrency 32 --duration 20"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from app.bench.load import run_load


def _load(ns: argparse.Namespace) -> int:
    summary, res = asyncio.run(
        run_load(ns.url, ns.model, ns.duration, concurrency=ns.concurrency, rate=ns.rate,
                 items_per_request=ns.items_per_request, progress=not ns.quiet)
    )
    s = summary
    print(f"model={ns.model} requests={s.requests} ok={s.ok} errors={s.errors} statuses={dict(sorted(res.status_counts.items()))}")
    print(f"throughput={s.throughput_rps:.1f} req/s  items/s={s.items_per_s:.1f}  mean batch={s.mean_batch_size:.2f}")
    print(f"latency ms: p50={s.p50_ms:.1f} p95={s.p95_ms:.1f} p99={s.p99_ms:.1f} mean={s.mean_ms:.1f}")
    if ns.out:
        Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.out).write_text(json.dumps({"args": vars(ns), "summary": s.as_dict(), "statuses": res.status_counts}, indent=2))
    return 0 if s.errors == 0 else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m app.bench")
    sub = p.add_subparsers(dest="cmd", required=True)
    lp = sub.add_parser("load", help="drive the HTTP ingress and print throughput and latency")
    lp.add_argument("--url", default="http://127.0.0.1:8000")
    lp.add_argument("--model", default="minilm")
    mode = lp.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=int, help="closed loop: this many clients in flight")
    mode.add_argument("--rate", type=float, help="open loop: Poisson arrivals at this many requests/s")
    lp.add_argument("--duration", type=float, default=20.0, help="seconds of measured load")
    lp.add_argument("--items-per-request", type=int, default=1)
    lp.add_argument("--out", help="write the summary as JSON here")
    lp.add_argument("--quiet", action="store_true", help="no progress bar")
    ns = p.parse_args(argv)
    if ns.cmd == "load":
        if ns.concurrency is None and ns.rate is None:
            ns.concurrency = 32
        return _load(ns)
    return 2


if __name__ == "__main__":
    sys.exit(main())
