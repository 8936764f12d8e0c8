"""The shipped serve_config.yaml under overload and hostile input, as a crowd and an attacker would
send them: load past capacity is shed with 503 + Retry-After at once, accepted requests keep their
latency, every hostile request is refused cheaply, and the service scales out and back in."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import psutil
import pytest
from ray._common.test_utils import wait_for_condition

from app.quantiles import percentile
from bench.overload import BODY, PATH, capacity_rps, closed_loop, http_floor, measure
from tests.helpers import processes_titled
from tests.integration.conftest import HAPROXY, app_status

pytestmark = pytest.mark.integration



def p99(values: list[float]) -> float:
    return percentile(sorted(values), 99)


def replica_processes(deployment: str) -> set[int]:
    return processes_titled(f"ServeReplica:batchserve:{deployment}")


def running(deployment: str) -> int:
    status = app_status("batchserve")
    return 0 if status is None else status.deployments[deployment].replica_states.get("RUNNING", 0)


# Past this share of what the HTTP layer answers for free, the open-loop clients and the shedding
# compete for the same cores, and the run measures the machine, not the admission (one ingress
# replica answers ~2,500 trivial req/s on either machine of docs/performance.md "Overload").
FLOOR_SHARE = 0.5


@pytest.mark.slow
@pytest.mark.skipif(not HAPROXY, reason="measures the README's HAProxy front end: BATCHSERVE_TEST_HAPROXY=1")
def test_ten_times_capacity_is_shed_with_503_at_once(base_url, tmp_path):
    wait_for_condition(lambda: running("minilm") == 1, timeout=120)  # start from the scaled-in state
    ingress_before = replica_processes("Ingress")
    floor = http_floor(base_url, tmp_path)
    capacity = capacity_rps(base_url)
    if 10 * capacity > FLOOR_SHARE * floor:
        pytest.skip(f"this machine cannot offer 10x: capacity {capacity:.0f} req/s, but the HTTP layer answers "
                    f"only {floor:.0f} req/s of requests that do no model work (needs > {10 * capacity / FLOOR_SHARE:.0f}); "
                    f"measure on more cores with more ingress replicas: python -m bench.overload")
    r = measure(base_url, tmp_path, capacity)
    half, ten = r["half"], r["ten"]
    print(f"\noverload: floor {floor:.0f} req/s, capacity {capacity:.1f} req/s; {json.dumps(r)}")
    assert half["accepted"] == half["requests"], half["counts"]
    assert ten["hung"] == 0 and ten["client_overflow"] == 0  # nothing hung, nothing piled up
    assert ten["other_5xx"] == 0
    assert ten["shed_503_retry_after"] >= 0.9 * ten["rejected"] and ten["rejected"] >= 0.5 * ten["requests"]
    # The bounds. Accepted requests within 3x their half-load p99: the shipped gate (slot
    # shares dealt out whole, HAProxy round-robin) measured 1.89-2.83x in 7 of 7 runs of this protocol
    # (bench.overload) on 16 cores with 3 ingress replicas; shares rounded up 2.00-3.46x, the plain
    # one-batch queue 2.66-4.72x, Serve's handle queue alone 15-25x (docs/performance.md, sessions
    # 13-34).
    assert ten["shed_p99_ms"] < 100
    assert ten["accepted_p99_ms"] <= 3 * half["accepted_p99_ms"]
    assert r["recovered_s"] < 5.0
    assert replica_processes("Ingress") == ingress_before  # no health check failed: the same replicas serve


# ------------------------------------------------------------------------------ hostile input


def _raw(port: int, payload: bytes, read_timeout_s: float = 5.0) -> tuple[int, float]:
    """Send raw bytes; the status of the answer and how long it took."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout_s) as s:
        s.sendall(payload)
        head = s.recv(65536)
    return int(head.split(b" ", 2)[1]), time.perf_counter() - t0


def _v2(body: dict, **headers: str) -> bytes:
    raw = json.dumps(body).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (f"POST /v2/models/minilm/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(raw)}\r\n{extra}\r\n").encode() + raw


