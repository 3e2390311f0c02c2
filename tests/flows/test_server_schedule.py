"""`circuitflow deploy` on a real server (the session's, tests/flows/conftest.py): an interval
schedule makes the scheduler create runs, the worker runs them on the deployment's store with its
overrides, the second run is all cache hits, and the stage keys are those `circuitflow run` computes
for the same config and overrides. On SQLAlchemy 2.1 the scheduler fails on every tick and no run
is ever created (prefect 3.8; requirements.lock pins 2.0). Bad input: one line, exit 2, nothing made."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest
import yaml

from tests.flows.conftest import tiny_experiment
from tests.flows.prefect_server import CIRCUITFLOW, finish, start

OVERRIDES = ["mine.top_k=4"]
"""Changes the mine key only: after test_server.py's runs, the first scheduled run re-mines, nothing else."""
INTERVAL = 6
NAME = "circuitflow-pipeline/scheduled"


@pytest.fixture(scope="module")
def experiment(deployed) -> Path:
    """The tiny config, naming a store the deployment must NOT use (its --store wins)."""
    cfg = tiny_experiment(deployed.base)
    cfg["store"]["root"] = str(deployed.base / "not-this-store")
    path = deployed.base / "scheduled.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@contextlib.contextmanager
def _client(api: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        yield client


def _runs(client, deployment_id):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
    return sorted(runs, key=lambda r: r.expected_start_time)


def _task_states(client, flow_run_id) -> dict[str, str]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r.state.name for r in runs}


def _stop_schedule(client, deployment_id, timeout: float = 180) -> None:
    """Pause the deployment (its scheduled runs are deleted), cancel the runs not yet running and wait for the
    running ones to finish (cache hits by then): a run cancelled mid-way keeps its process, which would write
    the store under the tests that read it next."""
    from prefect.states import Cancelled

    client.pause_deployment(deployment_id)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live = [r for r in _runs(client, deployment_id) if r.state is not None and not r.state.is_final()]
        for run in live:
            if not run.state.is_running():
                client.set_flow_run_state(run.id, Cancelled(), force=True)
        if not live:
            return
        time.sleep(1)
    states = [(r.name, r.state.name if r.state else None) for r in _runs(client, deployment_id)]
    raise AssertionError(f"scheduled runs still live {timeout} s after the schedule was paused: {states}")


def _summary_paths(client, flow_run_id) -> list[str]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

    found = client.read_artifacts(
        artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["circuitflow-run-summary"])),
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
    )
    rows = found[0].data if isinstance(found[0].data, list) else yaml.safe_load(found[0].data)
    return sorted(r["path"] for r in rows)


@pytest.mark.server
def test_scheduled_deployment_runs_the_experiment_then_hits_the_cache(deployed, experiment):
    store = deployed.base / "store"
    deploy = [*CIRCUITFLOW, "deploy", str(experiment), "--name", "scheduled", "--store", str(store)]
    deploy += ["--interval", str(INTERVAL), *(a for o in OVERRIDES for a in ("--set", o))]
    started = time.monotonic()
    out = finish(start(deployed.env, deploy, cwd=deployed.base))
    assert f"deployment {NAME}" in out and f"every {INTERVAL} s" in out
    timings = {"deploy": time.monotonic() - started}
    with _client(deployed.api) as client:
        deployment = client.read_deployment_by_name(NAME)
        assert deployment.parameters == {
            "config": str(experiment), "overrides": OVERRIDES, "stages": None, "force": None, "store": str(store),
        }  # fmt: skip
        schema = deployment.parameter_openapi_schema["properties"]
        assert all(schema[p].get("description") for p in ("config", "overrides", "stages", "force", "store")), schema
        assert [s.active for s in deployment.schedules] == [True]
        try:
            done = _wait_for_completed(client, deployment.id, 2, timeout=240)
        finally:
            _stop_schedule(client, deployment.id)
        timings["two runs"] = time.monotonic() - started
        runs = _runs(client, deployment.id)
        assert all(r.auto_scheduled for r in runs), "every run of this deployment came from its schedule"
        first, second = done[:2]
        assert set(_task_states(client, first.id).values()) <= {"Completed", "Cached"}
        again = _task_states(client, second.id)
        assert len(again) >= 8 and set(again.values()) == {"Cached"}, again
        scheduled_paths = _summary_paths(client, second.id)
    assert all(p.startswith(str(store)) for p in scheduled_paths)
    assert not (deployed.base / "not-this-store").exists()

    cli = finish(start(deployed.env, [*CIRCUITFLOW, "run", str(experiment), "--store", str(store),
                                      *(a for o in OVERRIDES for a in ("--set", o))], cwd=deployed.base))  # fmt: skip
    cli_paths = sorted(line.split()[-1] for line in cli.splitlines() if line.split()[-1:] and "/" in line.split()[-1])
    assert cli_paths == scheduled_paths, cli
    assert "nothing to run" in cli  # the last (scheduled) run of these keys left everything complete
    print(f"schedule timings (s): {timings}; first run {_seconds(first)}, second {_seconds(second)}")


def _seconds(run) -> str:
    return f"{run.total_run_time.total_seconds():.1f} s"


def _wait_for_completed(client, deployment_id, n: int, timeout: float) -> list:
    """The first `n` completed runs of the deployment, oldest first; fails on a failed run or at `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = _runs(client, deployment_id)
        failed = [r for r in runs if r.state is not None and r.state.is_final() and not r.state.is_completed()]
        assert not failed, f"scheduled run {failed[0].name}: {failed[0].state}"
        completed = [r for r in runs if r.state is not None and r.state.is_completed()]
        if len(completed) >= n:
            return completed[:n]
        time.sleep(1)
    states = [(r.name, r.state.name if r.state else None) for r in _runs(client, deployment_id)]
    raise AssertionError(f"after {timeout} s the schedule made {len(states)} runs: {states}")


@pytest.mark.server
@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "train.no_such_key=1"], "train.no_such_key: unknown key"),
        (["--cron", "61 * * *"], "Invalid cron string"),
    ],
)
def test_bad_deploy_input_is_one_line_and_creates_nothing(deployed, experiment, args, message):
    with _client(deployed.api) as client:
        before = sorted(d.name for d in client.read_deployments())
        pools = sorted(p.name for p in client.read_work_pools())
    proc = start(deployed.env, [*CIRCUITFLOW, "deploy", str(experiment), "--name", "bad", "--pool", "new-pool", *args])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and out.count("\n") == 1 and message in out, out
    with _client(deployed.api) as client:
        assert sorted(d.name for d in client.read_deployments()) == before
        assert sorted(p.name for p in client.read_work_pools()) == pools
