"""Raw-model levers on one GPU: where the BERT-base forward's time goes, and what moves its
fraction of the bf16 matmul peak (issue #7: >= 0.55 at the best batch).

    python -m bench.raw_levers --tokenizer DIR [--batches 128 256 512 1024] [--out DIR]

Variants, each on its own copy of the same random-weight model (seq 128, bf16):
  eager          the model as served (transformers' BERT, SDPA attention);
  qkv            query, key and value projections fused into one matmul;
  layers         each encoder layer torch.compile'd (dynamic shapes: one compile for all batches);
  layers+qkv     both;
  whole          the whole model compiled for each batch size (static shapes; reference only).
Per variant and batch: median CUDA-event ms, sequences/s, fraction of peak, compile seconds, and the
largest difference from eager relative to eager's largest logit. A torch.profiler split of eager
and the best variant at the largest batch into matmul / attention / norm / other kernels.
Prints tables and writes raw_levers.json under --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Optional

from bench.harness import BERT_BASE, SEQ, bert_spec
from bench.timing import bf16_matmul_peak_tflops, cuda_median_ms, encoder_flops_per_seq
from app.models.compiled import compile_blocks, fuse_qkv

_KINDS = [("matmul", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|wgmma", re.I)),
          ("attention", re.compile(r"flash|fmha|attention|mem_eff", re.I)),
          ("norm", re.compile(r"norm", re.I))]


def kernel_split(fn: Any) -> dict[str, float]:
    """GPU milliseconds of one call of fn, by kind of kernel."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    split = {"matmul": 0.0, "attention": 0.0, "norm": 0.0, "other": 0.0}
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
        if not us or e.key.startswith("ProfilerStep"):
            continue
        kind = next((k for k, rx in _KINDS if rx.search(e.key)), "other")
        split[kind] += us / 1000
    return split


def measure(tokenizer: str, batches: list[int], whole: bool) -> dict[str, Any]:
    import torch

    from app.config import ModelSpec
    from app.runners.local import LocalRunner

    spec = ModelSpec.model_validate(bert_spec(tokenizer, max(batches), 0.0, 1, 1, False))
    runner = LocalRunner(spec, 30522)
    runner.start()
    base = runner.model
    flops_per_seq = encoder_flops_per_seq(base, SEQ, BERT_BASE["num_hidden_layers"], BERT_BASE["hidden_size"])
    peak = bf16_matmul_peak_tflops()
    inputs = {b: (torch.randint(1000, 30000, (b, SEQ), device="cuda"), torch.ones(b, SEQ, dtype=torch.long, device="cuda"))
              for b in batches}
    # A padded batch too: the served path pads rows to buckets, and the mask must still be honoured.
    padded_mask = inputs[batches[0]][1].clone()
    padded_mask[1:, SEQ // 2 :] = 0
    rows: list[dict[str, Any]] = []
    splits: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        ref = {b: base(*inputs[b]).float() for b in batches}
        ref_padded = base(inputs[batches[0]][0], padded_mask).float()
        variants = ["eager", "qkv", "layers", "layers+qkv"] + (["whole"] if whole else [])
        for name in variants:
            model = copy.deepcopy(base)
            if "qkv" in name:
                fuse_qkv(model)
            if "layers" in name:
                compile_blocks(model)
            for b in batches:
                ids, mask = inputs[b]
                fn = model
                if name == "whole":
                    fn = torch.compile(model, dynamic=False)
                t0 = time.perf_counter()
                out = fn(ids, mask).float()
                torch.cuda.synchronize()
                first_s = time.perf_counter() - t0
                ms = cuda_median_ms(lambda: fn(ids, mask), reps=20)
                tflops = flops_per_seq * b / (ms / 1000) / 1e12
                err = float((out - ref[b]).abs().max() / ref[b].abs().max().clamp_min(1e-6))
                row = {"variant": name, "batch": b, "ms": ms, "seq_per_s": b / (ms / 1000), "tflops": tflops,
                       "frac_peak": tflops / peak, "first_call_s": first_s, "max_rel_err": err}
                if b == batches[0] and name != "whole":
                    got = model(inputs[b][0], padded_mask).float()
                    row["padded_max_rel_err"] = float((got - ref_padded).abs().max() / ref_padded.abs().max())
                rows.append(row)
                print(f"{name:>11}{b:>6}{ms:>9.2f}{row['seq_per_s']:>9.0f}{tflops:>8.0f}{row['frac_peak']:>8.3f}"
                      f"{first_s:>8.1f}{err:>10.1e}", flush=True)
            big = batches[-1]
            if name != "whole":
                splits[name] = kernel_split(lambda: model(*inputs[big]))
            del model
            torch.cuda.empty_cache()
    runner.shutdown()
    return {"matmul_peak_tflops": peak, "flops_per_seq": flops_per_seq, "rows": rows,
            "kernel_ms_at_batch": batches[-1], "kernel_ms": splits}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True, help="directory of the BERT uncased tokenizer (vocab size only)")
    p.add_argument("--batches", type=int, nargs="+", default=[128, 256, 512, 1024])
    p.add_argument("--whole", action="store_true", help="also compile the whole model per batch size (slow)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    ns = p.parse_args(argv)
    print(f"{'variant':>11}{'batch':>6}{'ms':>9}{'seq/s':>9}{'TFLOP/s':>8}{'of peak':>8}{'first s':>8}{'rel err':>10}")
    res = measure(ns.tokenizer, sorted(ns.batches), ns.whole)
    print(f"bf16 matmul peak {res['matmul_peak_tflops']:.0f} TFLOP/s; kernel ms at batch {res['kernel_ms_at_batch']}:")
    for name, split in res["kernel_ms"].items():
        total = sum(split.values())
        print(f"  {name:>11} total {total:7.2f}  " + "  ".join(f"{k} {v:6.2f} ({v / total:.0%})" for k, v in split.items()))
    best = max(res["rows"], key=lambda r: r["frac_peak"])
    print(f"best: {best['variant']} b{best['batch']} {best['frac_peak']:.3f} of peak")
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "raw_levers.json").write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
