"""The deployment path for real, no mocks: `prefect server start` on a free port with its own
PREFECT_HOME, the process work pool, `prefect deploy --all` from prefect.yaml, a worker, and the
pipeline deployment run twice through the API the way the UI starts runs (the second is all cache
hits). Also: `core.*` log records reach a run's logs. The server, pool, deployments and worker are
session fixtures (tests/flows/conftest.py) shared with test_server_schedule.py and test_server_web.py."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import yaml

from tests.flows.prefect_server import REPO
from tests.tasks.test_train_progress import check_progress_artifact

TASKS = {"tokens-train", "tokens-heldout", "train-layer-0", "train-layer-1", "evaluate-all-layers", "mine", "trace"}
"""Task run names of the tiny pipeline (plus one `activations-<key>`)."""


def _run_deployment(client, config: Path, timeout: float = 150):
    """Start the pipeline deployment as the UI's Run button does, and wait for a final state."""
    deployment = client.read_deployment_by_name("circuitflow-pipeline/default")
    flow_run = client.create_flow_run_from_deployment(deployment.id, parameters={"config": str(config)})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        flow_run = client.read_flow_run(flow_run.id)
        if flow_run.state is not None and flow_run.state.is_final():
            return flow_run
        time.sleep(1)
    raise AssertionError(f"flow run {flow_run.id} still {flow_run.state} after {timeout} s")


def _task_runs(client, flow_run_id) -> dict[str, str]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r.state.name for r in runs}


@pytest.mark.server
def test_pipeline_deployment_runs_then_is_all_cache_hits(deployed, tiny_config):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api = deployed.api
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("circuitflow-pipeline/default")
        assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
        assert [s.active for s in deployment.schedules] == [False]  # the example schedule waits for a user
        listed = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
        from_yaml = [d for d in client.read_deployments() if "deploy" not in d.tags]  # not `circuitflow deploy`'s
        assert len(from_yaml) == len(listed) >= 6  # the pipeline, one per stage, the sweep ...

        first = _run_deployment(client, tiny_config)
        assert first.state.is_completed(), first.state
        ran = _task_runs(client, first.id)
        assert TASKS <= set(ran) and len(ran) == len(TASKS) + 1, ran
        assert set(ran.values()) == {"Completed"}

        in_run = FlowRunFilter(id=FlowRunFilterId(any_=[first.id]))
        artifacts = {a.key: a for a in client.read_artifacts(flow_run_filter=in_run)}
        assert {"train-layer-0", "train-layer-1", "trace-summary"} <= set(artifacts), sorted(artifacts)
        summary = artifacts["circuitflow-run-summary"]
        rows = summary.data if isinstance(summary.data, list) else yaml.safe_load(summary.data)
        assert [r["stage"] for r in rows] == [
            "tokens", "tokens", "activations", "train[0]", "train[1]", "evaluate", "mine", "trace",
        ]  # fmt: skip
        assert {r["status"] for r in rows} == {"ran"}
        assert all((Path(r["path"]) / "manifest.json").is_file() for r in rows)
        for layer in (0, 1):  # training progress per layer, checked against the metrics it logged
            train_dir = next(r["path"] for r in rows if r["stage"] == f"train[{layer}]")
            check_progress_artifact(artifacts[f"train-progress-layer-{layer}"], Path(train_dir) / "metrics.parquet")

        second = _run_deployment(client, tiny_config)
        assert second.state.is_completed(), second.state
        again = _task_runs(client, second.id)
        assert set(again) == set(ran) and set(again.values()) == {"Cached"}, again
        latest = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["circuitflow-run-summary"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[second.id])),
        )
        rows = latest[0].data if isinstance(latest[0].data, list) else yaml.safe_load(latest[0].data)
        assert {r["status"] for r in rows} == {"cached"}


@pytest.mark.prefect
def test_core_logs_reach_the_run_logs(prefect_harness):
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    import flows.pipeline  # noqa: F401 - importing the flows forwards core.* logs

    @task(name="core_logging_task")
    def log_from_core(message: str) -> None:
        logging.getLogger("core.attribution").info(message)

    @flow(name="core-logging")
    def log_flow(message: str) -> None:
        log_from_core(message)

    message = f"core log check {time.time_ns()}"
    state = log_flow(message, return_state=True)
    APILogHandler().flush()  # send the batched records now
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    found = [log for log in logs if log.message == message]
    assert len(found) == 1 and found[0].name == "core.attribution" and found[0].task_run_id is not None
    assert found[0].level == logging.INFO
