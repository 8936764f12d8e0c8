"""Scale-up time: a load step against one replica, and how long until a new replica serves.

    python -m bench.scaleup --policy default queue_depth [--clients 8 | --rate 60] [--out F.json]

Starts a local Ray + Serve (this machine only), serves the small classifier with autoscaling
(min 1, max 4), warms it at one request in flight, then steps the load up and records, from the
step: the controller's decision (a second replica appears in `serve status`), the new replica
RUNNING, and the first response served by it. The replica's own log gives its start phases
(worker process + imports before `__init__`, and `__init__`). One table row per policy.

Layouts (`--layout`):
  shared    one Ray node; the new replica starts on the same cores that the load, the proxy and
            the serving replica saturate (the pessimistic single-box figure).
  per-node  a head node and two worker nodes with one logical GPU each (replicas take a GPU, so
            each node holds one), every node pinned to its own CPU cores the way separate
            machines would be: the serving replica and the load share the first cores, the new
            replica starts on the second worker's cores (what happens on a real cluster when a
            replica is added on a node with free GPUs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.load import SAMPLE_TEXTS


@dataclass
class Traffic:
    statuses: list[int] = field(default_factory=list)
    served_by: list[tuple[float, str, str]] = field(default_factory=list)  # (t, replica, node)
    wrong: int = 0

    def replicas(self) -> set[str]:
        return {r for _, r, _ in self.served_by}

    def first_new_replica_s(self) -> float:
        """Seconds from t0 to the first answer from a replica other than the first one seen."""
        if not self.served_by:
            return float("nan")
        first = self.served_by[0][1]
        return min((t for t, r, _ in self.served_by if r != first), default=float("nan"))


async def drive(url: str, model: str, traffic: Traffic, t0: float, seconds: float, clients: int = 0,
                rate: float = 0.0, until_replicas: int = 0) -> None:
    """Load for `seconds` (or until `until_replicas` distinct replicas have answered): `clients`
    closed-loop clients, or Poisson arrivals at `rate` per second. Every answer is checked."""
    path = f"/v1/models/{model}:predict"

    def done() -> bool:
        return time.monotonic() - t0 >= seconds or (until_replicas > 0 and len(traffic.replicas()) >= until_replicas)

    async def one(c: httpx.AsyncClient, text: str) -> None:
        r = await c.post(path, json={"instances": [text]})
        traffic.statuses.append(r.status_code)
        if r.status_code == 200:
            if len(r.json()["predictions"]) != 1:
                traffic.wrong += 1
            traffic.served_by.append((time.monotonic() - t0, r.headers["x-replica"], r.headers["x-node"]))

    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        if rate > 0:
            import random

            rng, tasks, i = random.Random(0), [], 0
            next_t = time.monotonic()
            while not done():
                await asyncio.sleep(max(0.0, next_t - time.monotonic()))
                tasks.append(asyncio.create_task(one(c, f"{SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]} {i}")))
                next_t += rng.expovariate(rate)
                i += 1
            await asyncio.gather(*tasks)
            return

        async def client(k: int) -> None:
            i = 0
            while not done():
                await one(c, f"client {k} request {i}")
                i += 1

        await asyncio.gather(*(client(k) for k in range(clients)))


def scaler_spec(policy: str, name: str = "scaler") -> dict[str, Any]:
    """The small model of the autoscaling test: tiny BERT classifier, batches of 2."""
    return {
        "name": name,
        "source": {"kind": "random_init", "architecture": "bert",
                   "config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                              "intermediate_size": 64}},
        "task": "classify", "num_labels": 3, "max_seq_len": 32,
        "batching": {"max_batch_size": 2, "batch_wait_timeout_s": 0.005},
        "deployment": {"num_cpus": 0.1, "torch_threads": 1},
        "autoscaling": {"enabled": True, "min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 1,
                        "upscale_delay_s": 0.5, "downscale_delay_s": 4, "metrics_interval_s": 0.5,
                        "look_back_period_s": 2, "policy": policy, "target_queue_wait_ms": 50},
    }


class StatusWatch:
    """Polls `serve status` on a thread: when a second replica first appears and first RUNNING."""

    def __init__(self, app: str, deployment: str, t0: float, period_s: float = 0.2):
        self.app, self.deployment, self.t0, self.period_s = app, deployment, t0, period_s
        self.decided_s = float("nan")
        self.running_s = float("nan")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "StatusWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        from ray import serve

        while not self._stop.is_set():
            try:
                app = serve.status().applications.get(self.app)
            except Exception:  # noqa: BLE001 - a slow controller under load: poll again
                self._stop.wait(self.period_s)
                continue
            dep = app.deployments.get(self.deployment) if app else None
            if dep is not None:
                states = dep.replica_states
                now = time.monotonic() - self.t0
                if sum(states.values()) >= 2 and self.decided_s != self.decided_s:
                    self.decided_s = now
                if states.get("RUNNING", 0) >= 2 and self.running_s != self.running_s:
                    self.running_s = now
            self._stop.wait(self.period_s)


_READY = re.compile(r"process up ([\d.]+)s at __init__.*ready in ([\d.]+)s")


def replica_start_phases(replica_id: str) -> dict[str, float]:
    """From the replica's Serve log: seconds from its worker process starting to `__init__`
    (worker start, Ray and the deployment's imports), and `__init__` itself."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    for f in logs.glob(f"replica_*{replica_id}*.log"):
        m = _READY.search(f.read_text(errors="replace"))
        if m:
            return {"process_to_init_s": float(m.group(1)), "init_s": float(m.group(2))}
    return {}


@dataclass
class StepResult:
    policy: str
    mode: str
    load: str
    decided_s: float
    new_replica_running_s: float
    first_served_by_new_s: float
    new_replica_phases: dict[str, float]
    requests: int
    statuses: dict[int, int]
    wrong: int


def measure(policy: str, mode: str, port: int, clients: int, rate: float, timeout_s: float,
            before_step: Any = None) -> StepResult:
    from deployments.control import deploy_config, wait_ready

    app = f"scaleup-{policy.replace('_', '-')}"
    spec = scaler_spec(policy)
    if before_step is not None:  # per-node layout: one replica per (logical) GPU, i.e. per worker node
        spec["deployment"]["num_gpus"] = 1
    config = {"applications": [{"name": app, "route_prefix": f"/{app}", "import_path": "deployments.builder:build_app",
                                "args": {"models": [spec], "ingress": {"mode": mode}}}]}
    deploy_config(config)
    url = f"http://127.0.0.1:{port}/{app}"
    wait_ready(url)
    if before_step is not None:
        before_step()
    # Warm: one request in flight, so one replica is serving steadily before the step.
    warm = Traffic()
    asyncio.run(drive(url, "scaler", warm, time.monotonic(), seconds=3, clients=1))
    traffic = Traffic()
    t0 = time.monotonic()
    with StatusWatch(app, "scaler", t0) as watch:
        asyncio.run(drive(url, "scaler", traffic, t0, seconds=timeout_s, clients=clients, rate=rate, until_replicas=2))
    first = traffic.served_by[0][1] if traffic.served_by else ""
    new = next((r for _, r, _ in traffic.served_by if r != first), "")
    counts = dict(Counter(traffic.statuses))
    deploy_config({"applications": []})
    return StepResult(policy, mode, f"{clients} closed-loop clients" if rate <= 0 else f"{rate:g} req/s open loop",
                      watch.decided_s, watch.running_s, traffic.first_new_replica_s(),
                      replica_start_phases(new) if new else {}, len(traffic.statuses), counts, traffic.wrong)


class PinnedCluster:
    """Head + a busy worker node on the first half of the cores (with this driver, the load
    generator), and a fresh worker node added on the other half before each load step. A raylet's
    workers inherit its CPU affinity, so every process of a node stays on that node's cores."""

    def __init__(self) -> None:
        import os

        import ray
        from ray.cluster_utils import Cluster

        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < 2:
            raise SystemExit("--layout per-node needs at least 2 CPU cores")
        half = len(cores) // 2
        self.busy_cores, self.fresh_cores = set(cores[:half]), set(cores[half:])
        os.sched_setaffinity(0, self.busy_cores)  # the driver: load generator and serve.status polling
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": 0,
                                                                       "include_dashboard": False})
        self._pin(self.cluster.head_node, self.busy_cores)
        self._pin(self.cluster.add_node(num_cpus=4, num_gpus=1), self.busy_cores)
        self.fresh = None
        ray.init(address=self.cluster.address, log_to_driver=False)

    @staticmethod
    def _pin(node: Any, cores: set[int]) -> None:
        import os

        import psutil

        for info in node.all_processes.values():
            for p in info:
                root = psutil.Process(p.process.pid)
                for proc in [root, *root.children(recursive=True)]:
                    os.sched_setaffinity(proc.pid, cores)

    def add_fresh_node(self) -> None:
        self.fresh = self.cluster.add_node(num_cpus=4, num_gpus=1)
        self._pin(self.fresh, self.fresh_cores)
        self.cluster.wait_for_nodes()

    def remove_fresh_node(self) -> None:
        if self.fresh is not None:
            self.cluster.remove_node(self.fresh)
            self.fresh = None

    def shutdown(self) -> None:
        self.cluster.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", nargs="+", default=["default", "queue_depth"], choices=["default", "queue_depth"])
    p.add_argument("--mode", nargs="+", default=["routed"], choices=["routed", "fused"],
                   help="routed: ingress + model deployments; fused: the model replica is the ingress")
    p.add_argument("--layout", choices=["shared", "per-node"], default="shared")
    p.add_argument("--clients", type=int, default=8, help="closed-loop clients after the step")
    p.add_argument("--rate", type=float, default=0.0, help="open-loop requests/s after the step (instead of clients)")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--out", type=Path)
    ns = p.parse_args(argv)

    import ray
    from ray import serve

    cluster = PinnedCluster() if ns.layout == "per-node" else None
    if cluster is None:
        ray.init(num_cpus=8, log_to_driver=False, include_dashboard=False)
    port = 8123
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    rows = []
    try:
        for mode in ns.mode:
            for policy in ns.policy:
                r = measure(policy, mode, port, ns.clients, ns.rate, ns.timeout,
                            before_step=cluster.add_fresh_node if cluster else None)
                if cluster:
                    r.load += ", new replica on its own node"
                    cluster.remove_fresh_node()
                rows.append(r)
                print(json.dumps(asdict(r)), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
        if cluster:
            cluster.shutdown()
    print(f"\n{'mode':<7} {'policy':<12} {'load':<26} {'decided s':>9} {'running s':>9} {'served s':>9} "
          f"{'proc->init s':>12} {'init s':>7} {'requests':>8} {'non-200':>7}")
    for r in rows:
        ph = r.new_replica_phases
        bad = sum(n for s, n in r.statuses.items() if s != 200) + r.wrong
        print(f"{r.mode:<7} {r.policy:<12} {r.load:<26} {r.decided_s:>9.1f} {r.new_replica_running_s:>9.1f} "
              f"{r.first_served_by_new_s:>9.1f} {ph.get('process_to_init_s', float('nan')):>12.1f} "
              f"{ph.get('init_s', float('nan')):>7.1f} {r.requests:>8} {bad:>7}")
    if ns.out:
        ns.out.parent.mkdir(parents=True, exist_ok=True)
        ns.out.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
