"""Build a served model (task head around a transformers model) and its tokenizer from a ModelSpec.

Three sources: a packaged model (offline, from site-packages), a local `save_pretrained` directory,
or an architecture config with seeded random weights. The same spec always yields the same weights,
which is what lets parallel runners be checked against the local one.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.config import LocalDirSource, ModelSpec, PackagedSource, RandomInitSource
from app.models.heads import ClassifierHead, EmbeddingHead

# Models load from disk only; a hub lookup on this network hangs until it times out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class ModelLoadError(RuntimeError):
    pass


def _package_dir(package: str) -> Path:
    try:
        mod = importlib.import_module(package)
    except ImportError as e:
        raise ModelLoadError(f"source.package: cannot import {package!r} ({e}); is it installed?") from None
    getter = getattr(mod, "get_model_path", None)
    path = Path(getter()) if getter else Path(mod.__file__).parent / "model"
    if not (path / "config.json").exists():
        raise ModelLoadError(f"source.package: {package!r} ships no model at {path}")
    return path


def weights_dir(spec: ModelSpec) -> Path | None:
    src = spec.source
    if isinstance(src, PackagedSource):
        return _package_dir(src.package)
    if isinstance(src, LocalDirSource):
        p = Path(src.path).expanduser()
        if not (p / "config.json").exists():
            raise ModelLoadError(f"source.path: {p} is not a save_pretrained directory (no config.json)")
        return p
    return None


def tokenizer_dir(spec: ModelSpec) -> Path:
    src = spec.source
    if isinstance(src, RandomInitSource):
        if src.tokenizer_path:
            return Path(src.tokenizer_path).expanduser()
        return _package_dir(src.tokenizer_package)
    return weights_dir(spec)  # type: ignore[return-value]


def load_tokenizer(spec: ModelSpec):
    """The spec's tokenizer: tokenizer.json through `tokenizers` directly when the source has one
    (app/models/tokenize.py says why), else transformers' AutoTokenizer."""
    from app.models.tokenize import HFTokenizer, RustTokenizer

    path = tokenizer_dir(spec)
    if (path / "tokenizer.json").exists():
        return RustTokenizer(path, spec.deployment.tokenizer_word_cache)
    from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(str(path), use_fast=True))


def build_config(spec: ModelSpec, vocab_size: int | None = None) -> Any:
    """The transformers config of the served model (no weights are touched)."""
    from transformers import AutoConfig

    src = spec.source
    if isinstance(src, RandomInitSource):
        overrides: dict[str, Any] = dict(src.config)
        if vocab_size is not None:
            overrides.setdefault("vocab_size", vocab_size)
        overrides.setdefault("pad_token_id", 0)
        overrides.setdefault("max_position_embeddings", max(spec.max_seq_len, 512))
        try:
            cfg = AutoConfig.for_model(src.architecture, **overrides)
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"source.config: {e}") from None
    else:
        cfg = AutoConfig.from_pretrained(str(weights_dir(spec)))
    if spec.task == "classify":
        cfg.num_labels = spec.num_labels
        cfg.id2label = dict(enumerate(spec.label_names()))
        cfg.label2id = {v: k for k, v in cfg.id2label.items()}
        if getattr(cfg, "pad_token_id", None) is None:
            cfg.pad_token_id = 0
    return cfg


def resolve_dtype(spec: ModelSpec, device: torch.device) -> torch.dtype:
    if spec.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec.dtype]


def resolve_device(spec: ModelSpec, local_rank: int = 0) -> torch.device:
    if spec.device == "cuda" or (spec.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ModelLoadError("device: 'cuda' was asked but no CUDA device is visible to this replica")
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def auto_model_class(spec: ModelSpec):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    return {"embed": AutoModel, "classify": AutoModelForSequenceClassification,
            "generate": AutoModelForCausalLM}[spec.task]


def build_backbone(
    spec: ModelSpec,
    vocab_size: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """The transformers model with the spec's weights, on `device` in `dtype`.

    Random weights are drawn on the target device itself (seeded), so a multi-billion-parameter
    model initialises in seconds on a GPU instead of minutes on the host; every process that builds
    the same spec on the same kind of device gets the same weights, which is what lets a
    tensor-parallel rank, a pipeline and the local runner be compared.
    """
    cls = auto_model_class(spec)
    cfg = build_config(spec, vocab_size)
    device = torch.device(device)
    if isinstance(spec.source, RandomInitSource):
        torch.manual_seed(spec.source.seed)
        if device.type == "cuda":
            torch.cuda.manual_seed_all(spec.source.seed)
        with torch.device(device):
            model = cls.from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    else:
        model = cls.from_pretrained(str(weights_dir(spec)), config=cfg, attn_implementation="sdpa", dtype=dtype)
        model = model.to(device)
    return model.eval()


def wrap_head(spec: ModelSpec, backbone: nn.Module) -> nn.Module:
    head = EmbeddingHead(backbone) if spec.task == "embed" else ClassifierHead(backbone)
    return head.eval()


def check_vocab(spec: ModelSpec, tokenizer_vocab: int, model_vocab: int) -> None:
    if model_vocab < tokenizer_vocab:
        raise ModelLoadError(
            f"source.config.vocab_size: {model_vocab} is smaller than the tokenizer's vocabulary ({tokenizer_vocab})"
        )
