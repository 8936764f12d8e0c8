"""One Ray cluster and one Serve app for the whole integration run (starting them costs ~20 s).

The app is deployed from the repo's serve_config.yaml through the same controller call that
`serve run serve_config.yaml` and `serve deploy` make, so the file's format, its `args` and its
`deployments` overrides are what the tests exercise.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from typing import Any, Iterator

import httpx
import pytest
import ray
from ray import serve
from ray._common.test_utils import wait_for_condition
from ray.cluster_utils import Cluster

from deployments.control import deploy_config, wait_ready  # deploy_config: tests import it from here too
from tests.helpers import serve_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_status(name: str):
    return serve.status().applications.get(name)


WORKER_GPUS = 2  # logical GPUs on each worker node (no CUDA needed: they are scheduling tokens)


# The README's first command runs Serve with HAProxy in front of direct-ingress replicas (Serve's
# fast HTTP path, README "Admission"). BATCHSERVE_TEST_HAPROXY=1 runs the test cluster that way too
# (the overload tests need it: `-m slow`); by default it runs Serve's Python proxy.
SERVE_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
             "RAY_SERVE_HAPROXY_BALANCE_ALGORITHM": "roundrobin"}
HAPROXY = os.environ.get("BATCHSERVE_TEST_HAPROXY") == "1"


@pytest.fixture(scope="session")
def ray_cluster():
    """A three-node Ray cluster of this test run only (head + 2 workers with logical GPUs), all on
    this machine; yields the Prometheus endpoint of every node, as Prometheus discovers them."""
    if HAPROXY:
        os.environ.update(SERVE_ENV)
    ports = [free_port() for _ in range(3)]
    # Logical CPUs: replicas take fractions of them.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 3, "num_gpus": 0, "include_dashboard": False, "metrics_export_port": ports[0]})
    for port in ports[1:]:
        cluster.add_node(num_cpus=2, num_gpus=WORKER_GPUS, metrics_export_port=port)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="batchserve-tests", log_to_driver=False)
    yield [f"http://127.0.0.1:{p}/metrics" for p in ports]
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def metrics_urls(ray_cluster) -> list[str]:
    return ray_cluster


@pytest.fixture(scope="session")
def http_port(ray_cluster) -> int:
    port = free_port()
    # One proxy, on the head: every node of this test cluster shares 127.0.0.1.
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


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


def app_entry(name: str, models: list[dict[str, Any]], env: dict[str, str] | None = None,
              **args: Any) -> dict[str, Any]:
    """An application entry of a serve config, served under /<name>, with `env` in its runtime_env.
    A model dict's `faults` (a test-only key: fault drills are not config fields) becomes the app's
    BATCHSERVE_FAULTS environment, which the model servers read (app/engine/faults.py)."""
    faults = {m["name"]: m["faults"] for m in models if "faults" in m}
    models = [{k: v for k, v in m.items() if k != "faults"} for m in models]
    entry = {"name": name, "route_prefix": f"/{name}", "import_path": "deployments.builder:build_app",
             "args": {"models": models, **args}}
    env_vars = dict(env or {})
    if faults:
        env_vars["BATCHSERVE_FAULTS"] = json.dumps(faults)
    if env_vars:
        entry["runtime_env"] = {"env_vars": env_vars}
    return entry


def shipped_env() -> dict[str, str]:
    """The environment serve_config.yaml gives its replicas (Serve's throughput settings)."""
    return dict(serve_config()["applications"][0].get("runtime_env", {}).get("env_vars", {}))


# Extra applications currently served beside the repo config, innermost last: deploying is
# declarative (applications left out are removed), so every deploy must re-declare the live ones.
_LIVE_EXTRA_APPS: list[dict[str, Any]] = []


def _config_with(apps: list[dict[str, Any]]) -> dict[str, Any]:
    config = serve_config()
    config["applications"].extend(apps)
    return config


@contextlib.contextmanager
def extra_app(base_url: str, app: dict[str, Any], ready_timeout_s: float = 180) -> Iterator[str]:
    """Serve `app` beside the repo's config (and any extra apps already live, e.g. a module
    fixture's) for the duration; yields its URL, then removes only `app`."""
    gpus_free_before = ray.available_resources().get("GPU", 0)
    _LIVE_EXTRA_APPS.append(app)
    deploy_config(_config_with(_LIVE_EXTRA_APPS))
    url = f"{base_url}{app['route_prefix']}"
    try:
        wait_ready(url, timeout_s=ready_timeout_s)
        yield url
    finally:
        _LIVE_EXTRA_APPS.remove(app)
        deploy_config(_config_with(_LIVE_EXTRA_APPS))
        wait_for_condition(lambda: app_status(app["name"]) is None, timeout=120)
        # Serve forgets a replica once it has sent the kill; the GPU comes back when the process is
        # gone. The next test must start from the cluster this one found (a CI run once began a
        # scaling test with two GPUs still held by the previous app's dying replicas).
        t0 = time.monotonic()
        wait_for_condition(lambda: ray.available_resources().get("GPU", 0) >= gpus_free_before, timeout=120)
        print(f"\n[{app['name']}] removed; its GPUs were free again {time.monotonic() - t0:.1f} s after Serve forgot it")
