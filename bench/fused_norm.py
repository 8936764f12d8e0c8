"""A benchmark lever (bench.generate_engine fusednorm=1): RMSNorm in one fused kernel instead of transformers' eight (to float32, pow, mean, add, rsqrt,
mul, cast back, scale): a decoding step of a small model is bound by the host launching ~700
kernels (bench.profile_kernels on one H200), and every layer has two of these norms."""

from __future__ import annotations

import types

import torch
from torch import nn


def _fused_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    dtype = hidden_states.dtype
    normed = nn.functional.rms_norm(hidden_states.to(torch.float32), (hidden_states.shape[-1],),
                                    eps=self.variance_epsilon)
    return self.weight * normed.to(dtype)  # as transformers: cast back, then scale in the weight's dtype


def fuse_rms_norms(model: nn.Module) -> int:
    """Give every transformers RMSNorm of `model` (a `weight` and a `variance_epsilon`, class name
    ending in RMSNorm) the fused forward; returns how many."""
    count = 0
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon") \
                and isinstance(getattr(module, "weight", None), torch.Tensor):
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count
