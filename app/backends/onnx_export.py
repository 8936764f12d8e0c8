"""The served head (app/models/heads.py: ids, mask -> [B, D]) as one ONNX graph with dynamic batch
and sequence axes, pooling and normalisation included."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

OPSET = 17
# The TorchScript exporter: it exports a transformers encoder with dynamic axes in ~2 s on 2 cores.
# Its version is torch's; it is part of the cache key, so a torch upgrade re-exports.
EXPORTER = f"torch.onnx.torchscript/{torch.__version__}/opset{OPSET}"
# One file only: the exporter writes larger models as external data, which the cache does not track.
MAX_EXPORT_BYTES = 2 * 1024**3 - 64 * 1024**2


def weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def export_onnx(model: nn.Module, path: Path) -> None:
    size = weight_bytes(model)
    if size > MAX_EXPORT_BYTES:
        raise ValueError(f"the model's weights are {size / 2**30:.1f} GiB; an ONNX export is limited to 2 GiB "
                         "in one file: serve it with backend torch")
    ids = torch.ones(2, 8, dtype=torch.long)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
        torch.onnx.export(
            model, (ids, torch.ones_like(ids)), str(path),
            input_names=["input_ids", "attention_mask"], output_names=["output"],
            dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                          "output": {0: "batch"}},
            opset_version=OPSET, do_constant_folding=True, dynamo=False,
        )
