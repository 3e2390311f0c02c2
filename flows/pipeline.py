"""The end-to-end flow: tokens -> activations -> train (one task per layer) -> mine -> trace -> feature_inputs.

Only composition lives here: every stage is a task keyed by its content key (tasks.plan), so a
rerun with the same config is a cache hit and a changed setting reruns exactly what depends on it.
A stage whose manifest exists counts as done even when Prefect's own results are gone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from prefect import flow, tags
from prefect.states import State

from core.config import Config, ConfigError, load_config
from flows.runners import ConfiguredTaskRunner, configure_flow_runner, forward_core_logs, limited_tag
from storage import layout, runs
from tasks.locking import serialized
from tasks.plan import STAGES, Plan, check_config, make_plan, wants_feature_inputs

RESULTS_DIR = ".prefect-results"
"""Prefect's persisted task results live in the store, next to the artifacts they describe."""
READS = {
    "tokens": (),
    "activations": ("tokens",),
    "train": ("activations",),
    "mine": ("tokens", "train"),
    "trace": ("train",),
    "feature_inputs": ("tokens", "train", "mine"),
}
"""The stages each stage reads from (as in tasks.plan's keys): forcing one forces its readers."""
SUMMARY_ARTIFACT = "circuitflow-run-summary"
"""Key of the table artifact listing each stage task of a run: ran or cached, seconds, path."""

forward_core_logs()


def label(summary: dict[str, Any]) -> str:
    """A stage summary's name in tables: the stage, with the layer for per-layer tasks."""
    return summary["stage"] if summary.get("layer") is None else f"{summary['stage']}[{summary['layer']}]"


def result_storage(cfg: Config) -> Path:
    """Where Prefect persists task results (a folder path: Prefect treats it as local storage)."""
    path = Path(cfg.store.root).resolve() / RESULTS_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def with_absolute_store(cfg: Config) -> Config:
    """The config with its store root made absolute, so tasks on other processes find the same store."""
    root = str(Path(cfg.store.root).expanduser().resolve())
    return dataclasses.replace(cfg, store=dataclasses.replace(cfg.store, root=root))


def downstream(force: list[str]) -> set[str]:
    """The forced stages and every stage that reads from them, directly or not."""
    unknown = [s for s in force if s not in STAGES]
    if unknown:
        raise ConfigError(f"--force {unknown[0]!r}: unknown stage; stages are {', '.join(STAGES)}")
    out = set(force)
    for stage in STAGES:  # in pipeline order, so inputs are settled before their readers
        if out & set(READS[stage]):
            out.add(stage)
    return out


def upstream(stage: str) -> list[str]:
    """`stage` and every stage it reads from, directly or not, in pipeline order."""
    needed = {stage}
    for later in reversed(STAGES):  # readers come after what they read
        if later in needed:
            needed.update(READS[later])
    return [s for s in STAGES if s in needed]


def selected(stages: list[str] | None) -> list[str]:
    """The stages to run, in pipeline order (all when none are given)."""
    if not stages:
        return list(STAGES)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"--stages {unknown[0]!r}: unknown stage; stages are {', '.join(STAGES)}")
    return [s for s in STAGES if s in stages]


