"""What every benchmark shares: the result row and the `python -m bench.bench_<name>` entry point."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def row(
    name: str, value: float, unit: str, target: str = "", met: bool | None = None, note: str = ""
) -> dict[str, Any]:
    """One figure: its value, unit, target (as text), whether the target is met (None: no target), a note."""
    return {"name": name, "value": float(value), "unit": unit, "target": target, "met": met, "note": note}


def main(run: Callable[..., list[dict[str, Any]]], doc: str | None) -> None:
    """Parse --quick/--threads, run one benchmark and print its rows as the table bench.run writes."""
    import torch

    from bench.run import table

    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller inputs (a smoke run, not the reported figures)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(table(run(quick=args.quick)))


def store() -> Path:
    """The store whose trained transcoders benchmarks use: $CIRCUITFLOW_BENCH_STORE, else ./store."""
    return Path(os.environ.get("CIRCUITFLOW_BENCH_STORE", "store"))


def trained_transcoders(layers: tuple[int, ...]) -> dict[int, Any] | None:
    """The transcoders at `layers` of the store's latest run, or None when any is missing or incomplete."""
    from storage.checkpoints import load_transcoder
    from storage.layout import is_complete, stage_dir

    latest = store() / "runs" / "latest.json"
    if not latest.is_file():
        return None
    train = {int(k): v for k, v in json.loads(latest.read_text())["plan"].get("train", {}).items()}
    dirs = {layer: stage_dir(store(), "train", train[layer]) for layer in layers if layer in train}
    if len(dirs) < len(layers) or not all(is_complete(d) for d in dirs.values()):
        return None
    return {layer: load_transcoder(d) for layer, d in dirs.items()}
