"""Scale-out: with `runner.kind: dask` the per-layer train tasks run in Dask worker processes (a
LocalCluster here, reached by its scheduler address as a remote cluster would be), a Prefect
concurrency limit on the GPU tag keeps those tasks from running at the same time, and with
`runner.kind: ray` they run in Ray worker processes."""

from __future__ import annotations

import os
import time

import pytest
import yaml

from flows.pipeline import pipeline
from tests.corpora import write_corpus

pytestmark = pytest.mark.prefect

PROSE = (
    "Sparse features make a language model's computation readable: each fires on a recognisable "
    "pattern of text, and a transcoder writes the MLP's output as a sum of them. "
)
STAGES = ["tokens", "activations", "train"]


@pytest.fixture(scope="module")
def cluster():
    """Two single-threaded Dask worker processes with the train stage's imports loaded up front."""
    distributed = pytest.importorskip("distributed")
    pytest.importorskip("prefect_dask")
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, env={"OMP_NUM_THREADS": "1"}
        ) as local,
        distributed.Client(local) as client,
    ):
        client.run(__import__, "tasks.train")
        client.get_task_stream()  # installs the scheduler's task stream recorder
        yield local, client


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    base = tmp_path_factory.mktemp("scaleout")
    corpus = write_corpus(base / "corpus", 40, PROSE, min_repeats=2)
    cfg = {
        "model": {"name": "tiny:ln", "device": "cpu"},
        "corpus": {"source": str(corpus), "min_chars": 100},
        "tokens": {"context_size": 32, "train_rows": 48, "mine_rows": 8, "holdout_fraction": 0.2},
        "activations": {"layers": [0, 1]},
        "train": {"batch_size": 64, "epochs": 20, "log_every": 20, "eval_ce_rows": 0, "init_tokens": 256},
        "store": {"root": str(base / "store")},
        "runner": {"torch_threads": 1},
    }
    path = base / "scaleout.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def dask_runner(cluster) -> list[str]:
    return ["runner.kind=dask", f"runner.address={cluster[0].scheduler_address}"]


def run(config, runner: list[str], force: list[str] | None = None):
    """Run the first three stages; returns the summaries and the flow run's id."""
    state = pipeline(config=str(config), overrides=runner, stages=STAGES, force=force, return_state=True)
    return state.result(), state.state_details.flow_run_id


def train_runs(flow_run_id) -> list:
    """The train task runs of a flow run, by layer."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return sorted((r for r in runs if r.name.startswith("train-layer-")), key=lambda r: r.name)


def overlap(runs: list) -> bool:
    """Whether the task runs were all running at one moment."""
    return max(r.start_time for r in runs) < min(r.end_time for r in runs)


def test_train_tasks_run_in_dask_worker_processes(prefect_harness, cluster, config):
    local, client = cluster
    worker_pids = client.run(os.getpid)  # worker address -> pid
    start = time.time()
    summaries, flow_run_id = run(config, dask_runner(cluster), force=["train"])
    assert [s["status"] for s in summaries if s["stage"] == "train"] == ["ran", "ran"]

    stream = client.get_task_stream(start=start)
    trained = {t["key"]: t["worker"] for t in stream if str(t["key"]).startswith("train_transcoder")}
    assert len(trained) == 2, stream
    assert set(trained.values()) == set(worker_pids)  # one layer on each worker process
    assert os.getpid() not in {worker_pids[w] for w in trained.values()}
    assert len(train_runs(flow_run_id)) == 2

    # The same run again: every task, the per-layer ones included, is a cache hit.
    summaries, _ = run(config, dask_runner(cluster))
    assert [s["status"] for s in summaries] == ["cached"] * 5


def test_gpu_concurrency_limit_serialises_model_tasks(prefect_harness, cluster, config):
    from prefect.client.orchestration import get_client

    _, free = run(config, dask_runner(cluster), force=["train"])
    runs = train_runs(free)
    assert overlap(runs), "without a limit the two layers train at the same time"
    assert all(r.tags == [] for r in runs)  # no limit, no tag: no slot requests at all

    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag="gpu", concurrency_limit=1)
    try:
        _, limited = run(config, dask_runner(cluster), force=["train"])
    finally:
        with get_client(sync_client=True) as client:
            client.delete_concurrency_limit_by_tag(tag="gpu")
    runs = train_runs(limited)
    assert len(runs) == 2 and all(r.state.is_completed() and r.tags == ["gpu"] for r in runs)
    assert not overlap(runs), [(r.name, r.start_time, r.end_time) for r in runs]


def test_train_tasks_run_in_ray_worker_processes(prefect_harness, config, monkeypatch):
    ray = pytest.importorskip("ray")
    pytest.importorskip("prefect_ray")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a throw-away local instance needs no token
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # the runner joins this instance
    try:
        summaries, flow_run_id = run(config, ["runner.kind=ray"], force=["train"])
        events = [e for e in ray.timeline() if e["cat"] == "task::train_transcoder"]
    finally:
        ray.shutdown()
    assert [s["status"] for s in summaries if s["stage"] == "train"] == ["ran", "ran"]
    assert len(train_runs(flow_run_id)) == 2
    workers = {e["tid"] for e in events}  # Ray names the worker process that ran each task
    assert len(events) == 2 and len(workers) == 2 and all(w.startswith("worker:") for w in workers), events
