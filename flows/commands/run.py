"""`circuitflow run`: validate the config, then run the pipeline flow and print a stage summary.

When nothing is forced and the last run of the same stages with the same keys left every artifact
it wrote or reused complete, there is nothing to orchestrate: the summary comes from the store
without starting Prefect (`args.prefect`, if the parser defines it, always goes through Prefect).
"""

from __future__ import annotations

import argparse
import time

from core.config import load_config
from tasks.plan import STAGES, check_config, make_plan
from tasks.preflight import check_store


def main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    overrides = list(args.overrides)
    if args.store:
        overrides.append(f"store.root={args.store}")
    stages = [s.strip() for s in args.stages.split(",")] if args.stages else None
    cfg = load_config(args.config, overrides)  # every bad input fails here or below, before heavy work
    check_store(cfg.store.root, "--store" if args.store else "store.root")

    from flows.pipeline import cached_run, downstream, pipeline, record_run, selected, with_absolute_store

    chosen, forced = selected(stages), downstream(args.force)
    cfg = with_absolute_store(cfg)
    plan = make_plan(cfg)
    everything = len(chosen) == len(STAGES)
    if not everything:
        check_config(cfg)  # every stage done proves the config fits the model; a subset does not
    cached = None if forced or getattr(args, "prefect", False) else cached_run(cfg, plan, chosen)
    if cached:
        record_run(cfg, plan, chosen, cached, time.perf_counter() - start, orchestrator="none")
        print_summary(cached, time.perf_counter() - start)
        print("every stage was already in the store: nothing to run, so Prefect was not started")
        return 0
    if everything:
        check_config(cfg)
    from flows.runners import local_api

    with local_api():
        summaries = pipeline(config=args.config, overrides=overrides, stages=stages, force=args.force)
    print_summary(summaries, time.perf_counter() - start)
    return 0


def print_summary(summaries: list[dict], seconds: float) -> None:
    """One line per task run: stage (with layer), ran or cached, seconds it took, where it wrote."""
    from flows.pipeline import label

    print(f"{'stage':<12} {'status':<7} {'seconds':>8}  path")
    for s in summaries:
        print(f"{label(s):<12} {s['status']:<7} {s['seconds']:>8.1f}  {s['path']}")
    print(f"total {seconds:.1f} s")
