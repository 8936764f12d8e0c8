"""Issue #17's overload protocol against a served config: capacity (closed loop), half load and
10x capacity (open loop), recovery after the storm. The acceptance test
(tests/integration/test_overload.py) runs `measure` against the test cluster; this entry point
runs it against `serve_config.yaml` on the machine it is started on, so the figure can be taken
where the load generator does not have to share the server's two cores.

    RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_ENABLE_DIRECT_INGRESS=1 RAY_SERVE_HAPROXY_BALANCE_ALGORITHM=roundrobin \
        python -m bench.overload \
        [--config serve_config.yaml] [--tokenizer DIR] [--generators 2] [--out DIR]

--tokenizer DIR serves minilm as random weights of the same shape (MiniLM-L6: hidden 384, 6 layers)
with the tokenizer files in DIR, for machines without the packaged model (the GPU box: the weights
do not fit what travels there). The compute per request is the same; the outputs are not.

Prints one table and writes overload.json under --out (default $OUT, else the current directory).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import httpx

from app.quantiles import percentile

ROOT = Path(__file__).resolve().parent.parent
PATH = "/v1/models/minilm:predict"
BODY = json.dumps({"instances": ["The quick brown fox jumps over the lazy dog and keeps running."]})
MINILM_SHAPE = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536}


def quantile_ms(seconds: list[float], q: float) -> float:
    """The q-th percentile (0-100), in milliseconds, by the service's one rule (app/quantiles.py)."""
    return percentile(sorted(seconds), q) * 1e3


def _clients(args_per_process: list[list[str]], outs: list[Path], timeout_s: float) -> list[list]:
    """tests/openloop.py in one process per argument list (their own cores and GILs, as real
    clients would be), each writing to its `outs` file; their result rows merged."""
    procs = [subprocess.Popen([sys.executable, "-m", "tests.openloop", *args, "--out", str(out)], cwd=ROOT)
             for args, out in zip(args_per_process, outs)]
    for p in procs:
        if p.wait(timeout=timeout_s) != 0:
            raise RuntimeError(f"load client exited {p.returncode}")
    return [row for out in outs for row in json.loads(out.read_text())["results"]]


def client_lag_p99_ms(outs: list[Path]) -> float | None:
    """The worst load process's p99 arrival lateness (its own event loop's lag, which its measured
    latencies carry too), from the files `_clients` read; None where the clients did not say."""
    lags = [json.loads(out.read_text()).get("arrival_lateness_p99_ms") for out in outs]
    return max((lag for lag in lags if lag is not None), default=None)


async def closed_loop(url: str, path: str, body: str | bytes, seconds: float, concurrency: int,
                      until: Callable[[], bool] | None = None, retry_after_s: float = 0.0) -> dict[int, int]:
    """The statuses (counted) that `concurrency` clients got posting `body` (JSON) to `path` back
    to back for `seconds`, or until `until()` holds (a blocking check, run off the loop once a
    second). A client answered 503 waits `retry_after_s` before its next request."""
    statuses: dict[int, int] = {}
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=concurrency)) as c:
        async def client():
            while not stop.is_set():
                r = await c.post(path, content=body, headers={"content-type": "application/json"})
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code == 503 and retry_after_s:
                    await asyncio.sleep(retry_after_s)

        crowd = [asyncio.create_task(client()) for _ in range(concurrency)]
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not (until is not None and await asyncio.to_thread(until)):
            await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        stop.set()
        await asyncio.gather(*crowd)
    return statuses


async def closed_loop_rate(url: str, path: str, body: str | bytes, seconds: float, concurrency: int) -> float:
    """Answered-200 requests per second of `concurrency` clients each posting `body` (JSON) to
    `path` back to back for `seconds`: the capacity an open-loop overload is scaled from."""
    return (await closed_loop(url, path, body, seconds, concurrency)).get(200, 0) / seconds


