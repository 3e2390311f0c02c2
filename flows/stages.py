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

STAGE_ARGS = """

    Args:
        config: YAML experiment config: a path relative to the run's working directory, or absolute
            (e.g. configs/default.yaml; empty: the built-in defaults).
        overrides: config values to override, as `section.field=value` strings
            (e.g. ["train.l1_coefficient=2e-4"]), like `circuitflow run --set`.
        force: recompute this stage (and nothing upstream) even when it is cached.
        store: store directory the run reads and writes (empty: the config's store.root).
"""
"""The parameter descriptions of every stage flow (Prefect shows them in the run form)."""


def described(fn: Any) -> Any:
    """Append the stage flows' parameter descriptions to a flow function's docstring."""
    fn.__doc__ = (fn.__doc__ or "") + STAGE_ARGS
    return fn


def run_stage(
    stage: str, config: str | None, overrides: list[str] | None, force: bool, store: str | None = None
) -> list[dict[str, Any]]:
    """Run `stage` after the stages it reads from (cache hits when done); `force` recomputes `stage`."""
    if store:
        overrides = [*(overrides or []), f"store.root={store}"]
    cfg, plan = prepare(config, overrides)
    stages = upstream(stage)
    start = time.perf_counter()
    summaries = execute(cfg, plan, stages, downstream([stage] if force else []))
    finish_run(cfg, plan, stages, summaries, time.perf_counter() - start)
    return summaries


@flow(name="circuitflow-tokens", log_prints=True, task_runner=ConfiguredTaskRunner())
@described
def tokens_flow(
    config: str | None = None, overrides: list[str] | None = None, force: bool = False, store: str | None = None
) -> list[dict[str, Any]]:
    """Tokenise the training and mining corpora."""
    return run_stage("tokens", config, overrides, force, store)


@flow(name="circuitflow-activations", log_prints=True, task_runner=ConfiguredTaskRunner())
@described
def activations_flow(
    config: str | None = None, overrides: list[str] | None = None, force: bool = False, store: str | None = None
) -> list[dict[str, Any]]:
    """Cache MLP (input, output) activation pairs."""
    return run_stage("activations", config, overrides, force, store)


@flow(name="circuitflow-train", log_prints=True, task_runner=ConfiguredTaskRunner())
@described
def train_flow(
    config: str | None = None, overrides: list[str] | None = None, force: bool = False, store: str | None = None
) -> list[dict[str, Any]]:
    """Train one transcoder per configured layer."""
    return run_stage("train", config, overrides, force, store)


@flow(name="circuitflow-mine", log_prints=True, task_runner=ConfiguredTaskRunner())
@described
def mine_flow(
    config: str | None = None, overrides: list[str] | None = None, force: bool = False, store: str | None = None
) -> list[dict[str, Any]]:
    """Mine feature activations, statistics, top examples and dashboards."""
    return run_stage("mine", config, overrides, force, store)


@flow(name="circuitflow-trace", log_prints=True, task_runner=ConfiguredTaskRunner())
@described
def trace_flow(
    config: str | None = None, overrides: list[str] | None = None, force: bool = False, store: str | None = None
) -> list[dict[str, Any]]:
    """Trace the circuits of the roots listed in the config."""
    return run_stage("trace", config, overrides, force, store)


@flow(name="circuitflow-feature-inputs", log_prints=True, task_runner=ConfiguredTaskRunner())
@described
def feature_inputs_flow(
    config: str | None = None, overrides: list[str] | None = None, force: bool = False, store: str | None = None
) -> list[dict[str, Any]]:
    """Dataset-level attribution: the mean inputs of the configured features over held-out contexts."""
    return run_stage("feature_inputs", config, overrides, force, store)
