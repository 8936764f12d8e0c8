"""Known traffic in, Prometheus scrape out: counts, histograms, batch sizes, cost, and the dashboard."""

from __future__ import annotations

import asyncio
import json
import re
from collections import defaultdict

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from ray._common.test_utils import wait_for_condition

from tests.helpers import ROOT, tiny_bert_spec
from tests.integration.conftest import app_entry, extra_app

pytestmark = pytest.mark.integration

MODEL = "metered"
GOOD, TOO_LONG, MALFORMED = 40, 6, 4
CPU_HOUR_USD = 1.0
REPLICA_CPUS = 0.25
# NVML metrics exist only where a GPU does; everything else the dashboard names must be scraped here.
GPU_ONLY = {"ray_batchserve_gpu_utilization_percent", "ray_batchserve_gpu_memory_used_bytes"}
# Exported by generator replicas only: test_generation.py checks them while its generator runs.
GENERATION_ONLY = {"ray_batchserve_time_to_first_token_ms_bucket", "ray_batchserve_time_per_output_token_ms_bucket",
                   "ray_batchserve_generated_tokens_total", "ray_batchserve_prompt_tokens_total",
                   "ray_batchserve_running_sequences", "ray_batchserve_waiting_sequences",
                   "ray_batchserve_kv_cache_used_fraction", "ray_batchserve_cost_per_1m_generated_tokens_usd"}


