"""Small shared helpers for tests: the repo's serve_config.yaml and model specs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


def serve_config() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "serve_config.yaml").read_text())


def app_args(config_name: str = "serve_config.yaml") -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / config_name).read_text())
    return copy.deepcopy(doc["applications"][0]["args"])


def tiny_bert_spec(**overrides: Any) -> dict[str, Any]:
    spec = {
        "name": "tiny",
        "source": {
            "kind": "random_init",
            "architecture": "bert",
            "config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
        },
        "task": "classify",
        "num_labels": 3,
        "max_seq_len": 32,
    }
    spec.update(overrides)
    return spec


def parallel_config() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "serve_config.parallel.yaml").read_text())
