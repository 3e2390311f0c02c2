"""One flow per stage, for rerunning a single stage from the CLI, the Prefect UI or a deployment.

Each runs its stage for a config after the stages it reads from, which are cache hits when their
artifacts are already in the store.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from core.config import load_config
from flows.pipeline import downstream, execute
from tasks.plan import STAGES, check_config, make_plan


def _run_stage(stage: str, config: str | None, overrides: list[str] | None, force: bool) -> list[dict[str, Any]]:
    cfg = load_config(config, overrides or [])
    check_config(cfg)
    upstream = list(STAGES[: STAGES.index(stage) + 1])
    return execute(cfg, make_plan(cfg), upstream, downstream([stage] if force else []))


@flow(name="circuitflow-tokens", log_prints=True)
def tokens_flow(config: str | None = None, overrides: list[str] | None = None, force: bool = False) -> list[dict[str, Any]]:
    """Tokenise the training and mining corpora."""
    return _run_stage("tokens", config, overrides, force)


@flow(name="circuitflow-activations", log_prints=True)
def activations_flow(config: str | None = None, overrides: list[str] | None = None, force: bool = False) -> list[dict[str, Any]]:
    """Cache MLP (input, output) activation pairs."""
    return _run_stage("activations", config, overrides, force)


@flow(name="circuitflow-train", log_prints=True)
def train_flow(config: str | None = None, overrides: list[str] | None = None, force: bool = False) -> list[dict[str, Any]]:
    """Train one transcoder per configured layer."""
    return _run_stage("train", config, overrides, force)


@flow(name="circuitflow-mine", log_prints=True)
def mine_flow(config: str | None = None, overrides: list[str] | None = None, force: bool = False) -> list[dict[str, Any]]:
    """Mine feature activations, statistics, top examples and dashboards."""
    return _run_stage("mine", config, overrides, force)


@flow(name="circuitflow-trace", log_prints=True)
def trace_flow(config: str | None = None, overrides: list[str] | None = None, force: bool = False) -> list[dict[str, Any]]:
    """Trace the circuits of the roots listed in the config."""
    return _run_stage("trace", config, overrides, force)
