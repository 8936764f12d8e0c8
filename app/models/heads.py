"""Task heads: what a served model returns for a batch of token ids.

Every head maps (input_ids [B, L], attention_mask [B, L]) to one float tensor [B, D], so runners
(local, tensor-parallel, pipeline-parallel) stay ignorant of the task.
"""

from __future__ import annotations

import torch
from torch import nn


def mean_pool_normalize(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over non-padding tokens, then L2 normalisation: exactly sentence-transformers'
    Pooling(mean) followed by Normalize() (mask-weighted sum / clamp(count, 1e-9), then F.normalize)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * mask).sum(dim=1)
    counts = mask.sum(dim=1).clamp(min=1e-9)
    return nn.functional.normalize(summed / counts, p=2, dim=1)


class EmbeddingHead(nn.Module):
    """Sentence embedding from a base encoder's last hidden state."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool_normalize(hidden.float(), attention_mask)

    @property
    def config(self):
        # DeepSpeed AutoTP reads the head counts from the model's config: without it, a model with
        # fewer KV heads than query heads (GQA) was split as if it had as many (embeddings off by
        # 128 % relative on a 4-head / 2-KV-head Llama at tp=2).
        return self.encoder.config


class ClassifierHead(nn.Module):
    """Logits of a `*ForSequenceClassification` model."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(input_ids=input_ids, attention_mask=attention_mask).logits.float()

    @property
    def config(self):
        return self.classifier.config  # for DeepSpeed AutoTP (see EmbeddingHead.config)
