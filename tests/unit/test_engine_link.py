"""The direct ingress-to-engine link over real local sockets (no Ray): calls are answered as a handle
call would be, errors keep their type, and whenever the link is not there or breaks the call goes
through the fallback (the handle) instead of failing."""

import asyncio

import numpy as np
import pytest

from app.engine_link import EngineLink, EngineLinks, EngineListener, LinkLost
from app.errors import InvalidInput, ModelFailure, Overloaded
from app.requests import InferenceResult, ModelInput


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


class Engine:
    """A model server stand-in: each row answers with its ids' sum; id 666 is a bad input, id 500
    a crash; `gate` holds answers back until set."""

    def __init__(self, limit=100):
        self.gate = asyncio.Event()
        self.gate.set()
        self.seen: list[ModelInput] = []
        self.listener = EngineListener(self.infer, limit)
        self.dials = 0

    async def infer(self, inputs: ModelInput) -> InferenceResult:
        self.seen.append(inputs)
        await self.gate.wait()
        flat = [t for r in inputs.token_ids for t in r]
        if 666 in flat:
            raise InvalidInput("token id 666")
        if 500 in flat:
            raise RuntimeError("crash")
        out = np.array([[float(sum(r))] for r in inputs.token_ids], dtype=np.float32)
        return InferenceResult(outputs=out, batch_size=len(out), queue_wait_ms=0.5, replica="engine-1")

    async def address(self, secret=None) -> dict:
        self.dials += 1
        port = await self.listener.start(host="127.0.0.1")
        return {"host": "127.0.0.1", "port": port, "secret": (secret or self.listener.secret).hex(), "engine": "e1"}


class Handle:
    """The fallback: answers every row with -1, so a test sees which path answered."""

    def __init__(self):
        self.calls = 0

    async def call(self, inputs: ModelInput) -> InferenceResult:
        self.calls += 1
        return InferenceResult(outputs=np.full((len(inputs), 1), -1.0, dtype=np.float32), batch_size=1, queue_wait_ms=0)


def ids(*rows):
    return ModelInput(token_ids=[list(r) for r in rows])


async def until(condition, what: str) -> None:
    """Wait (up to a second) for `condition()` to hold."""
    for _ in range(100):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting: {what}")


async def linked(engine, handle, links=1, relink_s=60.0) -> EngineLinks:
    """Links whose first dial has completed (the first call went through the fallback)."""
    pool = EngineLinks("m", engine.address, handle.call, links=links, relink_s=relink_s)
    await pool.call(ids([1]))
    await until(lambda: pool._links, "no link came up")
    return pool


async def held_at_the_engine(engine, pool, n):
    """`n` calls sent while the engine holds its answers back (`engine.gate.set()` releases them)."""
    engine.gate.clear()
    calls = [asyncio.ensure_future(pool.call(ids([i]))) for i in range(n)]
    await asyncio.sleep(0.1)
    return calls


def test_calls_go_over_the_link_once_it_is_up_and_answer_as_the_engine_does():
    async def scenario():
        engine, handle = Engine(), Handle()
        pool = await linked(engine, handle)
        assert handle.calls == 1  # the first call did not wait for the dial
        r = await pool.call(ModelInput(token_ids=[[1, 2], [10, 20, 30]], requests=2))
        assert r.outputs.tolist() == [[3.0], [60.0]] and r.link == "direct" and r.replica == "engine-1"
        assert engine.seen[-1].requests == 2 and handle.calls == 1 and pool.direct_calls == 1

    run(scenario())


def test_calls_on_one_link_are_pipelined_and_matched_to_their_answers():
    async def scenario():
        engine, handle = Engine(), Handle()
        pool = await linked(engine, handle)
        calls = await held_at_the_engine(engine, pool, 20)
        assert len(engine.seen) == 20  # all out at once, none answered yet
        engine.gate.set()
        results = await asyncio.gather(*calls)
        assert [r.outputs[0, 0] for r in results] == [float(i) for i in range(20)]

    run(scenario())


def test_the_engines_errors_reach_the_caller_with_their_type():
    async def scenario():
        engine, handle = Engine(), Handle()
        pool = await linked(engine, handle)
        with pytest.raises(InvalidInput, match="666"):
            await pool.call(ids([666]))
        with pytest.raises(ModelFailure, match="RuntimeError"):
            await pool.call(ids([500]))
        assert (await pool.call(ids([4]))).outputs.tolist() == [[4.0]]  # the link survives both
        assert handle.calls == 1

    run(scenario())


def test_a_link_with_the_wrong_secret_is_refused_and_the_handle_answers():
    async def scenario():
        engine, handle = Engine(), Handle()
        wrong = bytes(16)
        pool = EngineLinks("m", lambda: engine.address(secret=wrong), handle.call, links=1, relink_s=60)
        for _ in range(10):
            r = await pool.call(ids([3]))
            assert r.link == "handle" and r.outputs.tolist() == [[-1.0]]
            await asyncio.sleep(0.05)
        assert engine.seen == [] and pool.direct_calls == 0
        assert engine.dials <= 2  # a refusal is a failed dial, backed off; not a redial per call

    run(scenario())


