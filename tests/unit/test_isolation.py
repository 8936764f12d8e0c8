"""A failing item inside the model fails alone; its batch-mates get their answers (no Ray needed)."""

import torch

from app.batching import BatchEntry
from app.config import ModelSpec
from app.errors import ModelFailure
from app.schemas import ModelInput
from deployments.model_server import ModelServer
from tests.helpers import tiny_bert_spec

POISON = 13


class _PoisonRunner:
    """Fails any batch that holds token id POISON, like a kernel that chokes on one input."""

    def infer(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if (ids == POISON).any():
            raise RuntimeError("poisoned batch")
        return ids.float().sum(dim=1, keepdim=True)

    def shutdown(self) -> None:
        pass


class _IdEncoder:
    pad_id = 0

    def encode(self, inputs):
        return [row for x in inputs for row in x.token_ids]


def _server() -> ModelServer:
    server = object.__new__(ModelServer)
    server.spec = ModelSpec.model_validate(tiny_bert_spec())
    server.runner = _PoisonRunner()
    server.encoder = _IdEncoder()
    server.batch_tokens = None
    server._oom_cap = None
    return server


def test_bad_entry_fails_alone():
    entries = [BatchEntry(ModelInput(token_ids=[[i + 1, i + 2]]), 0.0) for i in range(7)]
    entries.insert(3, BatchEntry(ModelInput(token_ids=[[POISON]]), 0.0))
    results = _server()._compute_isolated(entries, 0.0)
    assert len(results) == 8
    assert isinstance(results[3], ModelFailure) and "poisoned batch" in str(results[3])
    good = [r for i, r in enumerate(results) if i != 3]
    assert all(not isinstance(r, Exception) for r in good)
    assert [float(r.outputs[0, 0]) for r in good] == [2 * i + 3 for i in range(7)]


class _SmallDeviceRunner:
    """Runs out of memory on any batch of more than two rows, like a full GPU."""

    device = torch.device("cpu")

    def infer(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if ids.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return ids.float().sum(dim=1, keepdim=True)


def test_out_of_memory_splits_until_it_fits_and_remembers_the_cap():
    server = _server()
    server.runner = _SmallDeviceRunner()
    entries = [BatchEntry(ModelInput(token_ids=[[i, 1]]), 0.0) for i in range(5)]
    entries.append(BatchEntry(ModelInput(token_ids=[[10 * k, 1] for k in range(1, 6)]), 0.0))  # 5 items, one request
    results = server._compute_isolated(entries, 0.0)
    assert all(not isinstance(r, Exception) for r in results), results
    assert [float(r.outputs[0, 0]) for r in results[:5]] == [i + 1 for i in range(5)]
    assert results[5].outputs[:, 0].tolist() == [11, 21, 31, 41, 51]  # split, answered in order
    assert server._oom_cap is not None and server._oom_cap <= 2


def test_token_budget_cuts_batches_so_none_exceeds_it():
    class _Recording(_PoisonRunner):
        shapes: list = []

        def infer(self, ids, mask):
            self.shapes.append(tuple(ids.shape))
            return super().infer(ids, mask)

    server = _server()
    server.runner = _Recording()
    server.batch_tokens = 8
    entries = [BatchEntry(ModelInput(token_ids=[[1] * n]), 0.0) for n in (2, 3, 4, 1, 8)]
    results = server._compute_isolated(entries, 0.0)
    assert [float(r.outputs[0, 0]) for r in results] == [2, 3, 4, 1, 8]
    assert all(b * length <= 8 for b, length in server.runner.shapes), server.runner.shapes
