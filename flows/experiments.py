"""The experiments flow: the config's `experiments` section (batches of interventions) run on the
transcoders its pipeline trained, as one task writing the `interventions` table. Composition only."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.pipeline import prepare, run_task
from flows.runners import ConfiguredTaskRunner, forward_core_logs
from storage.interventions import STAGE
from tasks.interventions import experiments_key, run_experiments

forward_core_logs()


@flow(name="circuitflow-experiments", log_prints=True, task_runner=ConfiguredTaskRunner())
def experiments_flow(
    config: str | None = None, overrides: list[str] | None = None, force: bool = False
) -> dict[str, Any]:
    """Run every experiment of the config's `experiments` section (the train stage must be done).

    Args:
        config: YAML config with an experiments section (path relative to the working directory, or absolute).
        overrides: `section.field=value` strings, like `circuitflow run --set`.
        force: rerun the experiments even when their table is in the store.
    """
    cfg, plan = prepare(config, overrides)
    key = experiments_key(cfg, plan.keys())
    return run_task(run_experiments, cfg, STAGE, key, force, plan=plan.keys())


if __name__ == "__main__":
    import sys

    experiments_flow(config=sys.argv[1] if len(sys.argv) > 1 else None, overrides=sys.argv[2:])
