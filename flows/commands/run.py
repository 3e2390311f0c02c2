"""`circuitflow run`: validate the config, then run the pipeline flow and print a stage summary."""

from __future__ import annotations

import argparse
import time

from core.config import load_config
from tasks.plan import check_config, make_plan


def main(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.store:
        overrides.append(f"store.root={args.store}")
    stages = [s.strip() for s in args.stages.split(",")] if args.stages else None
    cfg = load_config(args.config, overrides)  # every bad input fails here, before heavy work
    check_config(cfg)
    make_plan(cfg)

    from flows.pipeline import downstream, pipeline, selected

    selected(stages)
    downstream(args.force)
    start = time.perf_counter()
    summaries = pipeline(config=args.config, overrides=overrides, stages=stages, force=args.force)
    print_summary(summaries, time.perf_counter() - start)
    return 0


def print_summary(summaries: list[dict], seconds: float) -> None:
    print(f"{'stage':<12} {'status':<7} {'seconds':>8}  path")
    for s in summaries:
        label = s["stage"] if "layer" not in s else f"{s['stage']}[{s['layer']}]"
        print(f"{label:<12} {s['status']:<7} {s['seconds']:>8.1f}  {s['path']}")
    print(f"total {seconds:.1f} s")
