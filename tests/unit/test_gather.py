"""The ingress gatherer: requests that arrive while a call is out leave together, each gets its own
rows back, and a merged call that fails for one request's sake is retried one request per call."""

import asyncio

import numpy as np
import pytest

from app.errors import InvalidInput, Overloaded, ServingError
from app.gather import RequestGatherer
from app.requests import InferenceResult, ModelInput


def encode(inputs):
    # A stand-in tokeniser: a text becomes [len(text)]; token ids pass through.
    rows = []
    for x in inputs:
        rows.extend([[len(t)] for t in x.texts] if x.texts is not None else x.token_ids)
    return rows


class Server:
    """Answers each row with its first id; bad ids raise as the model server would (400)."""

    def __init__(self, bad_id=None, overloaded=False):
        self.calls: list[ModelInput] = []
        self.gate = asyncio.Event()
        self.bad_id, self.overloaded = bad_id, overloaded

    async def call(self, inputs: ModelInput) -> InferenceResult:
        self.calls.append(inputs)
        await self.gate.wait()
        if self.overloaded:
            raise Overloaded("full")
        if any(r[0] == self.bad_id for r in inputs.token_ids):
            raise InvalidInput(f"id {self.bad_id}")
        out = np.array([[float(r[0])] for r in inputs.token_ids], dtype=np.float32)
        return InferenceResult(outputs=out, batch_size=len(out), queue_wait_ms=1.0, batch_ms=2.0, replica="r")


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


def run(coro):
    return asyncio.run(coro)


def test_a_request_at_light_load_leaves_at_once_alone():
    async def scenario():
        server = Server()
        server.gate.set()
        g = RequestGatherer(server.call, encode, max_items=64, slots=1)
        r = await g.infer(ModelInput(texts=["abc"]))
        return server, g, r

    server, g, r = run(scenario())
    assert g.calls == 1 and server.calls[0].token_ids == [[3]] and server.calls[0].requests == 1
    assert r.outputs.tolist() == [[3.0]] and r.batch_size == 1


def behind_a_call_in_flight(server: Server, later: list[ModelInput], max_items: int = 64):
    """Send one text 'a' alone, then `later` while its call is out; then let the server answer.
    Returns the calls the server had received before answering, and every request's result
    (exceptions as values), 'a' first."""

    async def scenario():
        g = RequestGatherer(server.call, encode, max_items=max_items, slots=1)
        first = asyncio.create_task(g.infer(ModelInput(texts=["a"])))
        await settle()
        rest = [asyncio.create_task(g.infer(x)) for x in later]
        await settle()
        calls_before_answer = len(server.calls)
        server.gate.set()
        return calls_before_answer, await asyncio.gather(first, *rest, return_exceptions=True)

    return run(scenario())


def test_requests_arriving_while_a_call_is_out_leave_together_and_get_their_own_rows():
    server = Server()
    calls_before_answer, results = behind_a_call_in_flight(server, [
        ModelInput(texts=["bb", "ccc"]), ModelInput(token_ids=[[7], [8], [9]]), ModelInput(texts=["dddd"])])
    assert calls_before_answer == 1  # the others wait for the call in flight
    assert [c.token_ids for c in server.calls] == [[[1]], [[2], [3], [7], [8], [9], [4]]]
    assert [c.requests for c in server.calls] == [1, 3]
    assert [r.outputs[:, 0].tolist() for r in results] == [[1.0], [2.0, 3.0], [7.0, 8.0, 9.0], [4.0]]
    assert results[1].batch_size == 6
    assert [r.gathered for r in results] == [1, 3, 3, 3] and results[1].timing_headers()["X-Gathered"] == "3"
    # Queue wait counts the time spent waiting at the ingress on top of the server's own.
    assert all(r.queue_wait_ms >= 1.0 for r in results)


def test_a_merged_call_is_capped_at_max_items():
    server = Server()
    _, results = behind_a_call_in_flight(server, [ModelInput(texts=["b" * i]) for i in range(2, 7)], max_items=3)
    assert not any(isinstance(r, BaseException) for r in results)
    assert [len(c.token_ids) for c in server.calls] == [1, 3, 2]


def test_a_bad_request_fails_alone_and_its_call_mates_are_answered():
    server = Server(bad_id=99)
    _, results = behind_a_call_in_flight(server, [
        ModelInput(texts=["bb"]), ModelInput(token_ids=[[99]]), ModelInput(texts=["ccc"])])
    assert isinstance(results[2], InvalidInput)
    assert [r.outputs[0, 0] for i, r in enumerate(results) if i != 2] == [1.0, 2.0, 3.0]
    # The merged call of three failed, then each of the three went alone.
    assert [len(c.token_ids) for c in server.calls] == [1, 3, 1, 1, 1]


def test_an_overloaded_server_fails_every_merged_request_without_retries():
    server = Server(overloaded=True)
    _, results = behind_a_call_in_flight(server, [ModelInput(texts=["bb"]) for _ in range(3)])
    assert all(isinstance(r, Overloaded) for r in results)
    assert len(server.calls) == 2


def test_rows_that_do_not_match_the_items_fail_as_a_model_failure():
    async def short(inputs):
        return InferenceResult(outputs=np.zeros((1, 1), np.float32), batch_size=1, queue_wait_ms=0.0)

    async def scenario():
        g = RequestGatherer(short, encode, max_items=64, slots=1)
        return await g.infer(ModelInput(texts=["a", "b"]))

    with pytest.raises(ServingError, match="returned 1 rows for 2 items"):
        run(scenario())
