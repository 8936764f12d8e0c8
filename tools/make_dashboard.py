"""Writes cluster/grafana-dashboard.json: every panel's PromQL in one readable place.

    python3 tools/make_dashboard.py

A test (tests/integration/test_metrics.py) checks that every metric the dashboard names is one the
service really exports.
"""

import json
from pathlib import Path

DS = {"type": "prometheus", "uid": "${datasource}"}
MODEL = 'model=~"$model"'


def sel(metric: str, *extra: str) -> str:
    return metric + "{" + ",".join((MODEL,) + extra) + "}"


def timeseries(title, targets, unit, x, y, w=12, h=8):
    return {"type": "timeseries", "title": title, "datasource": DS, "gridPos": {"x": x, "y": y, "w": w, "h": h},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"refId": chr(65 + i), "expr": e, "legendFormat": legend} for i, (e, legend) in enumerate(targets)]}


def stat(title, expr, unit, x, y, w=6, h=4):
    return {"type": "stat", "title": title, "datasource": DS, "gridPos": {"x": x, "y": y, "w": w, "h": h},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []}, "targets": [{"refId": "A", "expr": expr}]}


def quantile(q, bucket, by="le, model"):
    return f"histogram_quantile({q}, sum by ({by}) (rate({sel(bucket)}[5m])))"


