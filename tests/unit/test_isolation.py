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
