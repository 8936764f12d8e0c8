"""Operating a running Serve cluster the way `serve deploy` does: apply a whole config file's
applications through the controller, and wait for an application to report ready. Used by the
benchmark CLI (live retunes) and by the integration tests."""

from __future__ import annotations

import copy
import time
from typing import Any

import httpx


def deploy_config(config: dict[str, Any]) -> None:
    """Apply a whole serve config file's applications (declarative: apps left out are removed)."""
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    config = copy.deepcopy(config)
    # The running proxy keeps its own options; only applications are (re)declared.
    config.pop("http_options", None)
    config.pop("proxy_location", None)
    serve.context._get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))


def wait_ready(url: str, timeout_s: float = 180, period_s: float = 0.5) -> None:
    """Poll the application's `/v2/health/ready` until it answers 200 (every model ready)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(period_s)
    raise TimeoutError(f"{url} not ready within {timeout_s:.0f} s")
