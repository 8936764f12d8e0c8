"""The overload tests' load generator: a keep-alive connection the server closed while idle is
not counted as a reset, and the closed-loop mode counts what the server answered."""

from __future__ import annotations

import asyncio

from tests import openloop


async def _server(idle_close_s: float) -> tuple[asyncio.AbstractServer, int]:
    """HTTP/1.1 keep-alive server that answers 200 and closes a connection idle for idle_close_s."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), idle_close_s)
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_connections_closed_while_idle_are_replaced_not_counted_as_resets():
    async def go():
        server, port = await _server(idle_close_s=0.05)
        async with server:
            # 20 arrivals 0.1 s apart: every reused connection has been closed by the server.
            return await openloop.run(f"http://127.0.0.1:{port}/x", 10, 2.0, b"{}", 10, 5.0)
    results = asyncio.run(go())
    assert len(results) == 20
    assert {status for _, status, *_ in results} == {200}


def test_closed_loop_counts_every_answer():
    async def go():
        server, port = await _server(idle_close_s=5.0)
        async with server:
            return await openloop.closed(f"http://127.0.0.1:{port}/x", 4, 0.5, None)
    results = asyncio.run(go())
    assert len(results) > 20
    assert {status for _, status, *_ in results} == {200}


def test_ingress_timing_headers_are_read_and_absent_ones_are_none():
    assert openloop._ingress_ms({"x-ingress-ms": "12.5", "x-admission-wait-ms": "3.0", "x-model-call-ms": "8.25"}) \
        == [12.5, 3.0, 8.25]
    assert openloop._ingress_ms({"x-ingress-ms": "0.40"}) == [0.4, None, None]  # a 503: no model call
    assert openloop._ingress_ms({"content-length": "2"}) is None
