"""Cut a served model into an nn.Sequential of pipeline units: [embeddings, layer 0..n-1, final].

Pipelines pass tensors only, so every unit takes one tuple (hidden [B, L, H], mask [B, L]) and the
units before the head return one; each
layer rebuilds its own 4-D attention mask and rotary embeddings from those with the model's own
helpers (cheap next to the layer), which keeps stages free of shared state. The cut is the one the
planner sizes (app.models.anatomy.layer_modules), so the balance it computes applies unit for unit.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from app.models.heads import ClassifierHead, EmbeddingHead, mean_pool_normalize
from app.models.anatomy import layer_modules

SUPPORTED = ("bert", "llama")


class _Embed(nn.Module):
    def __init__(self, arch: str, embeddings: nn.Module):
        super().__init__()
        self.arch = arch
        self.embeddings = embeddings

    def forward(self, x: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, mask = x
        if self.arch == "bert":
            return self.embeddings(input_ids=input_ids), mask
        return self.embeddings(input_ids), mask


class _Layer(nn.Module):
    def __init__(self, arch: str, layer: nn.Module, config: Any, rotary: nn.Module | None):
        super().__init__()
        self.arch = arch
        self.layer = layer
        self.config = config
        # Each stage owns its rotary module (buffers only): shared modules cannot span devices.
        self.rotary = copy.deepcopy(rotary) if rotary is not None else None

    def forward(self, x: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

        hidden, mask = x
        if self.arch == "bert":
            attn = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=mask)
            out = self.layer(hidden, attn)
        else:
            pos = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
            attn = create_causal_mask(
                config=self.config, inputs_embeds=hidden, attention_mask=mask, past_key_values=None, position_ids=pos
            )
            out = self.layer(hidden, attention_mask=attn, position_ids=pos,
                             position_embeddings=self.rotary(hidden, position_ids=pos))
        if isinstance(out, tuple):
            out = out[0]
        return out, mask


class _Final(nn.Module):
    """Final norm and the task head, exactly as the unsplit model computes them."""

    def __init__(self, arch: str, task: str, base: nn.Module, model: nn.Module):
        super().__init__()
        self.arch, self.task = arch, task
        self.norm = base.norm if arch == "llama" else None
        self.pooler = getattr(base, "pooler", None) if arch == "bert" and task == "classify" else None
        if task == "classify":
            self.dropout = getattr(model, "dropout", None)
            self.classifier = model.classifier if arch == "bert" else model.score

    def forward(self, x: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        hidden, mask = x
        if self.norm is not None:
            hidden = self.norm(hidden)
        if self.task == "embed":
            return mean_pool_normalize(hidden.float(), mask)
        if self.arch == "bert":
            pooled = self.pooler(hidden)
            return self.classifier(self.dropout(pooled)).float()
        logits = self.classifier(hidden)
        # Rightmost real token (right padding), as GenericForSequenceClassification picks it.
        idx = torch.arange(mask.shape[1], device=mask.device)
        last = (idx * mask.to(idx.dtype)).argmax(-1)
        return logits[torch.arange(logits.shape[0], device=logits.device), last].float()


def to_sequential(head: nn.Module, task: str) -> nn.Sequential:
    """The served head (EmbeddingHead / ClassifierHead) as pipeline units."""
    model = head.encoder if isinstance(head, EmbeddingHead) else head.classifier
    assert isinstance(head, (EmbeddingHead, ClassifierHead))
    arch = model.config.model_type
    if arch not in SUPPORTED:
        raise ValueError(f"fairscale_pp supports {SUPPORTED} models; {arch!r} is served with replicated or deepspeed_tp")
    base, embeddings, layers, _ = layer_modules(model)
    rotary = getattr(base, "rotary_emb", None)
    units: list[nn.Module] = [_Embed(arch, embeddings)]
    units += [_Layer(arch, layer, model.config, rotary) for layer in layers]
    units.append(_Final(arch, task, base, model))
    return nn.Sequential(*units).eval()
