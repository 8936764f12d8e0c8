"""python -m bench {load,sweep,tune} ...

  load   drive the HTTP ingress, print throughput / latency / batch size / cost per 1000
  sweep  retune max_batch_size live over a list, load each, print the table and write plots
  tune   Optuna search of batch size, wait and concurrent batches for max throughput under a p99
  retune set batching fields of a running model live (no restart)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import yaml

from bench.load import run_load


def _cost_per_1k(metrics_url: str | None, model: str) -> float | None:
    from bench.scrape import sample_values

    name = "ray_batchserve_cost_per_1k_requests_usd"
    got = sample_values(metrics_url, {name}, model) if metrics_url else None
    vals = got[name] if got else []
    return sum(vals) / len(vals) if vals else None


def _load(ns: argparse.Namespace) -> int:
    summary, res = asyncio.run(
        run_load(ns.url, ns.model, ns.duration, concurrency=ns.concurrency, rate=ns.rate,
                 items_per_request=ns.items_per_request, progress=not ns.quiet)
    )
    s = summary
    cost = _cost_per_1k(ns.metrics_url, ns.model)
    print(f"model={ns.model} requests={s.requests} ok={s.ok} errors={s.errors} statuses={dict(sorted(res.status_counts.items()))}")
    print(f"throughput={s.throughput_rps:.1f} req/s  items/s={s.items_per_s:.1f}  mean batch={s.mean_batch_size:.2f}")
    print(f"latency ms: p50={s.p50_ms:.1f} p95={s.p95_ms:.1f} p99={s.p99_ms:.1f} mean={s.mean_ms:.1f}")
    print("cost per 1000 requests: " + (f"${cost:.4f}" if cost is not None else "n/a (give --metrics-url)"))
    if ns.out:
        Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.out).write_text(json.dumps({"args": vars(ns), "summary": s.as_dict(), "statuses": res.status_counts,
                                            "cost_per_1k_usd": cost}, indent=2))
    return 0 if s.errors == 0 else 1


def _connect(ns: argparse.Namespace) -> tuple[dict, str]:
    import ray

    config = yaml.safe_load(Path(ns.config).read_text())
    app = ns.app or config["applications"][0]["name"]
    if not ray.is_initialized():
        ray.init(address=ns.address, log_to_driver=False)
    return config, app


def _sweep(ns: argparse.Namespace) -> int:
    from bench.sweep import HEADER, format_row, run_sweep, write_outputs

    config, app = _connect(ns)
    sizes = [int(x) for x in ns.batch_sizes.split(",")]
    print(HEADER)
    rows = run_sweep(ns.url, config, app, ns.model, sizes, concurrency=ns.concurrency, rate=ns.rate,
                     duration_s=ns.duration, items_per_request=ns.items_per_request, metrics_url=ns.metrics_url,
                     progress=False, batch_wait_s=ns.batch_wait_s)
    print("\n" + HEADER)
    for r in rows:
        print(format_row(r))
    base = next((r for r in rows if r.max_batch_size == 1), None)
    best = max(rows, key=lambda r: r.items_per_s)
    if base and base.items_per_s > 0:
        print(f"batching gain: {best.items_per_s / base.items_per_s:.2f}x (batch {best.max_batch_size} vs 1)")
    for p in write_outputs(rows, Path(ns.out), f"{ns.model}: concurrency {ns.concurrency or '-'} rate {ns.rate or '-'}"):
        print(f"wrote {p}")
    return 0


def _tune(ns: argparse.Namespace) -> int:
    from bench.retune import current_batching
    from bench.tune import override_yaml, run_tune

    config, app = _connect(ns)
    base = current_batching(ns.url, ns.model)
    result = run_tune(ns.url, config, app, ns.model, p99_ms=ns.p99_ms, trials=ns.trials,
                      study_db=Path(ns.study_db), study_name=ns.study_name, concurrency=ns.concurrency,
                      rate=ns.rate, duration_s=ns.duration, max_batch_size=ns.max_batch_size)
    print(json.dumps(result, indent=2))
    if result["best"] is None:
        print(f"no trial met p99 <= {ns.p99_ms} ms", file=sys.stderr)
        return 1
    text = override_yaml(app, ns.model, result["best"]["params"], base)
    Path(ns.override_out).write_text(text)
    print(f"wrote {ns.override_out}:\n{text}")
    return 0


def _retune(ns: argparse.Namespace) -> int:
    from bench.retune import apply_batching, current_batching

    config, app = _connect(ns)
    uc = current_batching(ns.url, ns.model)
    for item in ns.set:
        key, _, value = item.partition("=")
        if key not in uc:
            print(f"unknown batching field {key!r}; fields: {sorted(uc)}", file=sys.stderr)
            return 2
        uc[key] = yaml.safe_load(value)
    apply_batching(ns.url, config, app, ns.model, uc)
    print(json.dumps(current_batching(ns.url, ns.model)))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp: argparse.ArgumentParser, duration: float) -> None:
        sp.add_argument("--url", default="http://127.0.0.1:8000")
        sp.add_argument("--model", default="minilm")
        mode = sp.add_mutually_exclusive_group()
        mode.add_argument("--concurrency", type=int, help="closed loop: this many clients in flight (default 32)")
        mode.add_argument("--rate", type=float, help="open loop: Poisson arrivals at this many requests/s")
        sp.add_argument("--duration", type=float, default=duration, help="seconds of measured load per run")
        sp.add_argument("--items-per-request", type=int, default=1)
        sp.add_argument("--metrics-url", help="Ray's Prometheus endpoint, e.g. http://127.0.0.1:8080/metrics")

    def cluster(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", default="serve_config.yaml", help="the config the cluster runs (all its apps)")
        sp.add_argument("--app", help="application name (default: the config's first)")
        sp.add_argument("--address", default="auto", help="Ray cluster address")

    lp = sub.add_parser("load", help="drive the HTTP ingress and print throughput and latency")
    common(lp, 20.0)
    lp.add_argument("--out", help="write the summary as JSON here")
    lp.add_argument("--quiet", action="store_true", help="no progress bar")

    sp = sub.add_parser("sweep", help="throughput and latency against max_batch_size, retuned live")
    common(sp, 15.0)
    cluster(sp)
    sp.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    sp.add_argument("--batch-wait-s", type=float, help="batch_wait_timeout_s for every size (default: keep the deployment's)")
    sp.add_argument("--out", default="bench-results/sweep")

    tp = sub.add_parser("tune", help="Optuna: best batching for throughput under a p99 target")
    common(tp, 10.0)
    cluster(tp)
    tp.add_argument("--p99-ms", type=float, required=True)
    tp.add_argument("--trials", type=int, default=20)
    tp.add_argument("--max-batch-size", type=int, default=128)
    tp.add_argument("--study-db", default="bench-results/tune.db")
    tp.add_argument("--study-name")
    tp.add_argument("--override-out", default="bench-results/tuned_override.yaml")

    rp = sub.add_parser("retune", help="set batching fields live (a user_config override, no restart)")
    rp.add_argument("--url", default="http://127.0.0.1:8000")
    rp.add_argument("--model", default="minilm")
    cluster(rp)
    rp.add_argument("--set", nargs="+", required=True, metavar="FIELD=VALUE",
                    help="e.g. --set max_batch_size=64 adaptive=true target_p99_ms=80")

    ns = p.parse_args(argv)
    if getattr(ns, "concurrency", 0) is None and getattr(ns, "rate", 0) is None:
        ns.concurrency = 32
    return {"load": _load, "sweep": _sweep, "tune": _tune, "retune": _retune}[ns.cmd](ns)


if __name__ == "__main__":
    sys.exit(main())
