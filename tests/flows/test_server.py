"""The deployment path for real, no mocks: `prefect server start` on a free port with its own
PREFECT_HOME, the process work pool, `prefect deploy --all` from prefect.yaml, a worker, and the
pipeline deployment run twice through the API the way the UI starts runs (the second is all cache
hits). Also: `core.*` log records reach a run's logs."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.corpora import write_corpus

REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
POOL = "circuitflow"
TASKS = {"tokens-train", "tokens-heldout", "train-layer-0", "train-layer-1", "evaluate-all-layers", "mine", "trace"}
"""Task run names of the tiny pipeline (plus one `activations-<key>`)."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(proc: subprocess.Popen, name: str) -> None:
    """SIGINT (the worker ignores a prompt SIGTERM), then SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.poll() is not None, f"{name} (pid {proc.pid}) did not stop"


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"prefect server exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"prefect server not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """A server, the pool, every deployment of prefect.yaml, and a worker; stopped by PID afterwards."""
    base = tmp_path_factory.mktemp("server")
    api = f"http://127.0.0.1:{_free_port()}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(base / "home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_UI_ENABLED": "false",  # the API is enough here (docs/ has a screenshot of the UI)
        "CIRCUITFLOW_HOME": str(REPO),
    }
    port = api.rsplit(":", 1)[1].split("/")[0]
    log = base / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", port], env=env, stdout=out, stderr=out
        )
    started = [(server, "prefect server")]
    try:
        _wait_healthy(api, server, log)
        _create_pool(api)
        deploy = _prefect(env, "--no-prompt", "deploy", "--all")
        started.append((deploy, "prefect deploy"))
        with open(base / "worker.log", "w") as out:  # it boots while the deployments are created
            worker = subprocess.Popen(
                [PREFECT, "worker", "start", "--pool", POOL], env=env, cwd=base, stdout=out, stderr=out
            )
        started.append((worker, "prefect worker"))
        _finish(deploy)
        yield api, base
    finally:
        for proc, name in reversed(started):
            _stop(proc, name)


def _create_pool(api: str) -> None:
    """The process work pool, created through the API as the UI does (`prefect work-pool create
    circuitflow --type process` is the same call, after a CLI start-up)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=POOL, type="process", base_job_template=template))


def _prefect(env: dict[str, str], *argv: str) -> subprocess.Popen:
    """Start a `prefect` CLI command in the repository (see `_finish`)."""
    return subprocess.Popen(
        [PREFECT, *argv], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(proc: subprocess.Popen) -> None:
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"{' '.join(proc.args)}:\n{output[-3000:]}"


@pytest.fixture(scope="module")
def tiny_config(deployed):
    _, base = deployed
    text = "Each feature of a transcoder fires on a pattern of text that a person can name and check. "
    corpus = write_corpus(base / "corpus", 40, text, min_repeats=2)
    cfg = {
        "model": {"name": "tiny:ln", "device": "cpu"},
        "corpus": {"source": str(corpus), "min_chars": 100},
        "tokens": {"context_size": 32, "train_rows": 40, "mine_rows": 8, "holdout_fraction": 0.2},
        "activations": {"layers": [0, 1]},
        "train": {"batch_size": 128, "epochs": 1, "eval_ce_rows": 2, "init_tokens": 256, "resample_tokens": 256},
        "mine": {"top_k": 5, "num_bands": 2, "per_band": 1},
        "trace": {"roots": [{"prompt": "The cat sat on the mat.", "layer": 1, "feature": 3}], "num_branches": 3},
        "store": {"root": str(base / "store")},
        "runner": {"max_workers": 2, "torch_threads": 1},
    }
    path = base / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


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

    api, base = deployed
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("circuitflow-pipeline/default")
        assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
        assert [s.active for s in deployment.schedules] == [False]  # the example schedule waits for a user
        listed = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
        assert len(client.read_deployments()) == len(listed) >= 6  # the pipeline, one per stage, the sweep ...

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
