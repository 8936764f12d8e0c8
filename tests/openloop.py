"""A lean open-loop HTTP/1.1 load generator for overload tests (run as its own process).

Arrivals are scheduled at a fixed rate whatever the server answers (open loop), so an overloaded
server sees the load a real crowd would send, not a load that politely slows down with it. httpx
costs about a millisecond of CPU per request, too much to offer ~1,000 req/s from a 2-core machine
that also runs the server; this client writes pre-built request bytes over raw keep-alive
connections (~50-100 us per request). Bounded: at most `max_connections` requests in flight (an
arrival that finds none free is counted as `client_overflow`, not queued), every request has a
deadline, and the run stops by itself.

    python -m tests.openloop --url http://127.0.0.1:8000/v1/models/m:predict --rate 800 --duration 20 \
        --body '{"instances": ["hi"]}' --out result.json
    python -m tests.openloop --url http://127.0.0.1:8000/v2/health/live --closed 64 --duration 4 --out floor.json

Writes one JSON document: per request [t_sent_s, status, latency_s, retry_after, server_ms, ingress]
(status 0: reset, -1: timeout; ingress: [ingress_ms, admission_wait_ms, model_call_ms] or null),
and the settings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from urllib.parse import urlsplit


def _request_bytes(host: str, port: int, path: str, body: bytes | None) -> bytes:
    if body is None:
        return f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def _server_ms(headers: dict[str, str]) -> float | None:
    """The model replica's share of the latency, from the service's timing headers: queue wait at
    the replica (and the ingress's gather) plus the batch's run; None where they are absent."""
    try:
        return float(headers["x-queue-wait-ms"]) + float(headers["x-batch-ms"])
    except (KeyError, ValueError):
        return None


_INGRESS_HEADERS = ("x-ingress-ms", "x-admission-wait-ms", "x-model-call-ms")


def _ingress_ms(headers: dict[str, str]) -> list[float | None] | None:
    """The ingress's timing headers: its whole share, the wait for a model slot and the model
    call's round trip (ms; None each where absent), or None when the answer has none of them."""
    values: list[float | None] = []
    for name in _INGRESS_HEADERS:
        try:
            values.append(float(headers[name]))
        except (KeyError, ValueError):
            values.append(None)
    return None if values == [None] * len(values) else values


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, str | None, bool, float | None, list | None]:
    """Status, Retry-After header, whether the connection may be reused, and the server's timing
    (`_server_ms`, `_ingress_ms`)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        await reader.read()
        return status, headers.get("retry-after"), False, _server_ms(headers), _ingress_ms(headers)
    return (status, headers.get("retry-after"), headers.get("connection", "").lower() != "close",
            _server_ms(headers), _ingress_ms(headers))


async def run(url: str, rate: float, duration_s: float, body: bytes, max_connections: int,
              timeout_s: float, lateness_s: list[float] | None = None) -> list[list]:
    """The open loop; `lateness_s`, when given, gets how late each arrival left against its schedule:
    this client's own event-loop lag, which every latency it measures also carries."""
    parts = urlsplit(url)
    host, port, path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path
    payload = _request_bytes(host, port, path, body)
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    results: list[list] = []
    in_flight = 0

    async def exchange(conn) -> tuple[int, str | None, bool, float | None, list | None]:
        reader, writer = conn
        writer.write(payload)
        return await _read_response(reader)

    async def one(t_sent: float) -> None:
        nonlocal in_flight
        conn = None
        while idle and conn is None:
            conn = idle.pop()
            if conn[0].at_eof():  # the server closed it while idle (keep-alive timeout)
                conn[1].close()
                conn = None
        t0 = time.perf_counter()
        try:
            reused = conn is not None
            if not reused:
                conn = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
            try:
                status, retry_after, reuse, server_ms, ingress = await asyncio.wait_for(exchange(conn), timeout_s)
            except (ConnectionError, asyncio.IncompleteReadError) as e:
                # An idle connection the server closed as we reused it: no byte of an answer came,
                # so the request never ran; send it once on a new connection, as HTTP clients do
                # (RFC 9112 9.3.1), instead of counting the race as a reset.
                if not reused or (isinstance(e, asyncio.IncompleteReadError) and e.partial):
                    raise
                conn[1].close()
                conn = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
                status, retry_after, reuse, server_ms, ingress = await asyncio.wait_for(exchange(conn), timeout_s)
            results.append([t_sent, status, time.perf_counter() - t0, retry_after, server_ms, ingress])
            if reuse:
                idle.append(conn)
            else:
                writer.close()
        except asyncio.TimeoutError:
            results.append([t_sent, -1, time.perf_counter() - t0, None, None, None])
            if conn is not None:
                conn[1].close()
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            results.append([t_sent, 0, time.perf_counter() - t0, None, None, None])
            if conn is not None:
                conn[1].close()
        finally:
            in_flight -= 1

    start = time.perf_counter()
    tasks = []
    i = 0
    while True:
        t = start + i / rate
        if t - start >= duration_s:
            break
        delay = t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if lateness_s is not None:
            lateness_s.append(max(0.0, time.perf_counter() - t))
        if in_flight >= max_connections:
            results.append([t - start, "client_overflow", 0.0, None, None, None])
        else:
            in_flight += 1
            tasks.append(asyncio.create_task(one(t - start)))
        i += 1
    await asyncio.gather(*tasks)
    for _, writer in idle:
        writer.close()
    return results


async def closed(url: str, connections: int, duration_s: float, body: bytes | None) -> list[list]:
    """`connections` clients, each sending its next request as soon as its last is answered (GET
    when `body` is None): the most the server answers at that concurrency."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    payload = _request_bytes(host, port, parts.path, body)
    results: list[list] = []
    start = time.perf_counter()

    async def client() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while (t0 := time.perf_counter()) - start < duration_s:
                writer.write(payload)
                status, retry_after, reuse, server_ms, ingress = await _read_response(reader)
                results.append([t0 - start, status, time.perf_counter() - t0, retry_after, server_ms, ingress])
                if not reuse:
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
        finally:
            writer.close()

    await asyncio.gather(*(client() for _ in range(connections)))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--rate", type=float, help="arrivals per second (open loop)")
    p.add_argument("--closed", type=int, metavar="N", help="instead of --rate: N clients back to back (closed loop)")
    p.add_argument("--duration", type=float, required=True, help="seconds of arrivals")
    p.add_argument("--body", help="the JSON body of every request (POST); left out: GET")
    p.add_argument("--max-connections", type=int, default=1000)
    p.add_argument("--timeout", type=float, default=30.0, help="per-request deadline (s)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    if (a.rate is None) == (a.closed is None):
        p.error("give exactly one of --rate and --closed")
    body = None if a.body is None else a.body.encode()
    lateness: list[float] = []
    if a.closed:
        results = asyncio.run(closed(a.url, a.closed, a.duration, body))
    else:
        results = asyncio.run(run(a.url, a.rate, a.duration, body, a.max_connections, a.timeout, lateness))
    from app.quantiles import percentile  # the service's one quantile rule, as bench.overload reads its rows

    lateness.sort()
    lag = {f"arrival_lateness_p{q}_ms": percentile(lateness, q) * 1e3 for q in (50, 99)} if lateness else {}
    with open(a.out, "w") as f:
        json.dump({"rate": a.rate, "duration_s": a.duration, **lag, "results": results}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
