"""The train stage's progress artifact: inside a Prefect run each layer publishes one, whose table
rows are the rows training logged (compared with the stage's metrics.parquet, in the server test's
deployment run: tests/flows/test_server.py); outside a run the callback does nothing."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from tasks.train_progress import TrainProgress, progress_table


def test_outside_a_run_nothing_is_published(monkeypatch) -> None:
    progress = TrainProgress(layer=3, total=10)
    monkeypatch.setattr(progress, "_publish", lambda *a: pytest.fail("published outside a run"))
    progress(type("S", (), {"step": 10})(), {"step": 10, "tokens": 640, "loss": 0.5, "l0": 3.0})


def test_table_lists_step_tokens_loss_and_l0() -> None:
    text = progress_table(2, 50, [{"step": 5, "tokens": 12800, "loss": 0.012345, "l0": 7.25}])
    assert text.splitlines()[0] == "Transcoder layer 2: 50 steps"
    assert text.splitlines()[-1] == "| 5 | 12,800 | 0.01235 | 7.25 |"


def check_progress_artifact(artifact, metrics_file) -> None:
    """A finished layer's progress artifact: at 100 %, its table rows are rows of the layer's
    metrics.parquet (step, tokens, loss, L0 as logged), the last row the last step. Used by the server
    test (tests/flows/test_server.py), whose deployment run trains two layers."""
    assert artifact.type == "progress" and artifact.data == 100.0
    metrics = pq.read_table(metrics_file).to_pylist()
    by_step = {r["step"]: r for r in metrics}
    shown = [line.strip("| ").split(" | ") for line in artifact.description.splitlines()[4:]]
    assert int(shown[-1][0]) == metrics[-1]["step"] and len(shown) >= 2
    for step, tokens, loss, l0 in shown:
        row = by_step[int(step)]
        assert (tokens, loss, l0) == (f"{row['tokens']:,}", f"{row['loss']:.4g}", f"{row['l0']:.3g}")
