"""The train stage's progress artifact: inside a Prefect run each layer publishes one, whose table
rows are the rows training logged (compared with the stage's metrics.parquet); outside a run the
callback does nothing."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

import tasks.train as train_stage
from tasks.train_progress import TrainProgress, artifact_key, progress_table
from tests.tasks.test_train_stage import prepare, write_config


def test_outside_a_run_nothing_is_published(monkeypatch) -> None:
    progress = TrainProgress(layer=3, total=10)
    monkeypatch.setattr(progress, "_publish", lambda *a: pytest.fail("published outside a run"))
    progress(type("S", (), {"step": 10})(), {"step": 10, "tokens": 640, "loss": 0.5, "l0": 3.0})


def test_table_lists_step_tokens_loss_and_l0() -> None:
    text = progress_table(2, 50, [{"step": 5, "tokens": 12800, "loss": 0.012345, "l0": 7.25}])
    assert text.splitlines()[0] == "Transcoder layer 2: 50 steps"
    assert text.splitlines()[-1] == "| 5 | 12,800 | 0.01235 | 7.25 |"


@pytest.mark.prefect
def test_a_training_run_publishes_its_progress(prefect_harness, tmp_path) -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    cfg, plan = prepare(write_config(tmp_path, epochs=1))

    @flow
    def train_one():
        from prefect.runtime import flow_run

        train_stage.train_transcoder(cfg, plan.train[1], 1, plan.activations, plan.tokens_train)
        return flow_run.id

    run_id = train_one()
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[artifact_key(1)]), flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])
            )
        )
    assert len(found) == 1 and found[0].type == "progress" and found[0].data == 100.0
    lines = found[0].description.splitlines()
    metrics = pq.read_table(f"{cfg.store.root}/train/{plan.train[1]}/metrics.parquet").to_pylist()
    by_step = {r["step"]: r for r in metrics}
    shown = [line.strip("| ").split(" | ") for line in lines[4:]]
    assert int(shown[-1][0]) == metrics[-1]["step"] and len(shown) >= 2
    for step, tokens, loss, l0 in shown:
        row = by_step[int(step)]
        assert (tokens, loss, l0) == (f"{row['tokens']:,}", f"{row['loss']:.4g}", f"{row['l0']:.3g}")
