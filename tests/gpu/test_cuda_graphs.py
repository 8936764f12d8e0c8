"""CUDA-graph fast path equals the eager path (runs on a GPU machine only: `pytest tests/gpu`)."""

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

BERT_SMALL = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024}


def _runner(task: str, dtype: str, graphs: bool, compile_layers: bool = False):
    from app.config import ModelSpec
    from app.runners.local import LocalRunner

    spec = ModelSpec.model_validate({
        "name": "m", "task": task, "max_seq_len": 64, "dtype": dtype, "device": "cuda",
        "source": {"kind": "random_init", "architecture": "bert", "config": BERT_SMALL, "seed": 0},
        "batching": {"max_batch_size": 16}, "acceleration": {"cuda_graphs": graphs, "compile_layers": compile_layers},
    })
    r = LocalRunner(spec, 30522)
    r.start()
    return r


@pytest.mark.parametrize("task,dtype,tol,compile_layers", [
    ("classify", "float32", 1e-4, False), ("embed", "float32", 1e-4, False),
    ("classify", "bfloat16", 3e-2, False), ("embed", "bfloat16", 3e-2, False),
    # Compiled blocks (fused kernels, fused qkv) under the graphs, against the plain eager model.
    ("classify", "float32", 1e-3, True), ("classify", "bfloat16", 3e-2, True), ("embed", "bfloat16", 3e-2, True)])
def test_graphed_outputs_equal_eager(task, dtype, tol, compile_layers):
    eager, graphed = _runner(task, dtype, False), _runner(task, dtype, True, compile_layers)
    assert graphed.graphs is not None and len(graphed.graphs) > 0
    gen = torch.Generator().manual_seed(0)
    for b, s in [(1, 5), (3, 33), (16, 64), (7, 1), (17, 20), (2, 65)]:  # the last two miss every bucket: eager
        ids = torch.randint(1000, 30000, (b, s), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, s // 2 + 1:] = 0  # a shorter first row: padding inside the batch too
        ref, got = eager.infer(ids, mask), graphed.infer(ids, mask)
        assert got.shape == ref.shape
        rel = float((ref - got).abs().max() / ref.abs().max())
        assert rel <= tol, (b, s, rel)


def test_blocking_host_copy_equals_synchronous_copy():
    from app.runners.cuda_graphs import to_host

    x = torch.randn(64, 384, device="cuda", dtype=torch.bfloat16) @ torch.randn(384, 384, device="cuda",
                                                                               dtype=torch.bfloat16)
    got, ref = to_host(x, blocking=True), to_host(x, blocking=False)
    assert got.is_pinned() and got.dtype == torch.float32 and not ref.is_pinned()
    assert torch.equal(got, ref)
