"""Serving-path levers (`python -m bench.fast_path --levers base pool0+fast ...`): each variant of
the fused or split config, against the no-op ceilings, one GPU."""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any, Callable


from bench.harness import TEXT, Served, _show, app_doc, bert_spec, noop_doc, v2_body
from bench.spy import label_threads, read_profile, replica_pid, start_py_spy, thread_cpu


LEVERS: dict[str, dict[str, dict[str, Any]]] = {
    "base": {},
    "pool0": {"env": {"TOKENIZERS_PARALLELISM": "false"}},  # tokenise on the batch thread, no Rust pool
    "fast": {"ingress": {"fast_routes": True}},  # the inference routes straight from ASGI
    "gil05": {"env": {"BATCHSERVE_GIL_SWITCH_INTERVAL_MS": "0.5"}},
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
    requests with batch sizes, queue waits and GPU utilisation sampled (bench/probe.py)."""
    from bench.hey import require_hey

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
