"""One Ray cluster and one Serve app for the whole integration run (starting them costs ~20 s).

The app is deployed from the repo's serve_config.yaml through the same controller call that
`serve run serve_config.yaml` and `serve deploy` make, so the file's format, its `args` and its
`deployments` overrides are what the tests exercise.
"""

from __future__ import annotations

import socket

import httpx
import pytest
import ray
from ray import serve
from ray._common.test_utils import wait_for_condition

from app.bench.retune import deploy_config  # noqa: F401 - tests import it from here too
from tests.helpers import serve_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_status(name: str):
    return serve.status().applications.get(name)


@pytest.fixture(scope="session")
def ray_cluster():
    """A Ray cluster of this test run only; yields the URL of its Prometheus metrics endpoint."""
    metrics_port = free_port()
    # Logical CPUs: replicas take fractions of them; 4 leaves room for extra test deployments.
    ray.init(num_cpus=4, include_dashboard=False, namespace="batchserve-tests", log_to_driver=False,
             _metrics_export_port=metrics_port)
    yield f"http://127.0.0.1:{metrics_port}/metrics"
    ray.shutdown()


@pytest.fixture(scope="session")
def metrics_url(ray_cluster) -> str:
    return ray_cluster


@pytest.fixture(scope="session")
def http_port(ray_cluster) -> int:
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


def wait_ready(url: str, timeout_s: float = 180) -> None:
    def ready() -> bool:
        try:
            return httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for_condition(ready, timeout=timeout_s, retry_interval_ms=500)


@pytest.fixture(scope="session")
def base_url(http_port) -> str:
    """The repo's own serve_config.yaml, served over real HTTP."""
    deploy_config(serve_config())
    url = f"http://127.0.0.1:{http_port}"
    wait_ready(url)
    return url


@pytest.fixture
def client(base_url):
    with httpx.Client(base_url=base_url, timeout=60) as c:
        yield c
