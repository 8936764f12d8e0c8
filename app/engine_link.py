"""A direct TCP link from an ingress replica to a model server's own port (`gather.transport: direct`).

Measured on one H200 (README "The front-end/engine split"): with the ingress gathering requests, a
model server reached through Serve handles spent its one core in Serve's per-call machinery (the
router, the actor call, result serialisation on its own thread, per-request metrics, the hand-offs
between those threads), not on batches; the GPU was a third busy. Here a merged call is one frame
on a socket the model server reads on its own event loop, straight into the same `infer` (the same
batch queue, limits and errors), as vLLM's API servers reach their engine core over ZeroMQ.

Serve still owns placement, health and scaling: a link is dialled by asking a replica for its
address through the handle (so Serve's router picks the replica), and every failure of the link
falls back to the handle, which knows the live replicas. Links are redialled every `relink_s`, so
replicas added by the autoscaler get their share.

Pure asyncio (the handle calls are passed in); unit-tested over real sockets without Ray.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from dataclasses import replace
from typing import Any, Awaitable, Callable, Optional

from app import wire
from app.errors import ModelFailure, Overloaded, ServingError
from app.requests import InferenceResult, ModelInput

logger = logging.getLogger("ray.serve")

_CONNECT_TIMEOUT_S = 2.0
_MAX_BACKOFF_S = 10.0
# Links one engine accepts at once: ingress replicas x gather.links is a few dozen in any layout we
# run; past this a connection is closed before its hello is read.
MAX_LINKS = 256


class LinkLost(Exception):
    """The connection dropped (the engine died, was replaced, or refused the link)."""


# ---------------------------------------------------------------------------------------------- engine


class EngineListener:
    """The model server's end: answers call frames with `infer`, as a handle call would be answered.

    Reachable only inside the cluster network: it listens on the node's cluster address (never on
    every interface), on an ephemeral port (cluster/ray-cluster.yaml says which to allow). A link is
    answered only after a hello carrying the secret that the ingress got through the Serve handle
    (compared in constant time, read with a frame limit of the hello's own size and a deadline), and
    at most `max_links` links are open at once."""

    def __init__(self, infer: Callable[[ModelInput], Awaitable[InferenceResult]], max_calls_in_flight: int,
                 max_links: int = MAX_LINKS):
        self._infer = infer
        self._limit = max_calls_in_flight
        self._max_links = max_links
        self.secret = secrets.token_bytes(wire.SECRET_BYTES)
        self._starting: Optional[asyncio.Future] = None
        self._in_flight = 0
        self.links = 0

    async def start(self, host: str) -> int:
        """Listen on `host` (the node's address; once, however many callers ask) on the running
        loop; the port."""
        if self._starting is None:
            self._starting = asyncio.ensure_future(asyncio.start_server(self._serve, host, 0))
        server = await asyncio.shield(self._starting)
        return server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if self.links >= self._max_links:
            logger.warning("engine link from %s refused: %d links already open", peer, self.links)
            writer.close()
            return
        self.links += 1
        answering: set[asyncio.Task] = set()
        try:
            hello = await asyncio.wait_for(wire.read_frame(reader, wire.HELLO_BYTES), _CONNECT_TIMEOUT_S)
            if not wire.check_hello(hello, self.secret):
                logger.warning("engine link from %s refused: wrong hello", peer)
                return
            writer.write(wire.frame(wire.WELCOME))
            while True:
                call_id, inputs = wire.decode_call(await wire.read_frame(reader))
                task = asyncio.get_running_loop().create_task(self._answer(call_id, inputs, writer))
                answering.add(task)
                task.add_done_callback(answering.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the ingress went away or redialled
        except asyncio.TimeoutError:
            logger.warning("engine link from %s refused: no hello within %.0f s", peer, _CONNECT_TIMEOUT_S)
        except wire.WireError as e:
            logger.warning("engine link from %s dropped: %s", peer, e)
        finally:
            self.links -= 1
            for task in answering:  # nobody is left to read their answers
                task.cancel()
            writer.close()

    async def _answer(self, call_id: int, inputs: ModelInput, writer: asyncio.StreamWriter) -> None:
        if self._in_flight >= self._limit:
            writer.write(wire.encode_error(call_id, Overloaded("the model's queue is full; retry shortly")))
            return
        self._in_flight += 1
        try:
            data = wire.encode_answer(call_id, await self._infer(inputs))
        except ServingError as e:
            data = wire.encode_error(call_id, e)
        except Exception as e:  # noqa: BLE001 - reported to the caller, as a handle call would be
            logger.exception("engine link call failed")
            data = wire.encode_error(call_id, ModelFailure(f"the model server failed: {type(e).__name__}"))
        finally:
            self._in_flight -= 1
        if not writer.is_closing():
            writer.write(data)
            try:
                await writer.drain()
            except ConnectionError:
                pass


# ---------------------------------------------------------------------------------------------- ingress


class EngineLink:
    """One connection to one engine; calls on it are pipelined and matched to answers by id."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, engine: str):
        self.engine = engine
        self.opened = time.monotonic()
        self._writer = writer
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future] = {}
        self._closed = False
        self._retiring = False
        self._reading = asyncio.get_running_loop().create_task(self._read(reader))

    @classmethod
    async def open(cls, host: str, port: int, secret: bytes, engine: str) -> "EngineLink":
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), _CONNECT_TIMEOUT_S)
        writer.write(wire.hello(secret))
        try:
            # Up only once the engine says so: a refused link is a failed dial (backed off), not a
            # link that dies at once and is redialled on the next call.
            welcome = await asyncio.wait_for(wire.read_frame(reader), _CONNECT_TIMEOUT_S)
        except (asyncio.IncompleteReadError, ConnectionError, wire.WireError):
            welcome = b""
        if welcome != wire.WELCOME:
            writer.close()
            raise LinkLost(f"engine {engine} refused the link")
        return cls(reader, writer, engine)

    @property
    def alive(self) -> bool:
        return not self._closed

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def call(self, inputs: ModelInput) -> InferenceResult:
        if self._closed:
            raise LinkLost("link closed")
        call_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        try:
            self._writer.write(wire.encode_call(call_id, inputs))
            result = await future
        finally:
            self._pending.pop(call_id, None)
            if self._retiring and not self._pending:
                self._close(LinkLost("link retired"))
        if isinstance(result, ServingError):
            raise result
        return result

    def retire(self) -> None:
        """Take no new calls; close once the calls out are answered."""
        self._retiring = True
        if not self._pending:
            self._close(LinkLost("link retired"))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        reason = "the engine closed the link"
        try:
            while True:
                call_id, result = wire.decode_reply(await wire.read_frame(reader))
                future = self._pending.get(call_id)
                if future is not None and not future.done():
                    future.set_result(result)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            reason = f"the engine closed the link ({type(e).__name__})"
        except wire.WireError as e:
            reason = f"the engine's answer did not parse: {e}"
        finally:
            self._close(LinkLost(reason))

    def _close(self, error: LinkLost) -> None:
        if self._closed:
            return
        self._closed = True
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._writer.close()
        if asyncio.current_task() is not self._reading:
            self._reading.cancel()


