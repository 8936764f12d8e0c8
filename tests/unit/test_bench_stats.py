import numpy as np

from bench.generate_servers import parse_ours
from bench.stats import summarize
from app.quantiles import percentile


def test_percentiles_match_numpy():
    rng = np.random.default_rng(1)
    data = rng.lognormal(size=1001)
    s = sorted(data.tolist())
    for q in (0, 1, 50, 95, 99, 100):
        assert abs(percentile(s, q) - np.percentile(data, q)) < 1e-12


def test_summary():
    lat = [0.01, 0.02, 0.03, 0.04]
    s = summarize(lat, ok=4, errors=1, items=8, duration_s=2.0, batch_sizes=[1, 3])
    assert s.requests == 5 and s.throughput_rps == 2.0 and s.items_per_s == 4.0
    assert abs(s.p50_ms - np.percentile(np.array(lat) * 1000, 50)) < 1e-9
    assert s.mean_batch_size == 2.0


def test_peer_names_say_the_running_set_the_stream_interval_and_the_front_end():
    assert parse_ours("ours") == ("ours", None, False, None, False)
    assert parse_ours("ours~0") == ("ours", None, False, 0.0, False)  # 0 is a value (every step), not "the config's"
    assert parse_ours("ours-tp2@64~250+di") == ("ours-tp2", 64, True, 250.0, False)
    assert parse_ours("ours@512~50.inproc") == ("ours", 512, False, 50.0, True)
    assert parse_ours("ours.inproc+di").in_process and parse_ours("ours.inproc+di").direct_ingress
