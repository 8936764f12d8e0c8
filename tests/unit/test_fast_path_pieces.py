"""Pure pieces of the fast path: CUDA-graph bucket choice, the `hey` report parser, the benchmarks' lever
variants and profile reading, and the serving-path knobs' validation."""

import argparse

import pytest

from bench.hey import parse_report
from app.config import ConfigError, parse_app_args
from app.runners.cuda_graphs import GraphedForward, default_batch_buckets, default_seq_buckets


def test_default_buckets():
    assert default_batch_buckets(128) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128]
    assert default_batch_buckets(48) == [1, 2, 4, 8, 16, 24, 32, 40, 48]
    assert default_batch_buckets(256)[-5:] == [128, 160, 192, 224, 256]
    assert default_batch_buckets(5) == [1, 2, 4, 5]
    assert default_batch_buckets(1) == [1]
    assert default_seq_buckets(128) == [32, 64, 96, 128]
    assert default_seq_buckets(100) == [32, 64, 96, 100]


def test_bucket_pads_up_and_refuses_oversize():
    g = GraphedForward(lambda i, m: i, device=None, batch_buckets=[1, 2, 4, 8], seq_buckets=[32, 64])
    assert g.bucket(1, 1) == (1, 32)
    assert g.bucket(3, 33) == (4, 64)
    assert g.bucket(8, 64) == (8, 64)
    assert g.bucket(9, 10) is None
    assert g.bucket(2, 65) is None


HEY_OUTPUT = """
Summary:
  Total:\t8.0031 secs
  Slowest:\t0.2011 secs
  Fastest:\t0.0008 secs
  Average:\t0.0251 secs
  Requests/sec:\t5094.2

Latency distribution:
  10% in 0.0101 secs
  50% in 0.0212 secs
  90% in 0.0391 secs
  99% in 0.0480 secs

Status code distribution:
  [200]\t40000 responses
  [503]\t700 responses

Error distribution:
  [70]\tPost "http://127.0.0.1:8000/v2": context deadline exceeded
"""


def test_hey_report_parse():
    r = parse_report(HEY_OUTPUT)
    assert r.ok == 40000 and r.statuses == {200: 40000, 503: 700}
    assert r.requests == 40770
    assert r.seconds == pytest.approx(8.0031)
    assert r.ok_per_s == pytest.approx(40000 / 8.0031)
    assert (r.p50_ms, r.p90_ms, r.p99_ms) == pytest.approx((21.2, 39.1, 48.0))
    assert len(r.errors) == 1
    with pytest.raises(ValueError):
        parse_report("connection refused")


def _model(**extra):
    return {"name": "m", "source": {"kind": "packaged"}, "task": "embed", **extra}


def test_fused_mode_takes_exactly_one_model():
    assert parse_app_args({"models": [_model()], "ingress": {"mode": "fused"}}).ingress.mode == "fused"
    with pytest.raises(ConfigError, match="fused.*exactly one model"):
        parse_app_args({"models": [_model(), _model(name="n")], "ingress": {"mode": "fused"}})
    with pytest.raises(ConfigError, match="ingress.mode"):
        parse_app_args({"models": [_model()], "ingress": {"mode": "fast"}})


def test_acceleration_buckets_validated():
    args = parse_app_args({"models": [_model(acceleration={"cuda_graphs": True, "batch_buckets": [8, 1, 8]})]})
    assert args.models[0].acceleration.batch_buckets == [1, 8]
    with pytest.raises(ConfigError, match="acceleration.seq_buckets"):
        parse_app_args({"models": [_model(acceleration={"seq_buckets": [0]})]})


def test_hey_small_sample_p99_falls_back_to_slowest():
    text = HEY_OUTPUT.replace("  99% in 0.0480 secs", "  0% in 0.0000 secs")
    assert parse_report(text).p99_ms == pytest.approx(201.1)


@pytest.mark.parametrize("argv", [["--cpu"], ["--scaling", "--gpus", "4", "--tokenizer", "t"],
                                  ["--tokenizer", "t", "--skip-raw"], ["--tokenizer", "t", "--levers", "base"]])
def test_every_run_of_the_fast_path_benchmark_starts(argv, monkeypatch, tmp_path):
    """Each mode reaches its own runner (which first looks for `hey`), not a NameError."""
    import bench.fast_path as fast_path
    import bench.hey as hey

    monkeypatch.setattr(hey, "find_hey", lambda: None)
    monkeypatch.setattr(fast_path, "raw_cpu", lambda *a, **k: pytest.fail("the CPU run must look for hey first"))
    with pytest.raises(SystemExit, match="hey not found"):
        fast_path.main([*argv, "--out", str(tmp_path)])


