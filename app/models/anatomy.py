"""Where each supported architecture keeps its parts: embeddings, the stack of transformer layers,
and what comes after them. Shared by the planner (sizes) and the pipeline runner (stages), so both
cut a model alike."""

from __future__ import annotations

from typing import Any, Sequence


class UnsupportedArchitecture(ValueError):
    """A model family whose layers this service does not know how to find."""


def layer_modules(model: Any) -> tuple[Any, Any, Sequence[Any], list[Any]]:
    """(base model, embeddings, transformer layers, modules after the layers) of a supported model."""
    base = getattr(model, model.base_model_prefix, model)
    arch = model.config.model_type
    if arch == "bert":
        return base, base.embeddings, base.encoder.layer, [m for m in (base.pooler,) if m is not None] + _heads(model, base)
    if arch == "llama":
        return base, base.embed_tokens, base.layers, [base.norm, base.rotary_emb] + _heads(model, base)
    if arch == "opt":
        dec = base.decoder
        after = [m for m in (dec.final_layer_norm, dec.project_out) if m is not None]
        return base, dec.embed_tokens, dec.layers, after + _heads(model, base)
    raise UnsupportedArchitecture(f"architecture {arch!r} is not supported for planning (bert, llama, opt)")


def _heads(model: Any, base: Any) -> list[Any]:
    if model is base:
        return []
    return [m for name, m in model.named_children() if m is not base]
