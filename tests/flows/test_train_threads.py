"""Concurrent train tasks on the threads runner share the cores instead of oversubscribing them: each
task runs with an even share of `runner.torch_threads`, and the flow's own thread gets the full count
back for the stages after training."""

from __future__ import annotations

import threading

import pytest
import torch
from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

import tasks.train as train_stage
from core.config import Config, RunnerConfig, StoreConfig
from flows.train_layers import TrainJob, run_train_tasks, task_threads


@pytest.mark.parametrize(
    ("runner", "jobs", "expected"),
    [
        (RunnerConfig(max_workers=2, torch_threads=2), 4, 1),
        (RunnerConfig(max_workers=2, torch_threads=4), 4, 2),
        (RunnerConfig(max_workers=4, torch_threads=2), 4, 1),  # never below one thread
        (RunnerConfig(max_workers=2, torch_threads=2), 1, 2),  # a lone task keeps every thread
        (RunnerConfig(max_workers=1, torch_threads=2), 4, 2),  # one at a time: all threads each
        (RunnerConfig(kind="dask", max_workers=2, torch_threads=2), 4, None),  # worker processes keep theirs
    ],
)
def test_each_concurrent_task_gets_an_even_share_of_the_threads(runner, jobs, expected) -> None:
    assert task_threads(runner, jobs) == expected


@pytest.mark.prefect
def test_train_tasks_run_with_their_share_and_the_flow_gets_its_threads_back(
    prefect_harness, tmp_path, monkeypatch
) -> None:
    seen: dict[int, tuple[int, str]] = {}

    def fake_build_stage(root, stage, key, build, force):  # records the task thread's torch threads
        layer = int(key[-1])
        seen[layer] = (torch.get_num_threads(), threading.current_thread().name)
        summary = {"stage": stage, "key": key, "path": str(tmp_path), "status": "ran", "seconds": 0.0}
        return {**summary, "manifest": {"eval": {}, "layer": layer}}

    monkeypatch.setattr(train_stage, "build_stage", fake_build_stage)
    monkeypatch.setattr(train_stage, "publish_artifacts", lambda summary, layer: None)
    cfg = Config(runner=RunnerConfig(max_workers=2, torch_threads=2), store=StoreConfig(root=str(tmp_path / "store")))

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=2))
    def fan_out() -> int:
        torch.set_num_threads(2)
        jobs = [TrainJob(cfg, f"key{layer}", layer) for layer in range(3)]
        run_train_tasks(jobs, {"activations_key": "a", "tokens_key": "t"}, True, None)
        return torch.get_num_threads()

    before = torch.get_num_threads()
    try:
        assert fan_out() == 2
    finally:
        torch.set_num_threads(before)
    assert {layer: threads for layer, (threads, _) in seen.items()} == {0: 1, 1: 1, 2: 1}
    assert all(name != threading.main_thread().name for _, name in seen.values())  # on the runner's threads