def test_lever_variants_compose_into_one_config():
    import bench.levers as fast_path

    ns = argparse.Namespace(tokenizer="t", max_batch=64, wait=0.002)
    base = fast_path.lever_doc(ns, "base", 8)["applications"][0]
    assert base["args"]["ingress"]["fast_routes"] is False and "runtime_env" not in base
    doc = fast_path.lever_doc(ns, "pool0+fast+oneloop+cb2", 8)["applications"][0]
    spec = doc["args"]["models"][0]
    assert spec["batching"]["max_concurrent_batches"] == 2
    assert spec["deployment"]["num_gpus"] == 1 / 8
    assert doc["args"]["ingress"]["fast_routes"] is True
    assert doc["runtime_env"]["env_vars"] == {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
                                              "TOKENIZERS_PARALLELISM": "false"}  # pool0: an env lever
    parse_app_args(doc["args"])  # a valid application config
    with pytest.raises(SystemExit, match="unknown lever"):
        fast_path.lever_doc(ns, "base+turbo", 8)
    # The split: the 8 replicas become CPU ingress replicas gathering for model servers on the GPU.
    doc = fast_path.lever_doc(ns, "fast+inflight1+split+engines2", 8)["applications"][0]
    ingress, spec = doc["args"]["ingress"], doc["args"]["models"][0]
    assert ingress["mode"] == "routed" and ingress["num_replicas"] == 8 and ingress["fast_routes"] is True
    assert ingress["gather"] == {"max_items": 64, "max_calls_in_flight": 1}
    assert spec["deployment"]["num_replicas"] == 2 and spec["deployment"]["num_gpus"] == 0.5
    parse_app_args(doc["args"])
    with pytest.raises(SystemExit, match="go with split"):
        fast_path.lever_doc(ns, "fast+inflight1", 8)
    assert fast_path.lever_doc(ns, "pow2", 8)["applications"][0]["args"]["models"][0]["acceleration"][
        "batch_buckets"] == [1, 2, 4, 8, 16, 32, 64, 128]
    direct = fast_path.lever_doc(ns, "direct+split+inflight1", 8)["applications"][0]["args"]
    assert direct["ingress"]["gather"] == {"max_items": 64, "max_calls_in_flight": 1, "transport": "direct"}
    parse_app_args(direct)
    tuned = fast_path.lever_doc(ns, "layers+rusttok", 8)["applications"][0]["args"]
    assert tuned["models"][0]["acceleration"]["compile_layers"] is True
    assert tuned["models"][0]["deployment"]["tokenizer_word_cache"] == 0
    parse_app_args(tuned)
    plain = fast_path.lever_doc(ns, "split+nogather", 8)["applications"][0]["args"]
    assert plain["ingress"]["mode"] == "routed" and plain["ingress"]["gather"] is None
    parse_app_args(plain)


def test_py_spy_profile_gives_gil_time_and_thread_names(tmp_path):
    from bench.replica_cpu import label_threads, read_profile

    raw = tmp_path / "p.txt"
    raw.write_text("thread (11): AsyncIO Thread: default;run (a.py:1);f (b.py:2) 30\n"
                   "thread (12): ThreadPoolExecutor-1_0;_worker (thread.py:83) 10\n"
                   "thread (11): AsyncIO Thread: default;g (b.py:9) 10\n\n")
    held_ms, names = read_profile(raw, rate_hz=100)
    assert held_ms == 500.0  # 50 samples at 100 Hz
    assert names == {11: "AsyncIO Thread: default", 12: "ThreadPoolExecutor-1_0"}
    per_thread = label_threads({"ray::IDLE/11": 300.0, "ray::IDLE/12": 100.0, "worker.io/13": 5.0}, names)
    assert per_thread == {"AsyncIO Thread: default": 300.0, "ThreadPoolExecutor-1_0": 100.0, "worker.io/13": 5.0}


def test_serving_path_knobs_validated():
    args = parse_app_args({"models": [_model()], "ingress": {"fast_routes": False}})
    assert args.ingress.fast_routes is False
    assert parse_app_args({"models": [_model()]}).ingress.fast_routes is True
    # Process-level levers are environment variables of the replica, not config fields.
    for lever in ("gil_switch_interval_ms", "tokenizer_threads"):
        with pytest.raises(ConfigError, match=f"{lever}: unknown field"):
            parse_app_args({"models": [_model(deployment={lever: 1})]})


def test_the_gil_switch_interval_comes_from_the_replica_environment():
    import sys

    from app.config import ModelSpec
    from app.engine.startup import GIL_SWITCH_ENV, tune_process

    spec = ModelSpec.model_validate(_model(deployment={"torch_threads": 1}))
    before = sys.getswitchinterval()
    try:
        assert tune_process(spec, {GIL_SWITCH_ENV: "0.5"}) == 1
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        tune_process(spec, {})  # unset: left as it is
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        for bad in ("0", "fast", "1000"):
            with pytest.raises(ValueError, match=GIL_SWITCH_ENV):
                tune_process(spec, {GIL_SWITCH_ENV: bad})
    finally:
        sys.setswitchinterval(before)