def open_loop(url: str, rate: float, seconds: float, workdir: Path, generators: int = 1,
              timeout_s: float = 30.0, path: str = PATH, body: str = BODY) -> tuple[list[list], float | None]:
    """Open-loop arrivals at `rate`, from `generators` processes of rate/generators each: their
    result rows, and the worst process's p99 lag (client_lag_p99_ms)."""
    args = ["--url", url + path, "--rate", str(rate / generators), "--duration", str(seconds), "--body", body,
            "--timeout", str(timeout_s)]
    outs = [workdir / f"openloop_{rate:.0f}_{i}.json" for i in range(generators)]
    rows = _clients([args] * generators, outs, seconds + timeout_s + 60)
    return rows, client_lag_p99_ms(outs)


def summarize(results: list[list]) -> dict[str, Any]:
    statuses = [s for _, s, *_ in results]
    accepted = [lat for _, s, lat, *_ in results if s == 200]
    rejected = [(s, lat, ra) for _, s, lat, ra, *_ in results if s != 200]
    shed = [lat for s, lat, ra in rejected if s == 503 and ra]
    counts: dict[str, int] = {}
    for s in statuses:
        counts[str(s)] = counts.get(str(s), 0) + 1
    # Accepted latency by second of arrival: a tail spread over the whole storm is the steady
    # state's; one at its start is a transient (a replica scaling out, queues filling).
    by_second: dict[int, list[float]] = {}
    for t, s, lat, *_ in results:
        if s == 200:
            by_second.setdefault(int(t), []).append(lat)
    timeline = [[sec, len(v), round(quantile_ms(v, 50)), round(quantile_ms(v, 99))]
                for sec, v in sorted(by_second.items())]
    # Where an accepted request's time went: at the model replica (its queue wait, the gather's,
    # and the batch: the timing headers) or before it (HTTP, ingress, the caller's handle queue).
    split = [(lat, server_ms / 1e3) for _, s, lat, _, server_ms, *_ in results if s == 200 and server_ms is not None]
    replica_s = [srv for _, srv in split]
    before_s = [max(0.0, lat - srv) for lat, srv in split]
    return {"requests": len(results), "counts": counts, "accepted": len(accepted), "rejected": len(rejected),
            "accepted_by_second": timeline,
            "replica_p50_ms": quantile_ms(replica_s, 50), "replica_p99_ms": quantile_ms(replica_s, 99),
            "before_replica_p50_ms": quantile_ms(before_s, 50), "before_replica_p99_ms": quantile_ms(before_s, 99),
            "shed_503_retry_after": len(shed),
            "accepted_p50_ms": quantile_ms(accepted, 50), "accepted_p99_ms": quantile_ms(accepted, 99),
            "shed_p50_ms": quantile_ms(shed, 50), "shed_p99_ms": quantile_ms(shed, 99),
            **ingress_split(results),
            "other_5xx": sum(1 for s in statuses if isinstance(s, int) and s >= 500 and s != 503),
            "hung": statuses.count(-1), "resets": statuses.count(0), "client_overflow": statuses.count("client_overflow")}


def ingress_split(results: list[list]) -> dict[str, float]:
    """Where the time before the replica went, from the ingress's timing headers (p50 / p99 ms):
    outside the ingress's app (the client, HAProxy, the HTTP server and Serve's wrapper before it),
    the wait for a model slot (slot gate), the hop to the replica and back (the model call less the
    replica's queue and batch), and the ingress's own work (the rest: routing, parsing, encoding).
    503s: outside and inside the ingress."""
    parts: dict[str, list[float]] = {"outside": [], "admission": [], "hop": [], "ingress_own": [],
                                     "shed_outside": [], "shed_ingress": []}
    for _, s, lat, _, server_ms, *rest in results:
        ingress = rest[0] if rest else None
        if not ingress or ingress[0] is None:
            continue
        ingress_s = ingress[0] / 1e3
        if s == 503:
            parts["shed_outside"].append(max(0.0, lat - ingress_s))
            parts["shed_ingress"].append(ingress_s)
        elif s == 200 and server_ms is not None and None not in ingress:
            admission_s, call_s = ingress[1] / 1e3, ingress[2] / 1e3
            parts["outside"].append(max(0.0, lat - ingress_s))
            parts["admission"].append(admission_s)
            parts["hop"].append(max(0.0, call_s - server_ms / 1e3))
            parts["ingress_own"].append(max(0.0, ingress_s - call_s - admission_s))
    return {f"{name}_p{q}_ms": quantile_ms(v, q) for name, v in parts.items() if v for q in (50, 99)}