def test_a_link_that_drops_mid_call_retries_through_the_handle_and_is_redialled():
    async def scenario():
        engine, handle = Engine(), Handle()
        pool = await linked(engine, handle)
        engine.gate.clear()
        out = asyncio.ensure_future(pool.call(ids([9])))
        await asyncio.sleep(0.05)
        pool._links[0]._writer.transport.abort()  # the engine's process died
        r = await out
        assert r.link == "handle" and handle.calls == 2
        engine.gate.set()
        for _ in range(100):  # the next call dials again; the one after goes direct
            r = await pool.call(ids([2]))
            if r.link == "direct":
                break
            await asyncio.sleep(0.01)
        assert r.link == "direct" and engine.dials == 2

    run(scenario())


def test_an_engine_that_cannot_be_reached_backs_off_and_the_handle_carries_the_calls():
    async def scenario():
        handle = Handle()
        attempts = 0

        async def nowhere():
            nonlocal attempts
            attempts += 1
            return {"host": "127.0.0.1", "port": 1, "secret": bytes(16).hex()}

        pool = EngineLinks("m", nowhere, handle.call, links=2, relink_s=60)
        for _ in range(40):
            assert (await pool.call(ids([1]))).link == "handle"
            await asyncio.sleep(0.01)
        assert handle.calls == 40 and 1 <= attempts <= 2  # backing off, not dialling per call

    run(scenario())


def test_links_are_redialled_after_relink_s_and_the_old_one_finishes_its_calls():
    async def scenario():
        engine, handle = Engine(), Handle()
        pool = await linked(engine, handle, relink_s=0.2)
        first = pool._links[0]
        engine.gate.clear()
        out = asyncio.ensure_future(pool.call(ids([5])))  # in flight on the first link
        await asyncio.sleep(0.3)
        engine.gate.set()
        await pool.call(ids([1]))  # past relink_s: a new dial starts
        await until(lambda: pool._links and pool._links[0] is not first, "no new link")
        assert pool._links[0] is not first and engine.dials == 2
        assert (await out).outputs.tolist() == [[5.0]]  # the retired link answered its call
        await until(lambda: not first.alive, "the retired link stayed open")
        assert not first.alive

    run(scenario())


def test_the_engine_answers_overloaded_past_its_limit():
    async def scenario():
        engine, handle = Engine(limit=2), Handle()
        pool = await linked(engine, handle)
        calls = await held_at_the_engine(engine, pool, 3)
        engine.gate.set()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert [type(r) for r in results].count(Overloaded) == 1

    run(scenario())


def test_the_listener_starts_once_however_many_ask():
    async def scenario():
        engine = Engine()
        ports = await asyncio.gather(*(engine.listener.start(host="127.0.0.1") for _ in range(5)))
        assert len(set(ports)) == 1

    run(scenario())


def test_a_closed_link_refuses_calls():
    async def scenario():
        engine = Engine()
        a = await engine.address()
        link = await EngineLink.open(a["host"], a["port"], bytes.fromhex(a["secret"]), "e1")
        assert (await link.call(ids([7]))).outputs.tolist() == [[7.0]]
        link.retire()
        with pytest.raises(LinkLost):
            await link.call(ids([7]))

    run(scenario())


async def _raw_dial(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


def test_a_hello_larger_than_a_hello_is_refused_before_it_is_read():
    from app import wire

    async def scenario():
        engine = Engine()
        port = await engine.listener.start(host="127.0.0.1")
        reader, writer = await _raw_dial(port)
        writer.write(wire._LEN.pack(wire.MAX_FRAME_BYTES))  # announces 256 MB; sends none of it
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 2) == b""  # closed at once, nothing buffered
        assert engine.listener.links == 0

    run(scenario())


def test_links_past_the_cap_are_closed_and_a_silent_peer_times_out(monkeypatch):
    import app.engine_link as engine_link

    monkeypatch.setattr(engine_link, "_CONNECT_TIMEOUT_S", 0.3)

    async def scenario():
        engine = Engine()
        engine.listener._max_links = 2
        a = await engine.address()
        held = [await EngineLink.open(a["host"], a["port"], bytes.fromhex(a["secret"]), "e1") for _ in range(2)]
        reader, writer = await _raw_dial(a["port"])
        assert await asyncio.wait_for(reader.read(), 2) == b""  # the third is refused
        for link in held:
            link.retire()
        await until(lambda: engine.listener.links == 0, "links not released")
        reader, writer = await _raw_dial(a["port"])  # says nothing: dropped after the hello deadline
        assert await asyncio.wait_for(reader.read(), 2) == b""
        await until(lambda: engine.listener.links == 0, "silent link not released")

    run(scenario())


def test_the_secret_is_compared_in_constant_time():
    import inspect

    from app import wire

    assert wire.check_hello(b"H" + b"k" * wire.SECRET_BYTES, b"k" * wire.SECRET_BYTES)
    assert not wire.check_hello(b"H" + b"x" * wire.SECRET_BYTES, b"k" * wire.SECRET_BYTES)
    assert "compare_digest" in inspect.getsource(wire.check_hello)