class EngineLinks:
    """An ingress replica's links to one model's engines, with the Serve handle as the fallback.

    `address()` asks one replica, through the handle, for {host, port, secret, engine};
    `fallback(inputs)` makes the call through the handle. A call goes on the link with the fewest
    calls out; with no link up (still dialling, or the dial failed) it goes through the handle, so
    no request waits on a dial. A link that drops mid-call has its calls retried once through the
    handle: inference has no side effects, and the handle routes around the lost replica."""

    def __init__(self, name: str, address: Callable[[], Awaitable[dict[str, Any]]],
                 fallback: Callable[[ModelInput], Awaitable[InferenceResult]], links: int, relink_s: float):
        self.name = name
        self._address = address
        self._fallback = fallback
        self._target = links
        self._relink_s = relink_s
        self._links: list[EngineLink] = []
        self._dialling: Optional[asyncio.Task] = None
        self._backoff_s = 0.0
        self._next_dial = 0.0
        self.direct_calls = 0  # for tests: calls answered over a link

    async def call(self, inputs: ModelInput) -> InferenceResult:
        link = self._pick()
        if link is not None:
            try:
                result = await link.call(inputs)
                self.direct_calls += 1
                return replace(result, link="direct")
            except LinkLost as e:
                logger.warning("model %s: link to engine %s lost (%s); retrying through the handle",
                               self.name, link.engine, e)
        return replace(await self._fallback(inputs), link="handle")

    def _pick(self) -> Optional[EngineLink]:
        now = time.monotonic()
        self._links = [link for link in self._links if link.alive]
        fresh = sum(1 for link in self._links if now - link.opened < self._relink_s)
        if fresh < self._target and self._dialling is None and now >= self._next_dial:
            self._dialling = asyncio.get_running_loop().create_task(self._dial())
        return min(self._links, key=lambda link: link.in_flight, default=None)

    async def _dial(self) -> None:
        try:
            a = await self._address()
            link = await EngineLink.open(a["host"], int(a["port"]), bytes.fromhex(a["secret"]), a.get("engine", "?"))
            self._links.append(link)
            # A fresh link replaces the oldest one past its time: that one finishes its calls and closes.
            while len(self._links) > self._target:
                oldest = min(self._links, key=lambda lk: lk.opened)
                self._links.remove(oldest)
                oldest.retire()
            if self._backoff_s:
                logger.info("model %s: direct link to engine %s up again", self.name, link.engine)
            self._backoff_s = 0.0
        except Exception as e:  # noqa: BLE001 - the handle carries the calls meanwhile
            self._backoff_s = min(_MAX_BACKOFF_S, max(0.5, self._backoff_s * 2))
            self._next_dial = time.monotonic() + self._backoff_s
            logger.warning("model %s: no direct link to its engine (%s: %s); calls go through the handle, "
                           "next try in %.1fs", self.name, type(e).__name__, e, self._backoff_s)
        finally:
            self._dialling = None