def recovery_s(url: str, fast_s: float, timeout_s: float = 30.0, path: str = PATH, body: str = BODY) -> float:
    """Seconds from now until a good request is answered 200 within `fast_s`."""
    t_stop = time.perf_counter()
    while time.perf_counter() - t_stop < timeout_s:
        t0 = time.perf_counter()
        try:
            ok = httpx.post(url + path, content=body, headers={"content-type": "application/json"},
                            timeout=5).status_code == 200
        except httpx.HTTPError:
            ok = False
        if ok and time.perf_counter() - t0 < fast_s:
            return time.perf_counter() - t_stop
        time.sleep(0.2)
    return float("inf")


def http_floor(url: str, workdir: Path, generators: int = 1, seconds: float = 4.0,
               connections: int = 64) -> float:
    """Requests per second the HTTP layer answers for a route that does no model work
    (`GET /v2/health/live`, raw-socket clients): the most any load can be answered at, shed or
    not, on this machine with these clients."""
    args = ["--url", url + "/v2/health/live", "--closed", str(connections // generators), "--duration", str(seconds)]
    outs = [workdir / f"floor_{i}.json" for i in range(generators)]
    rows = _clients([args] * generators, outs, seconds + 60)
    return sum(1 for row in rows if row[1] == 200) / seconds


def capacity_rps(url: str, clients: int = 16) -> float:
    asyncio.run(closed_loop_rate(url, PATH, BODY, 2.0, clients))  # warm
    return asyncio.run(closed_loop_rate(url, PATH, BODY, 6.0, clients))


def measure(url: str, workdir: Path, capacity: float, generators: int = 1, multiple: float = 10.0) -> dict[str, Any]:
    """The protocol after the capacity: half load for 10 s, `multiple` x capacity for 20 s, recovery."""
    half_rows, half_lag = open_loop(url, capacity / 2, 10.0, workdir, generators)
    ten_rows, ten_lag = open_loop(url, multiple * capacity, 20.0, workdir, generators)
    half, ten = summarize(half_rows), summarize(ten_rows)
    half["client_lag_p99_ms"], ten["client_lag_p99_ms"] = half_lag, ten_lag
    fast_s = max(1.0, 3 * half["accepted_p99_ms"] / 1e3)
    return {"capacity_rps": capacity, "multiple": multiple, "offered_10x_rps": multiple * capacity, "half": half,
            "ten": ten, "recovered_s": recovery_s(url, fast_s)}


def without_packaged_model(config: dict[str, Any], tokenizer: str) -> dict[str, Any]:
    """minilm as random weights of its shape, and every model's tokenizer read from `tokenizer`
    (random_init sources default to the packaged model's tokenizer)."""
    for app in config["applications"]:
        for model in app["args"]["models"]:
            if model["name"] == "minilm":
                model["source"] = {"kind": "random_init", "architecture": "bert", "seed": 0, "config": MINILM_SHAPE}
            if model["source"]["kind"] == "random_init":
                model["source"]["tokenizer_path"] = tokenizer
    return config


def print_table(r: dict[str, Any]) -> None:
    h, t = r["half"], r["ten"]
    print(f"\ningress replicas {r['ingress_replicas']}, max_queue_wait_ms {r['max_queue_wait_ms']}, "
          f"model max_ongoing {r['max_ongoing']}, max_queued {r['max_queued']}, backend {r['backend']}, "
          f"slot gate {r.get('slot_gate') or 'as configured'}, {r['multiple']:g}x"
          + (f", env {' '.join(r['env'])}" if r.get("env") else ""))
    print(f"HTTP floor (no model work): {r['http_floor_rps']:.0f} req/s; capacity {r['capacity_rps']:.1f} req/s; "
          f"{r['multiple']:g}x offered {r['offered_10x_rps']:.0f} req/s with {r['generators']} generator process(es)")
    print("| load | requests | accepted | p50 / p99 accepted ms | 503+Retry-After | 503 p99 ms | other |")
    print("|---|---|---|---|---|---|---|")
    for name, s in (("half", h), (f"{r['multiple']:g}x", t)):
        other = {k: v for k, v in s["counts"].items() if k not in ("200", "503")}
        print(f"| {name} | {s['requests']} | {s['accepted']} | {s['accepted_p50_ms']:.0f} / {s['accepted_p99_ms']:.0f} "
              f"| {s['shed_503_retry_after']} | {s['shed_p99_ms']:.0f} | {other or '-'} |")
    print(f"{r['multiple']:g}x accepted by second of arrival (s: n, p50 / p99 ms): "
          + ", ".join(f"{sec}: {n}, {p50} / {p99}" for sec, n, p50, p99 in t.get("accepted_by_second", [])))
    for name, s in (("half", h), (f"{r['multiple']:g}x", t)):
        if "replica_p99_ms" in s:
            print(f"{name}: at the model replica (queue + batch) p50 / p99 {s['replica_p50_ms']:.0f} / {s['replica_p99_ms']:.0f} ms; "
                  f"before it (HTTP, ingress, handle queue) {s['before_replica_p50_ms']:.0f} / {s['before_replica_p99_ms']:.0f} ms")
        if "outside_p99_ms" in s:
            print(f"{name}: of that, p50 / p99 ms: outside the ingress {s['outside_p50_ms']:.0f} / {s['outside_p99_ms']:.0f}, "
                  f"waiting for a slot {s['admission_p50_ms']:.0f} / {s['admission_p99_ms']:.0f}, "
                  f"hop to the replica and back {s['hop_p50_ms']:.0f} / {s['hop_p99_ms']:.0f}, "
                  f"the ingress's own work {s['ingress_own_p50_ms']:.0f} / {s['ingress_own_p99_ms']:.0f}")
        if s.get("client_lag_p99_ms") is not None:
            print(f"{name}: the load processes' own lag (arrival lateness), worst p99 {s['client_lag_p99_ms']:.1f} ms")
        if "shed_outside_p99_ms" in s:
            print(f"{name}: 503s, p50 / p99 ms: outside the ingress {s['shed_outside_p50_ms']:.0f} / "
                  f"{s['shed_outside_p99_ms']:.0f}, in it {s['shed_ingress_p50_ms']:.0f} / {s['shed_ingress_p99_ms']:.0f}")
    ratio = t["accepted_p99_ms"] / h["accepted_p99_ms"] if h["accepted_p99_ms"] else float("nan")
    print(f"accepted p99 at {r['multiple']:g}x / at half load: {ratio:.2f}; recovered in {r['recovered_s']:.2f} s; "
          f"ingress replaced: {r['ingress_replaced']}")


def main(argv: list[str] | None = None) -> int:
    import yaml
    from ray import serve

    import ray
    from deployments.control import deploy_config, wait_ready
    from tests.helpers import processes_titled

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "serve_config.yaml"))
    p.add_argument("--tokenizer", help="serve minilm as random weights of its shape, with this tokenizer")
    p.add_argument("--generators", type=int, default=1, help="open-loop client processes")
    p.add_argument("--ingress-replicas", type=int, help="experiment: args.ingress.num_replicas")
    p.add_argument("--max-queue-wait-ms", type=float, help="experiment: every model's limits.max_queue_wait_ms")
    p.add_argument("--multiple", type=float, default=10.0, help="the overload, in multiples of the capacity")
    p.add_argument("--max-ongoing", type=int, help="experiment: every model's deployment.max_ongoing_requests")
    p.add_argument("--max-queued", type=int, help="experiment: every model's autoscaling.max_queued_requests")
    p.add_argument("--backend", help="experiment: every encoder's backend (torch, onnxruntime, openvino, auto)")
    p.add_argument("--slot-gate", choices=["on", "off"],
                   help="experiment: ingress.admit_by_replica_slots (default: the config's, on unless it says)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="experiment: an env var of the application's runtime_env, read by every replica "
                        "(Serve's RAY_SERVE_* constants; the router's backoff is set by the builder's "
                        "request_router_config, which this does not override); repeatable")
    p.add_argument("--haproxy-balance", help="experiment: HAProxy's balance algorithm over the ingress replicas "
                                             "(RAY_SERVE_HAPROXY_BALANCE_ALGORITHM, Serve's default leastconn)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    a = p.parse_args(argv)
    if a.haproxy_balance:  # read where Serve starts HAProxy, in the cluster this process starts
        os.environ["RAY_SERVE_HAPROXY_BALANCE_ALGORITHM"] = a.haproxy_balance

    config = yaml.safe_load(Path(a.config).read_text())
    if a.tokenizer:
        config = without_packaged_model(config, a.tokenizer)
    args = config["applications"][0]["args"]
    env_vars = config["applications"][0].setdefault("runtime_env", {}).setdefault("env_vars", {})
    for kv in a.env:
        key, sep, value = kv.partition("=")
        if not sep:
            raise SystemExit(f"--env {kv!r}: expected KEY=VALUE")
        env_vars[key] = value
    if a.ingress_replicas:
        args.setdefault("ingress", {})["num_replicas"] = a.ingress_replicas
    if a.slot_gate:
        args.setdefault("ingress", {})["admit_by_replica_slots"] = a.slot_gate == "on"
    if a.max_queue_wait_ms:
        for model in args["models"]:
            model.setdefault("limits", {})["max_queue_wait_ms"] = a.max_queue_wait_ms
    for model in args["models"]:
        if a.max_ongoing:
            model.setdefault("deployment", {})["max_ongoing_requests"] = a.max_ongoing
        if a.max_queued is not None:
            model.setdefault("autoscaling", {})["max_queued_requests"] = a.max_queued
        if a.backend:
            model["backend"] = a.backend
    http = config.get("http_options", {})
    port = int(http.get("port", 8000))
    url = f"http://127.0.0.1:{port}"
    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port,
                                                         **{k: v for k, v in http.items() if k not in ("host", "port")}})
    t0 = time.perf_counter()
    deploy_config(config)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:  # wait_ready, but a failed build stops the run at once
        app = serve.status().applications.get(config["applications"][0]["name"])
        if app is not None and app.status == "DEPLOY_FAILED":
            raise SystemExit(f"the application did not build: {app.message}")
        try:
            wait_ready(url, timeout_s=5)
            break
        except Exception:  # noqa: BLE001 - not ready yet
            pass
    print(f"ready in {time.perf_counter() - t0:.0f} s", flush=True)
    time.sleep(3)  # every ingress replica listening behind HAProxy before the floor is taken
    ingress_before = processes_titled("ServeReplica:batchserve:Ingress")
    with tempfile.TemporaryDirectory() as tmp:
        result = {"generators": a.generators, "cpus": os.cpu_count(), "ingress_replicas": a.ingress_replicas or 1,
                  "max_queue_wait_ms": a.max_queue_wait_ms, "max_ongoing": a.max_ongoing, "max_queued": a.max_queued,
                  "backend": a.backend, "env": a.env, "slot_gate": a.slot_gate, "haproxy_balance": a.haproxy_balance,
                  "http_floor_rps": http_floor(url, Path(tmp), a.generators)}
        result.update(measure(url, Path(tmp), capacity_rps(url), a.generators, a.multiple))
    result["ingress_replaced"] = processes_titled("ServeReplica:batchserve:Ingress") != ingress_before
    print_table(result)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overload.json").write_text(json.dumps(result, indent=2))
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
