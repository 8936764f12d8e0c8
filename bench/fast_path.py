"""The fast path, measured step by step in one run (issue #7).

    python -m bench.fast_path --tokenizer DIR [--replicas 4] [--out DIR]       # one GPU
    python -m bench.fast_path --cpu [--out DIR]                                # CPU, MiniLM

GPU run (BERT-base-shaped classifier, seq 128, bf16, random weights), in order:
  1. raw model: measured bf16 matmul peak; eager and CUDA-graph forward per batch size (latency,
     sequences/s, fraction of peak); the graphs' outputs against eager;
  2. the ingress ceiling: a no-op deployment behind the same Serve HTTP path (HAProxy direct
     ingress), single-item requests;
  3. the served model, one change at a time: routed (ingress -> handle -> model server), fused
     (the model server is the ingress), + CUDA graphs, + several replicas per GPU; single-item
     text requests and 32-item requests.
CPU run: raw MiniLM items/s at the batch cap vs served items/s with full-batch requests.
Levers run (`--levers base pool0+fast ...`, one GPU): per replica count, the no-op ceilings
(FastAPI and bare ASGI), then each variant of serving-path levers (bench/levers.py), single-item
requests, with batch sizes, queue waits and GPU utilisation sampled during the load (probe.py).

Load comes from `hey` (bench/hey.py). Prints a table per part and writes fast_path.json under --out.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional


from bench.harness import SEQ, SHORT_TEXTS, TEXT, Served, _show, app_doc, bert_spec, minilm_spec, noop_doc, v2_body
from bench.levers import LEVERS, levers_main
from bench.raw import raw_cpu, raw_gpu


def gpu_main(ns: argparse.Namespace, out: dict[str, Any], save: Callable[[], None]) -> None:
    if not ns.skip_raw:
        batches = [1, 8, 32, 64, 128, 256, 512]
        raw = raw_gpu(ns.tokenizer, batches, ns.compile_batches)
        out["raw"] = raw
        print(f"\nraw BERT-base bf16 seq {SEQ}: bf16 matmul peak {raw['matmul_peak_tflops']:.0f} TFLOP/s; "
              f"{len(raw['rows'])} rows; graphs captured in {raw['graph_capture_s']:.1f} s; "
              f"graph vs eager max rel err {raw['graph_vs_eager_max_rel_err']:.2e}")
        if ns.compile_layers:
            layered = raw_gpu(ns.tokenizer, batches, [], compile_layers=True)
            raw["rows"] += layered["rows"]
            raw["layers"] = {k: v for k, v in layered.items() if k not in ("rows", "host_to_host")}
            print(f"compiled blocks (acceleration.compile_layers): start {layered['start_s']:.1f} s, graphs captured in "
                  f"{layered['graph_capture_s']:.1f} s, graph vs eager max rel err {layered['graph_vs_eager_max_rel_err']:.2e}")
        print(f"{'kind':>11}{'batch':>6}{'ms':>9}{'seq/s':>10}{'TFLOP/s':>9}{'of peak':>9}")
        for r in raw["rows"]:
            print(f"{r['kind']:>11}{r['batch']:>6}{r['ms']:>9.3f}{r['seq_per_s']:>10.0f}{r['tflops']:>9.0f}"
                  f"{r['frac_peak']:>9.3f}")
        print("graph replay host to host, ms (current / legacy path), quiet | with a busy Python thread")
        by = {(r["path"], r["batch"], r["busy_thread"]): r["ms"] for r in raw["host_to_host"]}
        for b in sorted({r["batch"] for r in raw["host_to_host"]}):
            print(f"{b:>6}  {by[('current', b, False)]:7.3f} / {by[('legacy', b, False)]:7.3f}   |"
                  f"  {by[('current', b, True)]:7.3f} / {by[('legacy', b, True)]:7.3f}")
        save()
    if ns.raw_only:
        return

    from bench.hey import require_hey

    hey = require_hey()
    served = Served(1, None, hey, ns.duration)
    cap, tok = ns.max_batch, ns.tokenizer
    single, multi = v2_body([TEXT]), v2_body([TEXT] * 32)
    path, ready = "/v2/models/bert/infer", "/v2/health/ready"

    def bert(replicas: int, graphs: bool, mode: str, blocking_sync: bool = True) -> dict[str, Any]:
        spec = bert_spec(tok, cap, ns.wait, replicas, 1 / replicas, graphs, blocking_sync=blocking_sync,
                         concurrent_batches=ns.concurrent_batches)
        return app_doc("bert", [spec], mode)

    # (label, config, items per request); consecutive rows with the same config share one deploy.
    steps: list[tuple[str, dict[str, Any], int]] = [] if ns.no_baseline else [
        ("no-op ceiling, 1 replica", noop_doc(1), 1),
        ("routed, eager, 1 replica", bert(1, False, "routed"), 1),
        ("fused, eager, 1 replica", bert(1, False, "fused"), 1),
        ("fused, CUDA graphs, 1 replica", bert(1, True, "fused"), 1),
    ]
    for n in ns.replicas:
        steps.append((f"no-op ceiling, {n} replicas", noop_doc(n), 1))
        if ns.spin_compare:
            spin = bert(n, True, "fused", blocking_sync=False)
            steps.append((f"fused, CUDA graphs, {n} replicas, spin-wait sync", spin, 1))
            steps.append((f"32-item requests, {n} replicas, spin-wait sync", spin, 32))
        fast = bert(n, True, "fused")
        steps.append((f"fused, CUDA graphs, {n} replicas x {1 / n:.3f} GPU", fast, 1))
        steps.append((f"32-item requests, fused, CUDA graphs, {n} replicas", fast, 32))
    results = out.setdefault("served", [])
    print(f"\nserved over HTTP (HAProxy direct ingress), max_batch_size {cap}, wait {ns.wait * 1000:.0f} ms, "
          f"{ns.duration:.0f} s per row")
    last_doc, took = None, 0.0
    for label, doc, items in steps:
        if doc is not last_doc:
            took = served.deploy(doc, ready)
            last_doc = doc
        body, conc = (single, ns.concurrency) if items == 1 else (multi, ns.multi_concurrency)
        r = served.load(path, body, conc, items)
        r.update(label=label, deploy_s=took)
        results.append(r)
        _show(label, r)
        save()
    served.close()
    summarize_gpu(out)
    save()


def summarize_gpu(out: dict[str, Any]) -> None:
    """The issue's ratios, each from rows of this run: per replica count, served / no-op ceiling
    (single-item) and 32-item items/s / raw items/s at the batch cap."""
    rows = {r["label"]: r for r in out.get("served", [])}
    raw = out.get("raw")
    verdict: dict[str, Any] = {}
    if raw:
        eager1 = next(r for r in raw["rows"] if r["kind"] == "eager" and r["batch"] == 1)
        graph1 = next(r for r in raw["rows"] if r["kind"] == "cuda_graph" and r["batch"] == 1)
        best = max(raw["rows"], key=lambda r: r["frac_peak"])
        verdict.update(raw_b1_ms_eager=eager1["ms"], raw_b1_ms_graph=graph1["ms"], best_frac_peak=best["frac_peak"],
                       best_frac_peak_at=f"{best['kind']} b{best['batch']}")
    cap = out["args"]["max_batch"]
    raw_cap = max((r["seq_per_s"] for r in raw["rows"] if r["batch"] == cap), default=None) if raw else None
    for n in out["args"]["replicas"]:
        fast = rows.get(f"fused, CUDA graphs, {n} replicas x {1 / n:.3f} GPU")
        ceiling = rows.get(f"no-op ceiling, {n} replicas")
        multi = rows.get(f"32-item requests, fused, CUDA graphs, {n} replicas")
        v: dict[str, Any] = {}
        if fast and ceiling:
            v.update(single_req_per_s=fast["ok_per_s"], single_p99_ms=fast["p99_ms"],
                     noop_req_per_s=ceiling["ok_per_s"], vs_ceiling=fast["ok_per_s"] / ceiling["ok_per_s"])
        if multi and raw_cap:
            v.update(multi_items_per_s=multi["items_per_s"], raw_items_per_s_at_cap=raw_cap,
                     multi_vs_raw=multi["items_per_s"] / raw_cap)
        verdict[f"{n}_replicas"] = v
    out["verdict"] = verdict
    print("\nverdict:", json.dumps(verdict, indent=1))


def scaling_main(ns: argparse.Namespace, out: dict[str, Any], save: Callable[[], None]) -> None:
    """Replica scaling on a multi-GPU host (issue #5): one fused replica per GPU, 1 vs all GPUs."""
    from bench.hey import require_hey

    hey = require_hey()
    served = Served(ns.gpus, None, hey, ns.duration)
    multi, single = v2_body([TEXT] * 32), v2_body([TEXT])
    results = out.setdefault("scaling", [])
    cpus = os.cpu_count() or 1
    # (tokenizer threads per replica, concurrent batches); None: the default pool over every core.
    variants = [] if ns.scaling_skip_default else [(None, 1)]
    variants += [(t, c) for t in ns.scaling_tokenizer_threads for c in ns.scaling_concurrent_batches]
    rows = ((32, multi, ns.multi_concurrency), (1, single, ns.concurrency))[: 1 if ns.multi_only else 2]
    for threads, concurrent in variants:
        # Each replica reserves its share of the host's cores, and tokenises on that many threads.
        share = max(1, cpus // (2 * ns.gpus)) if threads is not None else 1
        for n in (1, ns.gpus):
            spec = bert_spec(ns.tokenizer, ns.max_batch, ns.wait, n, 1, True, concurrent_batches=concurrent,
                             num_cpus=share)
            env = None if threads is None else {"RAYON_NUM_THREADS": str(threads)}
            took = served.deploy(app_doc("bert", [spec], "fused", env=env), "/v2/health/ready")
            for items, body, conc in rows:
                r = served.load("/v2/models/bert/infer", body, conc * n, items)
                r.update(label=f"{items}-item, {n} replica(s) x 1 GPU, tokenizer threads {threads or 'all'}, "
                               f"concurrent batches {concurrent}",
                         replicas=n, deploy_s=took, tokenizer_threads=threads, concurrent_batches=concurrent)
                results.append(r)
                _show(r["label"], r)
                save()
    served.close()
    eff = out.setdefault("scaling_efficiency", {})
    for threads, concurrent in variants:
        by = {(r["replicas"], r["items_per_request"]): r["items_per_s"] for r in results
              if r["tokenizer_threads"] == threads and r["concurrent_batches"] == concurrent}
        for items, _, _ in rows:
            eff[f"{items}-item, tokenizer threads {threads or 'all'}, concurrent batches {concurrent}"] = (
                by[(ns.gpus, items)] / (ns.gpus * by[(1, items)]))
    print("\nscaling efficiency (N replicas / (N x 1 replica)):", json.dumps(eff, indent=1))


# Serving-path levers for `--levers` (one GPU): name -> what it changes: "spec" (keys of the model's
# deployment or batching block), "env" (the application's runtime_env), "ingress" (the ingress block).
# A variant on the command line joins levers with '+'; "base" is none of them (the configuration of
# session 3's runs: the tokenizer's default pool, every route through FastAPI, Serve's defaults).


def cpu_main(ns: argparse.Namespace, out: dict[str, Any], save: Callable[[], None]) -> None:
    from bench.hey import require_hey

    hey = require_hey()
    raws = {}
    for threads in ns.thread_counts:
        raw = raw_cpu(ns.max_batch, threads)
        raws[threads] = raw
        print(f"raw MiniLM, batch {raw['batch']}, {threads} threads: forward {raw['forward_ms']:.1f} ms "
              f"({raw['items_per_s']:.0f} items/s), tokenise {raw['tokenize_ms']:.1f} ms", flush=True)
    out["raw"] = list(raws.values())
    save()
    served = Served(0, None, hey, ns.duration)
    body = v2_body([SHORT_TEXTS[i % 2] for i in range(ns.max_batch)])
    results = out.setdefault("served", [])
    for mode in ("routed", "fused"):
        for threads in ns.thread_counts:
            served.deploy(app_doc("cpu", [minilm_spec(ns.max_batch, threads)], mode), "/v2/health/ready")
            for conc in (1, 2):
                r = served.load("/v2/models/minilm/infer", body, conc, ns.max_batch)
                r.update(label=f"{mode}, {threads} torch threads, {ns.max_batch}-item requests",
                         threads=threads, mode=mode, ratio_vs_raw=r["items_per_s"] / raws[threads]["items_per_s"])
                results.append(r)
                _show(r["label"], r)
                print(f"    served / raw ({threads} threads) = {r['ratio_vs_raw']:.2f}", flush=True)
                save()
    served.close()
    best = max(results, key=lambda r: r["items_per_s"])  # the fastest served setting, against its own raw
    out["verdict"] = {"best": best["label"], "concurrency": best["concurrency"], "served_items_per_s": best["items_per_s"],
                      "raw_items_per_s": raws[best["threads"]]["items_per_s"], "ratio": best["ratio_vs_raw"]}
    print("\nverdict:", json.dumps(out["verdict"]))


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fast_path", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="the CPU run (MiniLM) instead of the GPU run")
    p.add_argument("--scaling", action="store_true", help="replica scaling across --gpus GPUs (one replica each)")
    p.add_argument("--gpus", type=int, default=4, help="scaling run: GPUs on the host")
    p.add_argument("--scaling-tokenizer-threads", type=int, nargs="*", default=[],
                   help="scaling run: also with each replica tokenising on this many threads (and reserving "
                        "cores/(2 x GPUs) CPUs)")
    p.add_argument("--scaling-concurrent-batches", type=int, nargs="*", default=[1],
                   help="scaling run: max_concurrent_batches for the --scaling-tokenizer-threads variants")
    p.add_argument("--multi-only", action="store_true", help="scaling run: 32-item rows only")
    p.add_argument("--scaling-skip-default", action="store_true",
                   help="scaling run: only the --scaling-tokenizer-threads variants")
    p.add_argument("--tokenizer", help="GPU run: directory with the BERT uncased tokenizer files")
    p.add_argument("--replicas", type=int, nargs="+", default=[4], help="GPU run: replica counts sharing the one GPU")
    p.add_argument("--max-batch", type=int, default=None, help="batch cap (GPU 128, CPU 32)")
    p.add_argument("--wait", type=float, default=0.002, help="batch wait, seconds (GPU run)")
    p.add_argument("--thread-counts", type=int, nargs="+", default=[1, 2], help="torch threads (CPU run)")
    p.add_argument("--concurrency", type=int, default=128, help="hey connections, single-item rows")
    p.add_argument("--multi-concurrency", type=int, default=64, help="hey connections, 32-item rows")
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--compile-batches", type=int, nargs="*", default=[], help="also time torch.compile at these batches")
    p.add_argument("--compile-layers", action="store_true",
                   help="GPU run (not --levers): also the raw model with acceleration.compile_layers "
                        "(eager+layers, cuda_graph+layers rows)")
    p.add_argument("--skip-raw", action="store_true")
    p.add_argument("--raw-only", action="store_true", help="GPU run: the raw model only")
    p.add_argument("--no-baseline", action="store_true", help="GPU run: skip the one-replica steps")
    p.add_argument("--concurrent-batches", type=int, default=1, help="GPU run: max_concurrent_batches per replica")
    p.add_argument("--spin-compare", action="store_true",
                   help="GPU run: also each replica count with acceleration.blocking_sync off (CUDA's spin-wait)")
    p.add_argument("--levers", nargs="+", default=None,
                   help=f"GPU run: serving-path variants instead of the step table, levers joined by '+' "
                        f"(e.g. base pool0 pool0+fast split+fast); levers: {', '.join(LEVERS)}")
    p.add_argument("--levers-multi", action="store_true", help="levers run: also 32-item rows")
    p.add_argument("--spy", action="store_true",
                   help="levers run: per-thread CPU and a py-spy profile of the model server (and an ingress "
                        "replica of a split) during each row (py-spy on PATH)")
    p.add_argument("--skip-noop", action="store_true", help="levers run: no no-op rows")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    ns = p.parse_args(argv)
    if ns.max_batch is None:
        ns.max_batch = 32 if ns.cpu else 128
    if ns.scaling and not ns.tokenizer:
        p.error("--tokenizer is required for the scaling run")
    if not ns.cpu and not ns.tokenizer:
        p.error("--tokenizer is required for the GPU run")
    out: dict[str, Any] = {"args": vars(ns)}
    Path(ns.out).mkdir(parents=True, exist_ok=True)

    def save() -> None:
        name = ("fast_path_cpu.json" if ns.cpu else "scaling.json" if ns.scaling else
                "levers.json" if ns.levers else "fast_path.json")
        (Path(ns.out) / name).write_text(json.dumps(out, indent=2))

    if ns.scaling:
        scaling_main(ns, out, save)
    elif ns.levers:
        levers_main(ns, out, save)
    else:
        (cpu_main if ns.cpu else gpu_main)(ns, out, save)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
