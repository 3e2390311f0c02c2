"""What the train stage shows beside its artifact: training curves as a PNG, and per-layer Prefect artifacts
(the final metrics table and the markdown report)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from prefect.context import TaskRunContext

from storage import layout
from tasks.evaluate import EVAL_MD

_PLOT_LOCK = threading.Lock()
"""matplotlib's text layout is not thread-safe; layer tasks may plot concurrently in one process."""


def plot_curves(history: list[dict[str, float]], path: Path, title: str) -> None:
    """Training curves (loss, FVU, L0, dead fraction, sparsity, lr against tokens) as a PNG."""
    with _PLOT_LOCK:
        _plot_curves(history, path, title)


def _plot_curves(history: list[dict[str, float]], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 6))
    FigureCanvasAgg(fig)  # the Agg canvas, without touching pyplot's global backend
    tokens = [r["tokens"] for r in history]
    for i, name in enumerate(("loss", "fvu", "l0", "dead", "sparsity", "lr")):
        ax = fig.add_subplot(2, 3, i + 1)
        ax.plot(tokens, [r[name] for r in history], linewidth=1)
        ax.set_title(name)
        ax.set_xlabel("tokens")
        if name in ("loss", "fvu") and all(r[name] > 0 for r in history):
            ax.set_yscale("log")
    fig.suptitle(f"Transcoder training, {title}")
    fig.tight_layout()
    with layout.atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)


def publish_artifacts(summary: dict[str, Any], layer: int) -> None:
    """A table artifact of the final metrics and a markdown report (inside a Prefect run only)."""
    if TaskRunContext.get() is None:
        return
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    ev = summary["manifest"]["eval"]
    table = [{"metric": k, "value": v} for k, v in ev.items() if isinstance(v, (int, float))]
    kind = summary["manifest"].get("kind", "transcoder")
    create_table_artifact(  # one key per layer: the versions list every dictionary trained at it (sweep points too)
        key=f"train-layer-{layer}",
        table=table,
        description=f"{kind} layer {layer}, key {summary['key']}: final metrics",
    )
    report = (Path(summary["path"]) / EVAL_MD).read_text()
    create_markdown_artifact(key=f"train-report-layer-{layer}", markdown=report + f"\nFolder: `{summary['path']}`\n")
