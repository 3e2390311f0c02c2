"""The sweep flow: tokens -> activations -> one train task per sweep point (in parallel on the task
runner) -> the sweep table and plot. Composition only: each point is the train stage under its usual
key, so a point shared with the pipeline or an earlier sweep is a cache hit.
"""

from __future__ import annotations

import contextlib
from typing import Any

from prefect import flow, tags

from flows.pipeline import prepare, run_task
from flows.runners import ConfiguredTaskRunner, forward_core_logs, limited_tag
from flows.train_layers import train_points
from tasks.activations import cache_activations
from tasks.sweep import STAGE, collect_sweep, sweep_key, sweep_points
from tasks.tokens import tokenize_corpus

forward_core_logs()


@flow(name="circuitflow-sweep", log_prints=True, task_runner=ConfiguredTaskRunner())
def sweep_flow(config: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train every point of the config's `sweep` section and collect L0 / FVU / CE per point.

    Returns {"upstream": [tokens, activations summaries], "points": [one train summary per point,
    with its kind, layer and settings], "sweep": the collect stage's summary}."""
    cfg, plan = prepare(config, overrides)
    points = sweep_points(cfg)
    device_tag = limited_tag(cfg.runner.gpu_tag)
    with tags(device_tag) if device_tag else contextlib.nullcontext():
        upstream = [
            run_task(tokenize_corpus, cfg, "tokens", plan.tokens_train, False, split="train"),
            run_task(cache_activations, cfg, "activations", plan.activations, False, tokens_key=plan.tokens_train),
        ]
        trained = train_points(points, plan, False, run_task)
    records = [p.record() for p in points]
    collected = run_task(collect_sweep, cfg, STAGE, sweep_key(points), False, points=records)
    return {"upstream": upstream, "points": trained, "sweep": collected}
