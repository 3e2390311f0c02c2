"""Training progress in the Prefect UI: one progress artifact per layer (key `train-progress-layer-<L>`)
whose bar is the share of steps done and whose description is a small table of the logged rows
(step, tokens, loss, L0). Outside a Prefect run, or when the API fails, it does nothing."""

from __future__ import annotations

from typing import Any

from tasks.common import log

SHOWN_ROWS = 8
"""Rows kept in the artifact's table: the first update, then the latest ones."""
EVERY_PERCENT = 2.0
"""The artifact is updated when the bar has moved by at least this many percent (and at the last step)."""


def artifact_key(layer: int) -> str:
    return f"train-progress-layer-{layer}"


def progress_table(layer: int, total: int, rows: list[dict[str, float]]) -> str:
    """The artifact's description: a markdown table of the shown rows."""
    lines = [f"Transcoder layer {layer}: {total} steps", "", "| step | tokens | loss | L0 |", "|---:|---:|---:|---:|"]
    lines += [f"| {int(r['step'])} | {int(r['tokens']):,} | {r['loss']:.4g} | {r['l0']:.3g} |" for r in rows]
    return "\n".join(lines)


class TrainProgress:
    """fit callback publishing the layer's progress artifact at every logged row that moves the bar
    by EVERY_PERCENT (always at the last step)."""

    def __init__(self, layer: int, total: int) -> None:
        self.layer, self.total = layer, max(total, 1)
        self.rows: list[dict[str, float]] = []
        self.artifact: Any = None
        self.shown = -100.0
        self.enabled = _in_run()

    def __call__(self, state: Any, row: dict[str, float] | None) -> None:
        if not self.enabled or row is None:
            return
        percent = round(100.0 * min(state.step, self.total) / self.total, 1)
        if percent - self.shown < EVERY_PERCENT and state.step < self.total:
            return
        self.shown = percent
        self.rows = [*self.rows[:1], *self.rows[1:][-(SHOWN_ROWS - 2) :], row]
        self._publish(percent, progress_table(self.layer, self.total, self.rows))

    def _publish(self, percent: float, description: str) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        try:
            if self.artifact is None:
                self.artifact = create_progress_artifact(percent, key=artifact_key(self.layer), description=description)
            else:
                update_progress_artifact(self.artifact, percent, description=description)
        except Exception as err:  # the API being down must not stop training
            log(f"train[{self.layer}]: progress artifact failed ({type(err).__name__}: {err}); no further updates")
            self.enabled = False


def _in_run() -> bool:
    from prefect.context import get_run_context
    from prefect.exceptions import MissingContextError

    try:
        get_run_context()
    except MissingContextError:
        return False
    return True
