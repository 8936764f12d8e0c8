"""The raw model, no serving: GPU forward per batch (eager, graphs, compiled), host-to-host replay,
and the CPU forward of MiniLM."""

from __future__ import annotations

import time
from typing import Any, Callable


from bench.harness import BERT_BASE, SEQ, SHORT_TEXTS, bert_spec, minilm_spec
from bench.timing import bf16_matmul_peak_tflops, cuda_median_ms, encoder_flops_per_seq, median_wall_s


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
    from app.requests import ModelInput

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
