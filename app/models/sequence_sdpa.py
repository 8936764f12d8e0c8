"""Attention one sequence at a time for the continuous-batching manager's steps.

The manager packs every running sequence into one SDPA call with a block-diagonal mask
(transformers' `sdpa_attention_forward` with its paged cache), so a step computes the scores of
every query against every running sequence's keys and throws the off-diagonal blocks away: its
attention grows with the square of the running sequences (for the ~1.1 B bench model, 250 running
sequences of ~700 tokens and a 2,048-token prefill chunk are ~100 TFLOP a step, nearly all of it
masked). Here each sequence's queries meet only its own keys:

- CUDA (bf16 / fp16): one call of PyTorch's variable-length flash kernel over the packed step
  (`aten._flash_attention_forward` with the step's cumulative lengths, causal aligned to the end
  of each sequence's keys, grouped heads native): what `torch.nn.attention.varlen.varlen_attn`
  calls, and what transformers' own flash path would do if the flash-attn package were there;
- CPU (no varlen kernel): one SDPA call per sequence, through the mask's own diagonal block. On 2
  cores, attention (SDPA and the grouped-head copies) took 62 % of a served step (session 25).

Either way the result is the packed call's without its masked work. Installed by overriding
transformers' "sdpa" entry; calls that are not a paged-cache step, and CUDA steps the flash kernel
cannot take (fp32, head size over 256, before sm80, dropout, a sliding-window layer), go to
transformers' own function unchanged. `BATCHSERVE_SEQUENCE_SDPA=0` in the replica's environment
(`runtime_env.env_vars`) leaves transformers' packed call in place: the benchmark's before/after
lever.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch

ENABLE_ENV = "BATCHSERVE_SEQUENCE_SDPA"
_original: Optional[Callable[..., Any]] = None


def _layer_value(value: Any, module: torch.nn.Module) -> Any:
    """The manager passes some arguments per layer type (full / sliding attention): this layer's."""
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        return next(iter(value.values()))
    layer_types = getattr(module.config, "layer_types", None)
    return value[layer_types[module.layer_idx]]


def sequence_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                          scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                          cache: Any = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    from transformers.generation.continuous_batching.cache import PagedAttentionCache

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    on_cpu = query.device.type == "cpu"
    flash = not on_cpu and not dropout and not sliding_window_layer(module) and flash_varlen_fits(query)
    if (not isinstance(cache, PagedAttentionCache) or not (on_cpu or flash)
            or cu_q is None or cu_k is None or attention_mask is None or kwargs.get("position_bias") is not None
            or kwargs.get("softcap") is not None):
        if _original is None:  # called without install(): transformers' function is the one to fall back on
            from transformers.integrations.sdpa_attention import sdpa_attention_forward as fallback
        else:
            fallback = _original
        return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                         is_causal=is_causal, cache=cache, **kwargs)
    key, value = cache.update(key_states=key, value_states=value, layer_idx=module.layer_idx, kwargs=kwargs)
    if not on_cpu:
        return flash_varlen(query, key, value, _layer_value(cu_q, module), _layer_value(cu_k, module),
                            kwargs.get("max_length_q"), _layer_value(kwargs.get("max_length_k"), module), scaling), None
    mask = _layer_value(attention_mask, module)
    q_bounds = _layer_value(cu_q, module).tolist()
    k_bounds = _layer_value(cu_k, module).tolist()
    gqa = query.shape[1] != key.shape[1]
    out = query.new_zeros(query.shape)  # rows past the last sequence (padding) stay zero
    for i in range(len(q_bounds) - 1):
        qs, qe, ks, ke = q_bounds[i], q_bounds[i + 1], k_bounds[i], k_bounds[i + 1]
        if qe == qs:
            continue
        out[:, :, qs:qe] = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, qs:qe], key[:, :, ks:ke], value[:, :, ks:ke], attn_mask=mask[..., qs:qe, ks:ke],
            dropout_p=dropout, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


def sliding_window_layer(module: torch.nn.Module) -> bool:
    """Whether this layer attends to a sliding window, as the manager groups layers (its cache's
    `group_layers_by_attn_type`): the window is in the manager's mask, which the flash call does
    not read, so such a layer keeps transformers' call on CUDA."""
    config = getattr(module, "config", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return getattr(config, "sliding_window", None) is not None
    return layer_types[module.layer_idx] != "full_attention"


def flash_varlen_fits(query: torch.Tensor) -> bool:
    """Whether PyTorch's flash kernel takes this query: CUDA sm80+, half precision, head size <= 256."""
    return (query.device.type == "cuda" and query.dtype in (torch.float16, torch.bfloat16)
            and query.shape[-1] <= 256 and query.shape[-1] % 8 == 0
            and torch.cuda.get_device_capability(query.device) >= (8, 0))


def flash_varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                 max_q: Optional[int], max_k: Optional[int], scaling: Optional[float]) -> torch.Tensor:
    """The packed step's attention, each sequence's queries against its own keys: `query` is
    [1, heads, queries, dim] and `key` / `value` [1, kv_heads, keys, dim] as transformers passes
    them; returns [1, queries, heads, dim], zero past the last sequence (padding rows)."""
    if max_q is None or max_k is None:  # the manager passes both; else one host read each
        max_q = int((cu_q[1:] - cu_q[:-1]).max())
        max_k = int((cu_k[1:] - cu_k[:-1]).max())
    # (tokens, heads, dim) views: the kernel wants the last dimension contiguous, not the rest.
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    out = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), max(1, max_q), max(1, max_k), 0.0, True, False,
        scale=scaling)[0]
    rows = torch.arange(out.shape[0], device=out.device)
    return torch.where((rows < cu_q[-1]).view(-1, 1, 1), out, 0).unsqueeze(0)


def install() -> None:
    """Route transformers' "sdpa" attention through sequence_sdpa_forward (idempotent)."""
    global _original
    from transformers.modeling_utils import AttentionInterface

    if os.environ.get(ENABLE_ENV, "1") == "0":
        return

    current = AttentionInterface._global_mapping["sdpa"]
    if current is sequence_sdpa_forward:
        return
    _original = current
    AttentionInterface.register("sdpa", sequence_sdpa_forward)


def uninstall() -> None:
    """Give transformers its own "sdpa" entry back."""
    from transformers.modeling_utils import AttentionInterface

    if _original is not None and AttentionInterface._global_mapping["sdpa"] is sequence_sdpa_forward:
        AttentionInterface.register("sdpa", _original)
