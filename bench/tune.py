"""Optuna search over max_batch_size, batch_wait_timeout_s and max_concurrent_batches against a live
deployment: maximise throughput subject to p99 <= a target. The study lives in SQLite, so it can be
resumed (same --study-db and --study-name) and viewed (optuna-dashboard sqlite:///...)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Optional

import yaml

from bench.load import run_load
from bench.retune import apply_batching, current_batching


def run_tune(url: str, config: dict[str, Any], app: str, model: str, *, p99_ms: float, trials: int,
             study_db: Path, study_name: Optional[str] = None, concurrency: Optional[int] = 32,
             rate: Optional[float] = None, duration_s: float = 10.0, max_batch_size: int = 128,
             max_wait_s: float = 0.05, max_concurrent_batches: int = 4, seed: int = 0,
             progress: bool = True) -> dict[str, Any]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    original = current_batching(url, model)
    study_db.parent.mkdir(parents=True, exist_ok=True)

    study = optuna.create_study(
        study_name=study_name or f"{app}-{model}-p99-{p99_ms:g}", storage=f"sqlite:///{study_db}",
        direction="maximize", load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=seed),
    )

    def objective(trial: "optuna.Trial") -> float:
        uc = {
            **original,
            "max_batch_size": trial.suggest_int("max_batch_size", 1, max_batch_size, log=True),
            "batch_wait_timeout_s": trial.suggest_float("batch_wait_timeout_s", 0.0, max_wait_s),
            "max_concurrent_batches": trial.suggest_int("max_concurrent_batches", 1, max_concurrent_batches),
        }
        apply_batching(url, config, app, model, uc)
        summary, _ = asyncio.run(run_load(url, model, duration_s, concurrency=concurrency, rate=rate, progress=False))
        trial.set_constraint("p99_over_target_ms", summary.p99_ms - p99_ms)  # <= 0 is feasible; TPE steers to it
        trial.set_user_attr("p99_ms", summary.p99_ms)
        trial.set_user_attr("p50_ms", summary.p50_ms)
        trial.set_user_attr("errors", summary.errors)
        trial.set_user_attr("mean_batch_size", summary.mean_batch_size)
        if progress:
            ok = "ok " if summary.p99_ms <= p99_ms else "p99!"
            print(f"trial {trial.number:>3} {ok} batch {uc['max_batch_size']:>4} wait {uc['batch_wait_timeout_s'] * 1000:6.1f} ms "
                  f"concurrent {uc['max_concurrent_batches']}: {summary.items_per_s:8.1f} items/s p99 {summary.p99_ms:7.1f} ms",
                  flush=True)
        return summary.items_per_s

    try:
        study.optimize(objective, n_trials=trials)
    finally:
        apply_batching(url, config, app, model, original)
    feasible = [t for t in study.trials if t.value is not None and t.user_attrs.get("p99_ms", float("inf")) <= p99_ms]
    best = max(feasible, key=lambda t: t.value) if feasible else None
    return {"study": study.study_name, "trials": len(study.trials), "feasible": len(feasible),
            "best": None if best is None else {"number": best.number, "items_per_s": best.value, "params": best.params,
                                               "p99_ms": best.user_attrs["p99_ms"]}}


def override_yaml(app: str, model: str, params: dict[str, Any], base: dict[str, Any]) -> str:
    """A serve_config fragment that applies the tuned batching (merge into the config, then serve deploy)."""
    user_config = {**base, **params}
    doc = {"applications": [{"name": app, "deployments": [{"name": model, "user_config": user_config}]}]}
    return yaml.safe_dump(doc, sort_keys=False)
