"""The engine in its own process (app/engine/engine_process.py), without Ray: the same tokens as the
engine in this process, errors that keep their type across the pipe, cancellation that frees the
child's sequences, and a child that dies ending every stream with 503 and failing the health check."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from app.config import ModelSpec
from app.engine.engine_process import OMP_PASSIVE_ENV, EngineProcess, build_engine, child_environment
from app.engine.generation import SamplingParams
from app.errors import PayloadTooLarge, ReplicaUnavailable
from app.models.chat import GenerationText
from app.models.loader import build_config
from tests.helpers import ROOT
from tests.unit.test_generation_engine import collect

SPEC = ModelSpec.model_validate(
    yaml.safe_load((ROOT / "serve_config.generate.yaml").read_text())["applications"][0]["args"]["models"][0])


def engine_args(text: GenerationText) -> dict:
    return dict(eos_token_ids=text.eos_token_ids(build_config(SPEC, len(text))), max_running=8, max_sequences=16,
                max_step_tokens=256, page_size=32, max_context_tokens=SPEC.max_seq_len)


@pytest.fixture(scope="module")
def text():
    return GenerationText(SPEC)


@pytest.fixture(scope="module")
def proc(text):
    engine = EngineProcess(SPEC, len(text), engine_args(text))
    yield engine
    engine.shutdown()


def prompts(n: int) -> list[list[int]]:
    return [[1000 + (7 * i + j) % 900 for j in range(3 + 11 * i % 60)] for i in range(n)]


async def run_all(engine, ps, params):
    return await asyncio.gather(*(collect(engine, p, params[i], 0.01 * i) for i, p in enumerate(ps)))


def test_the_child_gives_the_tokens_of_the_engine_in_this_process(proc, text):
    ps = prompts(12)
    params = [SamplingParams(max_new_tokens=6 + i) if i % 2 else
              SamplingParams(max_new_tokens=6 + i, temperature=0.9, top_p=0.9, seed=i) for i in range(12)]
    local = build_engine(SPEC, len(text), engine_args(text))
    try:
        expected = asyncio.run(run_all(local, ps, params))
    finally:
        local.shutdown()
    assert asyncio.run(run_all(proc, ps, params)) == expected
    assert proc.describe()["kv_cache_tokens"] == local.budget.tokens == proc.budget.tokens


def test_errors_keep_their_type_and_cancelled_streams_leave_the_child_empty(proc):
    async def too_long():
        async for _ in proc.stream([5] * 10, SamplingParams(max_new_tokens=10_000)):
            pass

    with pytest.raises(PayloadTooLarge, match="context"):
        asyncio.run(too_long())

    async def read_two_then_leave(p):
        n = 0
        async for ev in proc.stream(p, SamplingParams(max_new_tokens=150)):
            n += len(ev.tokens)
            if n >= 2:
                return n

    async def many():
        return await asyncio.gather(*(read_two_then_leave(p) for p in prompts(10)))

    assert all(n >= 2 for n in asyncio.run(many()))
    assert proc.stats().held == 0
    deadline = time.monotonic() + 10
    while (proc.stats().running or proc.stats().kv_used_fraction > 0) and time.monotonic() < deadline:
        time.sleep(0.1)
    s = proc.stats()
    assert s.running == 0 and s.kv_used_fraction == 0.0, s
    proc.check_health()


def test_a_child_that_dies_ends_its_streams_with_503_and_fails_the_health_check(text):
    engine = EngineProcess(SPEC, len(text), engine_args(text))
    pid = engine.describe()["engine_process"]

    async def long_stream():
        async for ev in engine.stream([7] * 20, SamplingParams(max_new_tokens=150)):
            if ev.tokens:
                os.kill(pid, signal.SIGKILL)

    try:
        t0 = time.monotonic()
        with pytest.raises(ReplicaUnavailable, match="exited"):
            asyncio.run(long_stream())
        assert time.monotonic() - t0 < 10
        with pytest.raises(RuntimeError, match="exited"):
            engine.check_health()
        with pytest.raises(ReplicaUnavailable):
            asyncio.run(long_stream())
    finally:
        engine.shutdown()


def test_cpu_engines_ask_openmp_threads_to_sleep_unless_the_operator_said_otherwise():
    assert child_environment(on_cpu=True, environ={}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert child_environment(on_cpu=False, environ={}) == {}
    assert child_environment(on_cpu=True, environ={"OMP_WAIT_POLICY": "ACTIVE"}) == {}
    assert child_environment(on_cpu=True, environ={"GOMP_SPINCOUNT": "10000"}) == {}
    assert child_environment(on_cpu=True, environ={OMP_PASSIVE_ENV: "0"}) == {}


def test_the_child_sets_its_environment_before_torch_loads():
    # libgomp reads OMP_WAIT_POLICY once, when torch loads it: the spawned child imports the module
    # of its entry point (and the config of its arguments) before it can set anything.
    probe = "import sys, app.engine.engine_process, app.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
