"""python -m app.plan serve_config.yaml [--gpus-per-node N --gpu-memory-gb X --nodes K]

Prints the execution plan of every model in a serve config, as the app will log and serve it.
The flags replace each model's declared device budget with a GPU budget, to ask "what if".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from app.config import ConfigError, ModelSpec, parse_app_args
from app.models.loader import load_tokenizer
from app.planner import PlanError, plan_model


def _with_budget(spec: ModelSpec, ns: argparse.Namespace) -> ModelSpec:
    if ns.gpus_per_node is None and ns.gpu_memory_gb is None and ns.nodes is None:
        return spec
    dev = spec.parallel.devices.model_dump()
    dev["kind"] = "gpu"
    if ns.gpus_per_node is not None:
        dev["per_node"] = ns.gpus_per_node
    if ns.gpu_memory_gb is not None:
        dev["memory_gib"] = ns.gpu_memory_gb
    if ns.nodes is not None:
        dev["nodes"] = ns.nodes
    raw = spec.model_dump()
    raw["parallel"]["devices"] = dev
    for key in ("tp", "pp"):  # forced sizes may no longer fit the new budget; let the planner choose
        raw["parallel"][key] = None if raw["parallel"]["strategy"] == "auto" else raw["parallel"][key]
    return ModelSpec.model_validate(raw)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m app.plan", description=__doc__.splitlines()[2])
    p.add_argument("config", type=Path, help="a Serve config file (serve_config.yaml)")
    p.add_argument("--gpus-per-node", type=int)
    p.add_argument("--gpu-memory-gb", type=float, help="memory per GPU in GiB")
    p.add_argument("--nodes", type=int)
    p.add_argument("--explain", action="store_true", help="print each plan's reasons in full")
    ns = p.parse_args(argv)
    try:
        doc = yaml.safe_load(ns.config.read_text())
    except (OSError, yaml.YAMLError) as e:
        print(f"error: cannot read {ns.config}: {e}", file=sys.stderr)
        return 2
    rows, failures = [], 0
    for app in doc.get("applications", []):
        try:
            args = parse_app_args(app.get("args") or {})
        except ConfigError as e:
            print(f"error in application {app.get('name')!r}: {e}", file=sys.stderr)
            return 2
        for spec in args.models:
            spec = _with_budget(spec, ns)
            try:
                plan = plan_model(spec, len(load_tokenizer(spec)))
            except PlanError as e:
                failures += 1
                rows.append((spec.name, "REFUSED", "-", "-", "-", "-", "-", "-", "-", str(e)))
                continue
            rows.append((
                spec.name, plan.strategy, str(plan.tp), str(plan.pp), str(plan.chunks),
                f"{plan.param_bytes / 2**30:.3f}", f"{plan.activation_bytes_per_sample / 2**20:.2f}",
                str(plan.max_batch_size), "-" if plan.kv_cache_tokens is None else str(plan.kv_cache_tokens),
                plan.explain() if ns.explain else plan.reasons[-1] if plan.kv_cache_tokens is not None
                else plan.reasons[-2] if len(plan.reasons) > 1 else "",
            ))
    header = ("model", "strategy", "tp", "pp", "chunks", "params GiB", "act MiB/sample", "max batch", "KV tokens", "why")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header) - 1)]
    for r in [header] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