def run_id(plan: Plan, stages: list[str]) -> str:
    """Names the record of a run of these stages for this plan: `<store>/runs/plans/<id>.json`."""
    blob = json.dumps({"plan": plan.keys(), "stages": stages}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_run(cfg: Config, plan: Plan, stages: list[str]) -> list[dict[str, Any]] | None:
    """The summaries of the last run of exactly these stages and keys, all as cached, when every
    artifact that run wrote or reused is still complete; None otherwise (then Prefect has work)."""
    record = runs.read_plan_record(cfg.store.root, run_id(plan, stages))
    if record is None:
        return None
    summaries = record["stages"]
    if not summaries or not all(layout.is_complete(s["path"]) for s in summaries):
        return None
    return [as_cached(s) for s in summaries]


def as_cached(summary: dict[str, Any]) -> dict[str, Any]:
    """A stage summary reported as a cache hit: no time spent, and no reason to run (that was another run's)."""
    return {**{k: v for k, v in summary.items() if k != "reason"}, "status": "cached", "seconds": 0.0}


# ---------------------------------------------------------------- running stage tasks


def _configured(task: Any, cfg: Config, stage: str, key: str, forced: bool) -> Any:
    """The task with caching set for this run: recompute when forced or when the artifact is missing."""
    complete = layout.is_complete(layout.stage_dir(cfg.store.root, stage, key))
    configured = task.with_options(refresh_cache=forced or not complete, result_storage=result_storage(cfg))
    return serialized(configured, cfg.store.root)  # a concurrent run on this store waits for it


def summarize(state: State, cfg: Config, stage: str, key: str) -> dict[str, Any]:
    """A task's summary from its final state; Prefect cache hits are reported as cached."""
    summary = dict(state.result())
    summary["path"] = str(layout.stage_dir(cfg.store.root, stage, key))  # this store's, not a stale one
    return as_cached(summary) if state.name == "Cached" else summary


def run_task(task: Any, cfg: Config, stage: str, key: str, forced: bool, **params: Any) -> dict[str, Any]:
    """Run one stage task here and wait: cached by its key unless forced or its artifact is missing."""
    state: State = _configured(task, cfg, stage, key, forced)(
        cfg=cfg, key=key, force=forced, return_state=True, **params
    )
    return summarize(state, cfg, stage, key)


def execute(cfg: Config, plan: Plan, stages: list[str], forced: set[str]) -> list[dict[str, Any]]:
    """Run the selected stages in order and return one summary per task run.

    Stages that run the model carry the GPU tag when a Prefect concurrency limit exists for it.
    """
    from tasks.tokens import tokenize_corpus

    device_tag = limited_tag(cfg.runner.gpu_tag)
    on_device = tags(device_tag) if device_tag else contextlib.nullcontext()
    summaries: list[dict[str, Any]] = []
    if "tokens" in stages:
        mine_split = "heldout" if cfg.mine.corpus is None else "all"
        summaries.append(run_task(tokenize_corpus, cfg, "tokens", plan.tokens_train, "tokens" in forced, split="train"))
        summaries.append(
            run_task(tokenize_corpus, cfg, "tokens", plan.tokens_mine, "tokens" in forced, split=mine_split)
        )
    with on_device:
        if "activations" in stages:
            from tasks.activations import cache_activations

            summaries.append(
                run_task(cache_activations, cfg, "activations", plan.activations, "activations" in forced,
                         tokens_key=plan.tokens_train)
            )  # fmt: skip
        if "train" in stages and cfg.transcoders is None:
            from flows.train_layers import train_layers

            summaries.extend(train_layers(cfg, plan, "train" in forced, run_task))
        if "mine" in stages:
            from tasks.mine import mine_features

            summaries.append(run_task(mine_features, cfg, "mine", plan.mine, "mine" in forced, plan=plan.keys()))
        if "trace" in stages and cfg.trace.roots:
            from tasks.trace import trace_roots

            summaries.append(run_task(trace_roots, cfg, "trace", plan.trace, "trace" in forced, plan=plan.keys()))
        if "feature_inputs" in stages and wants_feature_inputs(cfg):
            from tasks.feature_inputs import mean_feature_inputs

            summaries.append(
                run_task(mean_feature_inputs, cfg, "feature_inputs", plan.feature_inputs,
                         "feature_inputs" in forced, plan=plan.keys())
            )  # fmt: skip
    return summaries


def prepare(config: str | None, overrides: list[str] | None) -> tuple[Config, Plan]:
    """Load and check a config inside a flow run, start its task runner, and plan every key."""
    cfg = with_absolute_store(load_config(config, overrides or []))
    check_config(cfg)
    configure_flow_runner(cfg.runner)
    _set_torch_threads(cfg.runner.torch_threads)
    return cfg, make_plan(cfg)


def _set_torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


@flow(name="circuitflow-pipeline", log_prints=True, task_runner=ConfiguredTaskRunner())
def pipeline(
    config: str | None = None,
    overrides: list[str] | None = None,
    stages: list[str] | None = None,
    force: list[str] | None = None,
    store: str | None = None,
) -> list[dict[str, Any]]:
    """Run the pipeline for a YAML config (path) with `a.b=value` overrides.

    Args:
        config: YAML experiment config: a path relative to the run's working directory, or absolute
            (e.g. configs/default.yaml; empty: the built-in defaults).
        overrides: config values to override, as `section.field=value` strings
            (e.g. ["train.l1_coefficient=2e-4", "activations.layers=[0,1]"]), like `circuitflow run --set`.
        stages: the stages to run, in any order, among tokens, activations, train, mine, trace,
            feature_inputs (empty: all of them). A stage whose inputs are missing fails and says which to run first.
        force: stages to recompute even when cached (among tokens, activations, train, mine, trace,
            feature_inputs); the stages that read from them are recomputed too.
        store: store directory the run reads and writes (overrides the config's store.root; empty: the
            config's store.root).
    """
    if store:
        overrides = [*(overrides or []), f"store.root={store}"]
    cfg, plan = prepare(config, overrides)
    start = time.perf_counter()
    chosen = selected(stages)
    summaries = execute(cfg, plan, chosen, downstream(force or []))
    finish_run(cfg, plan, chosen, summaries, time.perf_counter() - start)
    return summaries


def finish_run(cfg: Config, plan: Plan, stages: list[str], summaries: list[dict[str, Any]], seconds: float) -> Path:
    """Record a flow run in the store and show its stage summary in the Prefect UI."""
    from prefect.artifacts import create_table_artifact

    rows = [{"stage": label(s), "status": s["status"], "seconds": s["seconds"], "path": s["path"]} for s in summaries]
    create_table_artifact(table=rows, key=SUMMARY_ARTIFACT, description=f"circuitflow run: {len(rows)} stage tasks")
    return record_run(cfg, plan, stages, summaries, seconds)


def record_run(
    cfg: Config,
    plan: Plan,
    stages: list[str],
    summaries: list[dict[str, Any]],
    seconds: float,
    orchestrator: str = "prefect",
) -> Path:
    """Write a run record under <store>/runs/ (queryable as the `runs` view), and index it by plan."""
    record = {
        "created": layout.now(),
        "seconds": round(seconds, 3),
        "orchestrator": orchestrator,
        "selected": stages,
        "config": cfg.to_dict(),
        "plan": plan.keys(),
        "stages": [{k: v for k, v in s.items() if k != "manifest"} for s in summaries],
    }
    return runs.write_record(cfg.store.root, record, run_id(plan, stages), plan.mine[:8])
