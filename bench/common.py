"""What every benchmark shares: the result row and the `python -m bench.bench_<name>` entry point."""

from __future__ import annotations

import argparse
from collections.abc import Callable
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
