"""The end-to-end flow: tokens -> activations -> train (one task per layer) -> mine -> trace.

Only composition lives here: every stage is a task keyed by its content key (tasks.plan), so a
rerun with the same config is a cache hit and a changed setting reruns exactly what depends on it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.states import State

from core.config import Config, ConfigError, load_config
from storage import layout
from tasks.plan import STAGES, Plan, check_config, make_plan

RESULTS_DIR = ".prefect-results"
"""Prefect's persisted task results live in the store, next to the artifacts they describe."""


def result_storage(cfg: Config) -> Path:
    """Where Prefect persists task results (a folder path: Prefect treats it as local storage)."""
    path = Path(cfg.store.root).resolve() / RESULTS_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def downstream(force: list[str]) -> set[str]:
    """A forced stage forces every stage after it."""
    unknown = [s for s in force if s not in STAGES]
    if unknown:
        raise ConfigError(f"--force {unknown[0]!r}: unknown stage; stages are {', '.join(STAGES)}")
    if not force:
        return set()
    first = min(STAGES.index(s) for s in force)
    return set(STAGES[first:])


def run_task(task: Any, cfg: Config, stage: str, key: str, forced: bool, **params: Any) -> dict[str, Any]:
    """Run one stage task: cached by its key unless forced or its artifact is missing."""
    complete = layout.is_complete(layout.stage_dir(cfg.store.root, stage, key))
    configured = task.with_options(refresh_cache=forced or not complete, result_storage=result_storage(cfg))
    state: State = configured(cfg=cfg, key=key, force=forced, return_state=True, **params)
    summary = dict(state.result())
    if state.name == "Cached":
        summary["status"] = "cached"
        summary["seconds"] = 0.0
    return summary


def selected(stages: list[str] | None) -> list[str]:
    if not stages:
        return list(STAGES)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"--stages {unknown[0]!r}: unknown stage; stages are {', '.join(STAGES)}")
    return [s for s in STAGES if s in stages]


def execute(cfg: Config, plan: Plan, stages: list[str], forced: set[str]) -> list[dict[str, Any]]:
    """Run the selected stages in order and return one summary per task run."""
    from tasks.tokens import tokenize_corpus

    summaries: list[dict[str, Any]] = []
    if "tokens" in stages:
        summaries.append(run_task(tokenize_corpus, cfg, "tokens", plan.tokens_train, "tokens" in forced, split="train"))
        mine_split = "heldout" if cfg.mine.corpus is None else "all"
        summaries.append(run_task(tokenize_corpus, cfg, "tokens", plan.tokens_mine, "tokens" in forced, split=mine_split))
    if "activations" in stages:
        from tasks.activations import cache_activations

        summaries.append(
            run_task(cache_activations, cfg, "activations", plan.activations, "activations" in forced,
                     tokens_key=plan.tokens_train)
        )
    if "train" in stages and cfg.transcoders is None:
        from tasks.train import train_layers

        summaries.extend(train_layers(cfg, plan, "train" in forced, run_task))
    if "mine" in stages:
        from tasks.mine import mine_features

        summaries.append(run_task(mine_features, cfg, "mine", plan.mine, "mine" in forced, plan=plan.keys()))
    if "trace" in stages and cfg.trace.roots:
        from tasks.trace import trace_roots

        summaries.append(run_task(trace_roots, cfg, "trace", plan.trace, "trace" in forced, plan=plan.keys()))
    return summaries


@flow(name="circuitflow-pipeline", log_prints=True)
def pipeline(
    config: str | None = None,
    overrides: list[str] | None = None,
    stages: list[str] | None = None,
    force: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Run the pipeline for a YAML config (path) with `a.b=value` overrides."""
    cfg = load_config(config, overrides or [])
    check_config(cfg)
    plan = make_plan(cfg)
    start = time.perf_counter()
    summaries = execute(cfg, plan, selected(stages), downstream(force or []))
    record_run(cfg, plan, summaries, time.perf_counter() - start)
    return summaries


def record_run(cfg: Config, plan: Plan, summaries: list[dict[str, Any]], seconds: float) -> Path:
    """Write a run record under <store>/runs/ (queryable as the `runs` view)."""
    runs = Path(cfg.store.root) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    record = {
        "created": layout.now(),
        "seconds": round(seconds, 3),
        "config": cfg.to_dict(),
        "plan": plan.keys(),
        "stages": [{k: v for k, v in s.items() if k != "manifest"} for s in summaries],
    }
    path = runs / f"{stamp}-{plan.mine[:8]}.json"
    layout.write_json_atomic(path, record)
    layout.write_json_atomic(runs / "latest.json", record)
    return path
