"""One flow per stage, for rerunning a single stage from the CLI, the Prefect UI or a deployment.

Each runs its stage for a config after the stages it reads from, which are cache hits when their
artifacts are already in the store.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow

from flows.pipeline import downstream, execute, finish_run, prepare, upstream
from flows.runners import ConfiguredTaskRunner


def run_stage(stage: str, config: str | None, overrides: list[str] | None, force: bool) -> list[dict[str, Any]]:
    """Run `stage` after the stages it reads from (cache hits when done); `force` recomputes `stage`."""
    cfg, plan = prepare(config, overrides)
    stages = upstream(stage)
    start = time.perf_counter()
    summaries = execute(cfg, plan, stages, downstream([stage] if force else []))
    finish_run(cfg, plan, stages, summaries, time.perf_counter() - start)
    return summaries


@flow(name="circuitflow-tokens", log_prints=True, task_runner=ConfiguredTaskRunner())
def tokens_flow(
    config: str | None = None, overrides: list[str] | None = None, force: bool = False
) -> list[dict[str, Any]]:
    """Tokenise the training and mining corpora."""
    return run_stage("tokens", config, overrides, force)


@flow(name="circuitflow-activations", log_prints=True, task_runner=ConfiguredTaskRunner())
def activations_flow(
    config: str | None = None, overrides: list[str] | None = None, force: bool = False
) -> list[dict[str, Any]]:
    """Cache MLP (input, output) activation pairs."""
    return run_stage("activations", config, overrides, force)


@flow(name="circuitflow-train", log_prints=True, task_runner=ConfiguredTaskRunner())
def train_flow(
    config: str | None = None, overrides: list[str] | None = None, force: bool = False
) -> list[dict[str, Any]]:
    """Train one transcoder per configured layer."""
    return run_stage("train", config, overrides, force)


@flow(name="circuitflow-mine", log_prints=True, task_runner=ConfiguredTaskRunner())
def mine_flow(
    config: str | None = None, overrides: list[str] | None = None, force: bool = False
) -> list[dict[str, Any]]:
    """Mine feature activations, statistics, top examples and dashboards."""
    return run_stage("mine", config, overrides, force)


@flow(name="circuitflow-trace", log_prints=True, task_runner=ConfiguredTaskRunner())
def trace_flow(
    config: str | None = None, overrides: list[str] | None = None, force: bool = False
) -> list[dict[str, Any]]:
    """Trace the circuits of the roots listed in the config."""
    return run_stage("trace", config, overrides, force)
