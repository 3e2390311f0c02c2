"""The train stage fanned out: one train task per layer (or per sweep point), submitted concurrently inside
a flow run, then the evaluation with every layer's transcoder spliced in at once. Composition only: the
tasks are tasks.train's and tasks.evaluate's."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from prefect.context import FlowRunContext

from core.config import Config, RunnerConfig
from flows.pipeline import result_storage
from storage import layout
from tasks.evaluate import evaluate_replacement, release_clean_reference
from tasks.locking import serialized
from tasks.plan import EVAL_STAGE, replacement_key
from tasks.sweep import SweepPoint, task_name
from tasks.train import STAGE, train_transcoder


class TrainJob(NamedTuple):
    """One train task: the config whose train section is trained, its train stage key and layer."""

    cfg: Config
    key: str
    layer: int
    name: str | None = None
    """Task run name in the Prefect UI (None: train-layer-<layer>)."""


def run_train_tasks(jobs: list[TrainJob], params: dict[str, str], forced: bool, run_task: Any) -> list[dict[str, Any]]:
    """One train task per job (`params`: activations_key, tokens_key), submitted concurrently inside a
    flow run (the jobs are independent; outside a flow run they run one after another through
    `run_task`). Returns their summaries in job order; raises the first failed job's error."""
    if FlowRunContext.get() is None:
        return [run_task(train_transcoder, j.cfg, STAGE, j.key, forced, layer=j.layer, **params) for j in jobs]
    if not jobs:
        return []
    threads = task_threads(jobs[0].cfg.runner, len(jobs))
    futures = [
        _configured(j.cfg, j.key, forced, j.name).submit(
            cfg=j.cfg, key=j.key, layer=j.layer, force=forced, threads=threads, **params
        )
        for j in jobs
    ]
    try:
        for future in futures:  # every task ends before a failure is raised
            future.wait()
    finally:
        torch.set_num_threads(jobs[0].cfg.runner.torch_threads)  # the next stages run here, alone
    return [_summarize(f.state, j.cfg, j.key, j.layer) for j, f in zip(jobs, futures, strict=True)]


def task_threads(runner: RunnerConfig, n_jobs: int) -> int | None:
    """Torch threads for each concurrent train task. The threads runner runs its tasks in this one
    process, on the cores that `torch_threads` counts: `max_workers` tasks with `torch_threads` threads
    each would put several threads on every core, and a thread waiting for its preempted partner at
    each parallel region stalls both; so each task gets an even share (at least 1). Other runners
    (None) keep what their workers were started with."""
    if runner.kind != "threads":
        return None
    return max(1, runner.torch_threads // max(1, min(runner.max_workers, n_jobs)))


def train_layers(cfg: Config, plan: Any, forced: bool, run_task: Any) -> list[dict[str, Any]]:
    """One train task per configured layer, submitted concurrently inside a flow run (independent
    layers; outside a flow run they run one after another through `run_task`), then, with several
    layers, the evaluation with every layer's transcoder spliced in at once."""
    params = {"activations_key": plan.activations, "tokens_key": plan.tokens_train}
    layers = sorted(plan.train.items())
    try:
        summaries = run_train_tasks([TrainJob(cfg, key, layer) for layer, key in layers], params, forced, run_task)
        if len(layers) > 1 and cfg.train.eval_ce_rows > 0:
            key = replacement_key(cfg, plan.train)
            summaries.append(
                run_task(evaluate_replacement, cfg, EVAL_STAGE, key, forced, train_keys=dict(layers),
                         tokens_key=plan.tokens_train)
            )  # fmt: skip
    finally:
        release_clean_reference()  # the evaluations of this run are done
    return summaries


def _configured(cfg: Config, key: str, forced: bool, name: str | None = None) -> Any:
    """As flows.pipeline.run_task: recompute when forced or when the artifact is missing."""
    complete = layout.is_complete(layout.stage_dir(cfg.store.root, STAGE, key))
    results = result_storage(cfg)
    named = {"task_run_name": name} if name else {}
    return serialized(
        train_transcoder.with_options(refresh_cache=forced or not complete, result_storage=results, **named),
        cfg.store.root,
    )


def _summarize(state: Any, cfg: Config, key: str, layer: int) -> dict[str, Any]:
    summary = dict(state.result())  # raises the task's error when it failed
    summary["path"] = str(layout.stage_dir(cfg.store.root, STAGE, key))
    summary["layer"] = layer
    if state.name == "Cached":
        summary["status"], summary["seconds"] = "cached", 0.0
    return summary


def train_points(points: list[SweepPoint], plan: Any, forced: bool, run_task: Any) -> list[dict[str, Any]]:
    """One train task per point through the train stage (in parallel inside a flow run); summaries in
    point order, each with the point's index, kind and settings added."""
    params = {"activations_key": plan.activations, "tokens_key": plan.tokens_train}
    jobs = [TrainJob(p.cfg, p.key, p.layer, task_name(p)) for p in points]
    try:
        summaries = run_train_tasks(jobs, params, forced, run_task)
    finally:
        release_clean_reference()
    return [{**s, **p.labels()} for p, s in zip(points, summaries, strict=True)]