def dashboard_metrics() -> set[str]:
    dash = json.loads((ROOT / "cluster" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    return {m for e in exprs for m in re.findall(r"\b(ray_[a-z0-9_]+)", e)}


def scrape(urls: list[str]) -> dict[str, list]:
    """Sample name -> [(labels, value)] over every node's endpoint, through prometheus_client's parser."""
    out: dict[str, list] = defaultdict(list)
    for url in urls:
        for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
            for s in family.samples:
                out[s.name].append((s.labels, s.value))
    return out


def total(samples: dict[str, list], name: str, **labels: str) -> float:
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


@pytest.fixture(scope="module")
def metered_url(base_url):
    spec = tiny_bert_spec(name=MODEL, batching={"max_batch_size": 16, "batch_wait_timeout_s": 0.05},
                          limits={"max_text_chars": 100}, deployment={"num_cpus": REPLICA_CPUS})
    cost = {"gpu_hour_usd": 10.0, "cpu_hour_usd": CPU_HOUR_USD, "window_s": 60}
    with extra_app(base_url, app_entry("metered", [spec], cost=cost)) as url:
        yield url


async def _traffic(url: str) -> list[int]:
    path = f"/v1/models/{MODEL}:predict"
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        good = [c.post(path, json={"instances": [f"good request {i}"]}) for i in range(GOOD)]
        long = [c.post(path, json={"instances": ["x" * 500]}) for _ in range(TOO_LONG)]
        bad = [c.post(path, content=b"{nope") for _ in range(MALFORMED)]
        return [r.status_code for r in await asyncio.gather(*good, *long, *bad)]


def test_scrape_matches_known_traffic(metered_url, metrics_urls):
    statuses = asyncio.run(_traffic(metered_url))
    assert statuses.count(200) == GOOD and statuses.count(413) == TOO_LONG and statuses.count(400) == MALFORMED

    def exported() -> bool:
        s = scrape(metrics_urls)
        # The queue depth is a gauge the model server's sampler publishes each second, apart from
        # the ingress's counters: wait for its drained value too rather than race the two exports.
        return (total(s, "ray_batchserve_requests_total", model=MODEL, outcome="ok") == GOOD
                and total(s, "ray_batchserve_batch_size_count", model=MODEL) > 0
                and total(s, "ray_batchserve_cost_per_1k_requests_usd", model=MODEL) > 0
                and total(s, "ray_batchserve_queue_depth", model=MODEL) == 0)

    wait_for_condition(exported, timeout=90, retry_interval_ms=2000)
    s = scrape(metrics_urls)
    route = "/v1/models/{name}:predict"
    assert total(s, "ray_batchserve_requests_total", model=MODEL, route=route, outcome="ok") == GOOD
    assert total(s, "ray_batchserve_requests_total", model=MODEL, outcome="client_error") == TOO_LONG + MALFORMED
    assert total(s, "ray_batchserve_requests_total", model=MODEL, outcome="server_error") == 0
    # Every request (good or bad) was timed; only good ones reached the queue.
    assert total(s, "ray_batchserve_request_latency_ms_count", model=MODEL) == GOOD + TOO_LONG + MALFORMED
    assert total(s, "ray_batchserve_queue_wait_ms_count", model=MODEL) == GOOD
    assert total(s, "ray_batchserve_items_total", model=MODEL) == GOOD
    batches = total(s, "ray_batchserve_batch_size_count", model=MODEL)
    singles = total(s, "ray_batchserve_batch_size_bucket", model=MODEL, le="1.0")
    assert batches < GOOD and singles < batches, "no batch held more than one item"
    assert total(s, "ray_batchserve_queue_depth", model=MODEL) == 0  # all drained

    # Cost: per-1k gauge x requests / 1000 is the device cost of the window; with the configured
    # price that window must be a real span of replica time: more than 0 s, at most the 60 s window.
    per_1k = total(s, "ray_batchserve_cost_per_1k_requests_usd", model=MODEL)
    hourly = REPLICA_CPUS * CPU_HOUR_USD
    window_s = per_1k * GOOD / 1000 / (hourly / 3600)
    assert 0 < window_s <= 60.5, (per_1k, window_s)
    assert total(s, "ray_batchserve_cost_usd_total", model=MODEL) > 0


def test_dashboard_names_only_scraped_metrics(metered_url, metrics_urls):
    dash = json.loads((ROOT / "cluster" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10 and all(p["datasource"]["type"] == "prometheus" for p in dash["panels"])
    named = {m for e in exprs for m in re.findall(r"\b(ray_[a-z0-9_]+)", e)}
    scraped = set(scrape(metrics_urls))
    missing = named - scraped - GPU_ONLY - GENERATION_ONLY
    assert not missing, f"dashboard names metrics the service does not export: {sorted(missing)}"
    for panel in ("QPS", "p99", "Batch size", "Queue depth", "GPU utilisation", "Cost per 1000"):
        assert any(panel.lower() in p["title"].lower() for p in dash["panels"]), panel


def test_cancel_timeout_and_shed_are_counted_as_what_they_are(base_url, metrics_urls, http_port):
    """A client that gives up, a body that never finishes and a request past a full queue are not
    server errors: each has its own outcome."""
    spec = tiny_bert_spec(name="outcomes", batching={"max_batch_size": 2, "batch_wait_timeout_s": 0.01},
                          deployment={"num_cpus": 0.1, "max_ongoing_requests": 2},
                          autoscaling={"max_queued_requests": 1}, faults={"batch_delay_s": 0.5})
    # A roomy ingress, so a full model queue is answered by the ingress (and counted there).
    with extra_app(base_url, app_entry("outcomes", [spec], ingress={"max_ongoing_requests": 100})) as url:
        path = "/v1/models/outcomes:predict"

        async def burst() -> list[int]:
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                rs = await asyncio.gather(*(c.post(path, json={"instances": [f"s{i}"]}) for i in range(12)))
                return [r.status_code for r in rs]

        statuses = asyncio.run(burst())
        shed = statuses.count(503)
        assert shed >= 1 and set(statuses) <= {200, 503}, statuses

        async def impatient() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=0.1) as c:
                with pytest.raises(httpx.TimeoutException):
                    await c.post(path, json={"instances": ["gone"]})

        asyncio.run(impatient())
        import socket
        with socket.create_connection(("127.0.0.1", http_port), timeout=10) as s:
            s.sendall(f"POST /outcomes{path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{".encode())
            assert s.recv(4096).split(b" ", 2)[1] == b"408"

        def counted() -> bool:
            s = scrape(metrics_urls)
            return (total(s, "ray_batchserve_requests_total", model="outcomes", outcome="shed") == shed
                    and total(s, "ray_batchserve_requests_total", model="outcomes", outcome="client_cancel") == 1
                    and total(s, "ray_batchserve_requests_total", model="outcomes", outcome="timeout") == 1)

        wait_for_condition(counted, timeout=60, retry_interval_ms=2000)
        s = scrape(metrics_urls)
        assert total(s, "ray_batchserve_requests_total", model="outcomes", outcome="server_error") == 0
