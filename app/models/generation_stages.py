"""One pipeline stage of a causal LM, for generation: the model with only its stage's decoder
layers, whose forward receives the hidden states from the stage before and sends them on.

transformers' continuous-batching manager drives each stage exactly as it drives a whole model:
it calls the model with the step's packed tokens and its paged cache, and samples from the
logits. Cut here, a stage is still such a model:
- stage > 0: the token embedding is replaced by a receive of the previous stage's hidden states
  (same shape: the step's packed tokens x hidden);
- stage < last: the final norm is replaced by a send of the hidden states to the next stage;
- every stage: the LM head is wrapped in a broadcast from the last stage, so every stage gets the
  same logits and so samples the same token (sampling.py's noise is a pure function of the seed);
- each stage's config counts only its layers, renumbered from 0, so the paged cache the manager
  allocates holds the keys and values of this stage's layers and no others.

The point-to-point order is fixed (recv from s-1, send to s+1, then the broadcast), so no two
stages ever wait on each other in a cycle.

In a tp x pp gang each stage is a tensor-parallel group of `tp` ranks (global rank = stage x tp +
t): after its all-reduces every rank of a stage holds the whole hidden state, so rank t sends to
rank t of the next stage, and the logits come from rank 0 of the last stage.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class _ReceiveHidden(nn.Module):
    """Stands in for the token embedding of a stage > 0."""

    def __init__(self, src: int, hidden: int, dtype: torch.dtype):
        super().__init__()
        self.src, self.hidden, self.dtype = src, hidden, dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = torch.empty(*input_ids.shape, self.hidden, dtype=self.dtype, device=input_ids.device)
        torch.distributed.recv(out, src=self.src)
        return out


class _SendHidden(nn.Module):
    """Stands in for the final norm of a stage < last."""

    def __init__(self, dst: int):
        super().__init__()
        self.dst = dst

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        torch.distributed.send(hidden.contiguous(), dst=self.dst)
        return hidden


class _BroadcastLogits(nn.Module):
    """The LM head on the last stage; on every stage, the last stage's logits."""

    def __init__(self, head: nn.Module | None, src: int, vocab: int, dtype: torch.dtype):
        super().__init__()
        self.head, self.src, self.vocab, self.dtype = head, src, vocab, dtype

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.head is not None:
            logits = self.head(hidden).contiguous()
        else:
            logits = torch.empty(*hidden.shape[:-1], self.vocab, dtype=self.dtype, device=hidden.device)
        torch.distributed.broadcast(logits, src=self.src)
        return logits


def layer_ranges(balance: list[int] | tuple[int, ...], num_layers: int) -> list[tuple[int, int]]:
    """Decoder layers [a, b) of each stage, from the planner's balance over units
    [embeddings, layer 0 .. layer n-1, final] (app/models/anatomy.py)."""
    if sum(balance) != num_layers + 2:
        raise ValueError(f"a balance of {list(balance)} units does not cover {num_layers} layers + embeddings + head")
    ranges, unit = [], 0
    for count in balance:
        first, last = unit, unit + count  # units [first, last)
        a, b = max(first - 1, 0), min(last - 1, num_layers)
        if b <= a:
            raise ValueError(f"stage {len(ranges)} of balance {list(balance)} holds no decoder layer: a generator "
                             "stage needs at least one (fewer stages)")
        ranges.append((a, b))
        unit = last
    return ranges


def cut_stage(model: Any, stage: int, ranges: list[tuple[int, int]], tp: int = 1, tp_rank: int = 0) -> Any:
    """Make `model` (a Llama-layout causal LM: model.model.{embed_tokens, layers, norm}, lm_head)
    stage `stage` of `ranges` in place, as rank `tp_rank` of the stage's `tp` ranks (the default
    process group's rank stage x tp + tp_rank)."""
    base = getattr(model, "model", None)
    if base is None or not all(hasattr(base, n) for n in ("embed_tokens", "layers", "norm")) or \
            not hasattr(model, "lm_head"):
        raise ValueError(f"{type(model).__name__}: a generator pipeline cuts Llama-layout models "
                         "(model.embed_tokens / layers / norm, lm_head: Llama, Qwen2, Mistral, ...); "
                         "serve this one replicated or deepspeed_tp")
    last = len(ranges) - 1
    a, b = ranges[stage]
    config = copy.deepcopy(model.config)
    text = config.get_text_config()
    vocab, hidden = text.vocab_size, text.hidden_size
    dtype = model.dtype
    layers = list(base.layers)[a:b]
    for i, layer in enumerate(layers):
        layer.self_attn.layer_idx = i
    base.layers = nn.ModuleList(layers)
    text.num_hidden_layers = b - a
    if getattr(text, "layer_types", None):
        text.layer_types = list(text.layer_types)[a:b]
    model.config = config
    base.config = text
    for layer in layers:
        layer.self_attn.config = text
    peer = lambda s: s * tp + tp_rank  # noqa: E731 - the same tensor-parallel rank of stage s
    if stage > 0:
        base.embed_tokens = _ReceiveHidden(peer(stage - 1), hidden, dtype)
    if stage < last:
        base.norm = _SendHidden(peer(stage + 1))
    model.lm_head = _BroadcastLogits(model.lm_head if stage == last else None, last * tp, vocab, dtype)
    # The manager reads the model's TP plan to decide whether KV heads are split: they are not here.
    model._tp_plan = {}
    return model


def split_heads_in_config(model: Any, tp: int) -> None:
    """After AutoTP split a stage's attention `tp` ways, make its config count one rank's heads.

    The manager sizes the paged cache from the config's KV heads and divides them by its lockstep
    group's size only when the TP plan names k/v projections; in a tp x pp gang that group is the
    whole gang (tp x pp ranks), so the division would be wrong. So the stage's config counts this
    rank's heads (head_dim pinned) and the TP plan names none (cut_stage empties it)."""
    text = model.config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if heads % tp or kv_heads % tp:
        raise ValueError(f"tp={tp} must divide the attention heads ({heads}) and kv heads ({kv_heads})")
    text.head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    text.num_attention_heads, text.num_key_value_heads = heads // tp, kv_heads // tp
