"""A generator's KV cache budget: bytes per token from a transformers config, and tokens from free
memory. One formula for the planner (before anything starts) and the replica (measured at start)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class KVBudget:
    """How many tokens of KV cache the replica holds, and where the figure came from."""

    tokens: int
    bytes_per_token: int
    free_bytes: int
    memory_fraction: float
    capped_by: Optional[str]  # "kv_cache_max_tokens" when the configured cap, not memory, decided

    def as_dict(self) -> dict[str, Any]:
        return {"kv_cache_tokens": self.tokens, "kv_bytes_per_token": self.bytes_per_token,
                "free_bytes_at_start": self.free_bytes, "memory_fraction": self.memory_fraction,
                "capped_by": self.capped_by}


def free_memory_bytes(device: Any) -> int:
    """Free memory where a KV cache will live (a CUDA device's, else the host's), measured after the weights load."""
    import psutil
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(psutil.virtual_memory().available)


def kv_bytes_per_token(config: Any, dtype_bytes: int) -> int:
    """Keys and values of every layer for one token: 2 x layers x kv_heads x head_dim x dtype bytes."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * dtype_bytes


def kv_budget(free_bytes: int, bytes_per_token: int, memory_fraction: float, max_tokens: Optional[int]) -> KVBudget:
    """The seed formula: floor(free x fraction / per-token KV bytes) tokens, under the configured cap."""
    tokens = int(free_bytes * memory_fraction) // bytes_per_token
    capped = None
    if max_tokens is not None and tokens > max_tokens:
        tokens, capped = max_tokens, "kv_cache_max_tokens"
    return KVBudget(tokens, bytes_per_token, free_bytes, memory_fraction, capped)
