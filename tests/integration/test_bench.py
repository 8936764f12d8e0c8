"""The benchmark tools against a live CPU deployment: a short sweep and a 5-trial tune."""

from __future__ import annotations

import pytest

from bench.retune import current_batching
from bench.sweep import run_sweep, write_outputs
from bench.tune import override_yaml, run_tune
from tests.helpers import serve_config

pytestmark = pytest.mark.integration

MODEL = "bert-classifier"


def test_short_sweep_retunes_live_and_plots(base_url, tmp_path):
    before = current_batching(base_url, MODEL)
    rows = run_sweep(base_url, serve_config(), "batchserve", MODEL, [1, 8], concurrency=16, duration_s=3,
                     progress=False)
    assert [r.max_batch_size for r in rows] == [1, 8]
    assert all(r.errors == 0 and r.throughput_rps > 0 for r in rows)
    assert rows[0].mean_batch_size == 1.0 and rows[1].mean_batch_size > 1.0
    assert rows[0].p50_ms <= rows[0].p99_ms
    for path in write_outputs(rows, tmp_path, "test"):
        assert path.exists() and path.stat().st_size > 0
    assert current_batching(base_url, MODEL) == before  # restored


def test_five_trial_tune_stores_a_resumable_study(base_url, tmp_path):
    db = tmp_path / "tune.db"
    result = run_tune(base_url, serve_config(), "batchserve", MODEL, p99_ms=5000, trials=5, study_db=db,
                      concurrency=8, duration_s=2, max_batch_size=16, progress=False)
    assert result["trials"] == 5 and db.exists()
    best = result["best"]
    assert best is not None and best["p99_ms"] <= 5000 and best["items_per_s"] > 0
    assert set(best["params"]) == {"max_batch_size", "batch_wait_timeout_s", "max_concurrent_batches"}
    again = run_tune(base_url, serve_config(), "batchserve", MODEL, p99_ms=5000, trials=1, study_db=db,
                     concurrency=8, duration_s=1, max_batch_size=16, progress=False)
    assert again["trials"] == 6  # resumed, not restarted
    text = override_yaml("batchserve", MODEL, best["params"], current_batching(base_url, MODEL))
    assert "user_config" in text and f"name: {MODEL}" in text
