"""Pure parts of the metrics: outcomes, device prices, the cost window."""

from app.config import CostConfig, ModelSpec
from app.metrics import CostWindow, outcome_of, replica_hourly_cost_usd
from app.planner import plan_model
from tests.helpers import tiny_bert_spec


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_outcomes():
    assert [outcome_of(s) for s in (200, 400, 404, 413, 429, 503, 408, 504, 499, 500)] == [
        "ok", "client_error", "client_error", "client_error", "shed", "shed", "timeout", "timeout",
        "client_cancel", "server_error"]


def test_cost_window_prices_device_seconds_per_request():
    clock = Clock()
    w = CostWindow(hourly_usd=3.6, window_s=60, clock=clock)  # 0.001 $/s
    assert w.per_1k_requests() is None  # nothing served yet
    clock.t += 10
    for _ in range(5):
        w.served()
    # 10 s held = 0.01 $, over 5 requests -> 0.002 $ each -> 2 $ per 1000
    assert abs(w.per_1k_requests() - 2.0) < 1e-9
    clock.t += 100  # past the window: the old requests leave it
    assert w.per_1k_requests() is None
    w.served(2)
    # a full 60 s window = 0.06 $ over 2 requests
    assert abs(w.per_1k_requests() - 30.0) < 1e-9


def test_replica_price_counts_every_device_it_holds():
    cost = CostConfig(gpu_hour_usd=2.0, cpu_hour_usd=0.1)
    spec = ModelSpec.model_validate(tiny_bert_spec(deployment={"num_cpus": 1, "num_gpus": 0.5}))
    assert abs(replica_hourly_cost_usd(spec, plan_model(spec), cost) - (0.5 * 2.0 + 0.1)) < 1e-9
    tp = ModelSpec.model_validate(tiny_bert_spec(
        deployment={"num_cpus": 0.5}, parallel={"strategy": "deepspeed_tp", "tp": 2, "rank_num_cpus": 1,
                                                 "devices": {"kind": "gpu", "per_node": 2}}))
    assert abs(replica_hourly_cost_usd(tp, plan_model(tp), cost) - (2 * 2.0 + 2.5 * 0.1)) < 1e-9
