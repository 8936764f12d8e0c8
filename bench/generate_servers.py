"""The servers that bench.generate_peers compares, started and stopped as subprocesses: ours
(`serve run` of this service, with the levers its peer names carry) and `transformers serve
--continuous-batching` with the same cache and step budget."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
MODEL = "bench-model"  # the served model's name on ours


def wait_ready(url: str, model: str, timeout_s: float, proc: subprocess.Popen) -> float:
    """Seconds until one greedy completion answers 200 (the first also warms the server)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            r = httpx.post(f"{url}/v1/completions", timeout=60,
                           json={"model": model, "prompt": "warm up", "max_tokens": 4, "temperature": 0})
            if r.status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class OursPeer(NamedTuple):
    base: str  # ours, ours-tp2, ours-pp2
    max_running: int | None  # generation.max_running_sequences, or None: the config's
    direct_ingress: bool  # behind HAProxy with direct ingress
    stream_interval_ms: float | None  # generation.stream_interval_ms, or None: the config's
    in_process: bool  # generation.engine_process off: the engine in the replica's own process


def parse_ours(peer: str) -> OursPeer:
    """`ours[-tp2|-pp2][@N][~I][.inproc][+di]`: N running sequences, I ms of stream interval, the
    engine in the replica's process, the README's HAProxy front end."""
    rest = peer.removesuffix("+di")
    in_process = rest.endswith(".inproc")
    rest, _, interval = rest.removesuffix(".inproc").partition("~")
    base, _, at = rest.partition("@")
    return OursPeer(base, int(at) if at else None, peer.endswith("+di"), float(interval) if interval else None,
                    in_process)


def gang_parallel(peer: str, ns) -> dict:
    """`ours-tp2` -> a forced deepspeed_tp plan of 2 ranks (`ours-pp2`: 2 pipeline stages); `ours`: {}.
    `peer` is a base name (`parse_ours`)."""
    if peer == "ours":
        return {}
    kind, n = peer.removeprefix("ours-")[:2], int(peer.removeprefix("ours-")[2:])
    strategy = {"tp": "deepspeed_tp", "pp": "fairscale_pp"}[kind]
    return {"strategy": strategy, kind: n, "rank_num_cpus": 0.5,
            "devices": {"kind": "gpu" if ns.device == "cuda" else "cpu", "per_node": n}}


def peer_threads(peer: str, ns) -> argparse.Namespace:
    """`PEER/tT`: that peer's servers with T torch threads instead of --threads (a lever for a box
    whose cores the serving processes share)."""
    _, sep, t = peer.partition("/t")
    return argparse.Namespace(**{**vars(ns), "threads": int(t)}) if sep else ns


def start_ours(model_dir: Path, raw: dict, ns, port: int, log, parallel: dict | None = None,
               max_running: int | None = None, direct_ingress: bool = False,
               stream_interval_ms: float | None = None, in_process: bool = False) -> subprocess.Popen:
    g = dict(raw.get("generation") or {})
    if max_running is not None:  # a lever of the benchmark: the engine's running set
        g["max_running_sequences"] = max_running
    if stream_interval_ms is not None:  # and how often a stream sends its new tokens
        g["stream_interval_ms"] = stream_interval_ms
    if in_process:  # and whether the engine has a process of its own (the shipped default)
        g["engine_process"] = False
    spec = {"name": MODEL, "source": {"kind": "local_dir", "path": str(model_dir)}, "task": "generate",
            "max_seq_len": raw["max_seq_len"], "dtype": ns.dtype, "device": ns.device, "generation": g,
            "deployment": {"num_cpus": 1, "num_gpus": 1 if ns.device == "cuda" else 0,
                           "torch_threads": ns.threads},
            # One replica, as the peer is one process: the comparison is of engines, not of scale-out.
            "autoscaling": {"enabled": False}, **({"parallel": parallel} if parallel else {})}
    cfg = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port, "request_timeout_s": 600},
           "logging_config": {"enable_access_log": False},
           "applications": [{"name": "peers", "route_prefix": "/", "import_path": "deployments.builder:build_app",
                             "args": {"models": [spec]}}]}
    path = model_dir.parent / "serve_peers.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # Modules, not console scripts: on the GPU machine the carried packages are on PYTHONPATH only.
    return subprocess.Popen([sys.executable, "-m", "ray.serve.scripts", "run", str(path)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
                                 # `+di`: the README's front end (HAProxy, the ingress replica serving
                                 # HTTP itself: one Ray hop per token instead of two), else Serve's proxy.
                                 **({"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}
                                    if direct_ingress else {})})


def start_transformers(model_dir: Path, raw: dict, ns, port: int, log) -> subprocess.Popen:
    g = raw.get("generation") or {}
    page = g.get("page_size", 32)
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(model_dir), "--continuous-batching",
           "--port", str(port), "--host", "127.0.0.1", "--device", ns.device, "--dtype", ns.dtype,
           # The same cache and step budget as ours (app/config/sections.py defaults where unset).
           "--cb-block-size", str(page), "--cb-num-blocks", str(g.get("kv_cache_max_tokens", 65536) // page),
           "--cb-max-batch-tokens", str(g.get("max_step_tokens", 512))]
    env = {**os.environ, "OMP_NUM_THREADS": str(ns.threads)}
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