def _chunked_flood(port: int, total_bytes: int) -> tuple[int, float]:
    """A chunked upload of `total_bytes` that stops as soon as the server answers."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /v1/models/minilm:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n" % (1 << 16) + b"[" * (1 << 16) + b"\r\n"
        sent = 0
        s.setblocking(False)
        while sent < total_bytes:
            try:
                head = s.recv(65536)
                if head:
                    return int(head.split(b" ", 2)[1]), time.perf_counter() - t0
            except BlockingIOError:
                pass
            try:
                s.send(chunk)
                sent += 1 << 16
            except BlockingIOError:
                time.sleep(0.001)
            except OSError:
                break
        s.setblocking(True)
        s.settimeout(5)
        head = s.recv(65536)
        return int(head.split(b" ", 2)[1]), time.perf_counter() - t0


def _incomplete_chunked(port: int) -> tuple[int, float]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /v1/models/minilm:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"ins\r\n")
        t0 = time.perf_counter()  # from the moment the client stalls
        head = s.recv(65536)
        return int(head.split(b" ", 2)[1]), time.perf_counter() - t0


HOSTILE = {
    "header ²": lambda port: _raw(port, _v2({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                                                         "data": ["hi"]}]}, **{"Inference-Header-Content-Length": "²"})),
    "shape [1e9, 0]": lambda port: _raw(port, _v2({"inputs": [{"name": "input_ids", "datatype": "INT64",
                                                                "shape": [10**9, 0], "data": []}]})),
    "shape [3e7, 0]": lambda port: _raw(port, _v2({"inputs": [{"name": "input_ids", "datatype": "INT64",
                                                                "shape": [3 * 10**7, 0], "data": []}]})),
    "overflowing shape": lambda port: _raw(port, _v2({"inputs": [{"name": "input_ids", "datatype": "INT64",
                                                                   "shape": [4294967296, 4294967296], "data": [1]}]})),
    "deep JSON": lambda port: _raw(port, (b"POST /v1/models/minilm:predict HTTP/1.1\r\nHost: x\r\n"
                                          b"Content-Length: 200000\r\n\r\n" + b"[" * 100_000 + b"]" * 100_000)),
    "wide JSON": lambda port: _raw(port, (lambda raw: b"POST /v2/models/minilm/infer HTTP/1.1\r\nHost: x\r\n"
                                          b"Content-Length: %d\r\n\r\n" % len(raw) + raw)(
        b'{"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 1], "data": [' + b"[]," * 2_700_000
        + b"[]]}]}")),
    "512 MB chunked body": lambda port: _chunked_flood(port, 512 << 20),
    "incomplete chunked body": _incomplete_chunked,
}


def ingress_rss() -> int:
    (pid,) = replica_processes("Ingress")
    return psutil.Process(pid).memory_info().rss


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_request_is_refused_at_once_and_costs_nobody_else(base_url, http_port, case):
    rss_before = ingress_rss()
    good: list[float] = []
    stop = asyncio.Event()

    async def good_traffic():
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                r = await c.post("/v1/models/bert-classifier:predict", json={"instances": ["fine"]})
                assert r.status_code == 200
                good.append(time.perf_counter() - t0)
                await asyncio.sleep(0.02)

    async def main():
        task = asyncio.create_task(good_traffic())
        await asyncio.sleep(0.5)
        status, took = await asyncio.to_thread(HOSTILE[case], http_port)
        await asyncio.sleep(0.5)
        stop.set()
        await task
        return status, took

    status, took = asyncio.run(main())
    grew_mb = (ingress_rss() - rss_before) / 2**20
    print(f"\n{case}: {status} in {took * 1000:.0f} ms; good requests p99 {p99(good) * 1000:.0f} ms over "
          f"{len(good)}; ingress RSS {grew_mb:+.1f} MB")
    assert 400 <= status < 500
    assert took < 1.0
    assert p99(good) < 0.2
    assert grew_mb < 100


# ------------------------------------------------------------------------------ autoscaling


@pytest.mark.slow
def test_shipped_config_scales_out_under_load_and_back_in(base_url):
    wait_for_condition(lambda: running("minilm") == 1, timeout=120)
    # A crowd that keeps one replica full: more clients back to back than it and the ingress hold
    # (2 batches in the replica, one queued at the ingress, the rest answered 503; a client answered
    # 503 backs off 50 ms), for as long as the scale-out takes. A fixed open-loop rate would be below
    # one replica's capacity on a fast machine and past what 2 shared cores answer at all on a slow one.
    statuses = asyncio.run(closed_loop(base_url, PATH, BODY, 60.0, 32, until=lambda: running("minilm") == 2,
                                       retry_after_s=0.05))
    assert running("minilm") == 2, f"no second replica after 60 s of a saturating crowd: {statuses}"
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.get(200, 0) > 0
    # Back to one replica once the load is gone (downscale delay 30 s after the look-back window).
    wait_for_condition(lambda: running("minilm") == 1, timeout=120, retry_interval_ms=1000)
