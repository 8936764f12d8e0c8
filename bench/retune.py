"""Retune a running application's batching the way an operator does: a `deployments[].user_config`
override applied through Serve's controller (what `serve deploy` sends). Replicas reconfigure in
place; nothing restarts."""

from __future__ import annotations

import copy
import time
from typing import Any

import httpx

from deployments.control import deploy_config


def with_user_config(config: dict[str, Any], app: str, model: str, user_config: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(config)
    for a in doc["applications"]:
        if a["name"] == app:
            deps = [d for d in a.get("deployments", []) if d.get("name") != model]
            a["deployments"] = deps + [{"name": model, "user_config": dict(user_config)}]
            return doc
    raise ValueError(f"no application named {app!r} in the config (have {[a['name'] for a in doc['applications']]})")


def current_batching(url: str, model: str) -> dict[str, Any]:
    models = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
    for m in models:
        if m["name"] == model:
            return m["batching"]
    raise ValueError(f"model {model!r} is not served at {url}")


def apply_batching(url: str, config: dict[str, Any], app: str, model: str, user_config: dict[str, Any],
                   timeout_s: float = 120) -> dict[str, Any]:
    """Deploy the override and wait until the replicas report it; returns the applied config."""
    doc = with_user_config(config, app, model, user_config)
    deploy_config(doc)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            got = current_batching(url, model)
            if all(got.get(k) == v for k, v in user_config.items() if k in got):
                return doc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"model {model!r} did not report batching {user_config} within {timeout_s}s")
