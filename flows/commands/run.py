"""`circuitflow run`: validate the config, then run the pipeline flow and print a stage summary.

When nothing is forced and the last run of the same stages with the same keys left every artifact
it wrote or reused complete, there is nothing to orchestrate: the summary comes from the store
without starting Prefect (`args.prefect`, if the parser defines it, always goes through Prefect).
"""

from __future__ import annotations

import argparse
import logging
import time

from core.config import load_config
from core.errors import RunFailed, UserError
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

    from flows.pipeline import cached_run, downstream, record_run, selected, with_absolute_store

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
    summaries = orchestrate(args, cfg.store.root, overrides, stages)
    print_summary(summaries, time.perf_counter() - start)
    return 0


def orchestrate(args: argparse.Namespace, root: str, overrides: list[str], stages: list[str] | None) -> list[dict]:
    """Run the pipeline flow with Prefect's logs in a file of the store (and on the terminal with --verbose);
    a failure is one line naming that file."""
    from flows.pipeline import pipeline
    from flows.runlog import log_path, run_log
    from flows.runners import local_api

    path = log_path(root)
    with run_log(path, getattr(args, "verbose", False)):
        try:
            with local_api():
                return pipeline(config=args.config, overrides=overrides, stages=stages, force=args.force)
        except UserError as exc:
            raise UserError(f"{exc} (log: {path})") from None
        except Exception as exc:
            logging.getLogger("circuitflow").exception("the run failed")
            raise RunFailed(
                f"{type(exc).__name__}: {exc}".splitlines()[0] + f" (traceback in the log: {path})"
            ) from None


def print_summary(summaries: list[dict], seconds: float) -> None:
    """One line per task run: stage (with layer), ran or cached, seconds it took, where it wrote, why it ran."""
    from flows.pipeline import label

    print(f"{'stage':<12} {'status':<7} {'seconds':>8}  path")
    for s in summaries:
        why = f"  (ran: {s['reason']})" if s.get("reason") else ""  # the reason `circuitflow plan` gives
        print(f"{label(s):<12} {s['status']:<7} {s['seconds']:>8.1f}  {s['path']}{why}")
    print(f"total {seconds:.1f} s")