def panels():
    ok = sel("ray_batchserve_requests_total", 'outcome="ok"')
    return [
        stat("QPS (ok)", f"sum(rate({ok}[1m]))", "reqps", 0, 0),
        stat("p99 latency", quantile(0.99, "ray_batchserve_request_latency_ms_bucket", "le"), "ms", 6, 0),
        stat("Cost per 1000 requests", f"avg({sel('ray_batchserve_cost_per_1k_requests_usd')})", "currencyUSD", 12, 0),
        stat("GPU utilisation", f"avg({sel('ray_batchserve_gpu_utilization_percent')})", "percent", 18, 0),
        timeseries("Requests per second by model and outcome",
                   [(f"sum by (model, outcome) (rate({sel('ray_batchserve_requests_total')}[1m]))", "{{model}} {{outcome}}")],
                   "reqps", 0, 4),
        timeseries("Latency percentiles (end to end at the ingress)",
                   [(quantile(q, "ray_batchserve_request_latency_ms_bucket"), "{{model}} p" + str(int(q * 100)))
                    for q in (0.5, 0.95, 0.99)], "ms", 12, 4),
        timeseries("Queue wait p50 / p99 (arrival to batch start)",
                   [(quantile(q, "ray_batchserve_queue_wait_ms_bucket"), "{{model}} p" + str(int(q * 100)))
                    for q in (0.5, 0.99)], "ms", 0, 12),
        timeseries("Batch size distribution (batches per bucket, 5 min)",
                   [(f"sum by (le) (increase({sel('ray_batchserve_batch_size_bucket')}[5m]))", "<= {{le}} items")],
                   "short", 12, 12),
        timeseries("Mean batch size and batch execution time",
                   [(f"sum by (model) (rate({sel('ray_batchserve_items_total')}[1m])) / "
                     f"sum by (model) (rate({sel('ray_batchserve_batch_size_count')}[1m]))", "{{model}} items per batch"),
                    (quantile(0.5, "ray_batchserve_batch_duration_ms_bucket"), "{{model}} batch ms p50")],
                   "short", 0, 20),
        timeseries("Queue depth (requests waiting for a batch)",
                   [(f"sum by (model) ({sel('ray_batchserve_queue_depth')})", "{{model}}")], "short", 12, 20),
        timeseries("GPU utilisation (NVML: share of time a kernel ran; target 70-90 %)",
                   [(f"max by (device) ({sel('ray_batchserve_gpu_utilization_percent')})", "GPU {{device}}")],
                   "percent", 0, 28),
        timeseries("GPU memory in use",
                   [(f"max by (device) ({sel('ray_batchserve_gpu_memory_used_bytes')})", "GPU {{device}}")],
                   "bytes", 12, 28),
        timeseries("Cost per 1000 requests",
                   [(f"avg by (model) ({sel('ray_batchserve_cost_per_1k_requests_usd')})", "{{model}} sliding window"),
                    (f"1000 * sum by (model) (rate({sel('ray_batchserve_cost_usd_total')}[5m])) / "
                     f"sum by (model) (rate({ok}[5m]))", "{{model}} 5 min rate")],
                   "currencyUSD", 0, 36),
        timeseries("Serve built-ins: healthy replicas and requests in flight per deployment",
                   [("sum by (deployment) (ray_serve_deployment_replica_healthy)", "{{deployment}} healthy"),
                    ("sum by (deployment) (ray_serve_replica_processing_queries)", "{{deployment}} processing")],
                   "short", 12, 36),
        # Generators (task: generate, continuous batching).
        timeseries("Generation: time to first token and per output token (p50 / p99)",
                   [(quantile(q, f"ray_batchserve_{m}_bucket"), "{{model}} " + label + " p" + str(int(q * 100)))
                    for m, label in (("time_to_first_token_ms", "TTFT"), ("time_per_output_token_ms", "TPOT"))
                    for q in (0.5, 0.99)], "ms", 0, 44),
        timeseries("Generation: tokens per second",
                   [(f"sum by (model) (rate({sel('ray_batchserve_generated_tokens_total')}[1m]))", "{{model}} generated"),
                    (f"sum by (model) (rate({sel('ray_batchserve_prompt_tokens_total')}[1m]))", "{{model}} prompt")],
                   "short", 12, 44),
        timeseries("Generation: running and waiting sequences, KV cache in use",
                   [(f"sum by (model) ({sel('ray_batchserve_running_sequences')})", "{{model}} running"),
                    (f"sum by (model) ({sel('ray_batchserve_waiting_sequences')})", "{{model}} waiting"),
                    (f"100 * avg by (model) ({sel('ray_batchserve_kv_cache_used_fraction')})", "{{model}} KV cache %")],
                   "short", 0, 52),
        timeseries("Generation: cost per 1M generated tokens",
                   [(f"avg by (model) ({sel('ray_batchserve_cost_per_1m_generated_tokens_usd')})", "{{model}} sliding window"),
                    (f"1e6 * sum by (model) (rate({sel('ray_batchserve_cost_usd_total')}[5m])) / "
                     f"sum by (model) (rate({sel('ray_batchserve_generated_tokens_total')}[5m]))", "{{model}} 5 min rate")],
                   "currencyUSD", 12, 52),
        timeseries("Traffic classes: p99 latency and requests per second by class",
                   [(quantile(0.99, "ray_batchserve_request_latency_ms_bucket", "le, model, traffic_class"),
                     "{{model}} {{traffic_class}} p99 ms"),
                    (f"sum by (model, traffic_class, outcome) (rate({sel('ray_batchserve_requests_total')}[1m]))",
                     "{{model}} {{traffic_class}} {{outcome}} req/s")], "short", 0, 60),
        timeseries("Model versions: requests, outcomes and p99 by version (judge a canary here)",
                   [(f"sum by (model, version, outcome) (rate({sel('ray_batchserve_requests_total')}[1m]))",
                     "{{model}} v{{version}} {{outcome}} req/s"),
                    (quantile(0.99, "ray_batchserve_request_latency_ms_bucket", "le, model, version"),
                     "{{model}} v{{version}} p99 ms")], "short", 12, 60),
    ]


def dashboard():
    ps = panels()
    for i, p in enumerate(ps):
        p["id"] = i + 1
    return {
        "title": "batchserve: Ray Serve inference",
        "uid": "batchserve",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "tags": ["ray", "serve", "inference"],
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "current": {}},
            {"name": "model", "type": "query", "datasource": DS,
             "query": "label_values(ray_batchserve_requests_total, model)", "refresh": 2,
             "includeAll": True, "multi": True, "allValue": ".*", "current": {"text": "All", "value": "$__all"}},
        ]},
        "panels": ps,
    }


if __name__ == "__main__":
    out = Path(__file__).resolve().parent.parent / "cluster" / "grafana-dashboard.json"
    out.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {out}")
