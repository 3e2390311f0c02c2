"""`circuitflow sweep`: validate the config and its sweep points, run the sweep flow, print one line
per point (ran or cached, L0, FVU, CE) and where the table and the plot are."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from core.config import load_config
from tasks.preflight import check_store


def main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    overrides = list(args.overrides)
    if args.store:
        overrides.append(f"store.root={args.store}")
    cfg = load_config(args.config, overrides)  # every bad input fails here or below, before heavy work
    check_store(cfg.store.root, "--store" if args.store else "store.root")

    from tasks.plan import check_config
    from tasks.sweep import sweep_points

    sweep_points(cfg)
    check_config(cfg)
    from flows.runners import local_api
    from flows.sweep import sweep_flow

    with local_api():
        result = sweep_flow(config=args.config, overrides=overrides)
    print_summary(result, time.perf_counter() - start)
    return 0


def print_summary(result: dict[str, Any], seconds: float) -> None:
    """Per point: kind, settings, layer, ran or cached, seconds, L0, FVU, CE spliced, CE recovered."""
    collected = result["sweep"]
    rows = collected["manifest"]["rows"]
    print(f"{'kind':<16} {'settings':<28} {'layer':>5} {'status':<7} {'seconds':>8} {'L0':>8} {'FVU':>7} "
          f"{'CE spliced':>10} {'CE recov.':>9}")  # fmt: skip
    for point, row in zip(result["points"], rows, strict=True):
        settings = " ".join(f"{k}={v}" for k, v in point["settings"].items())
        print(f"{row['kind']:<16} {settings:<28} {row['layer']:>5} {point['status']:<7} {point['seconds']:>8.1f} "
              f"{row['l0']:>8.2f} {row['fvu']:>7.3f} {_num(row['ce_spliced']):>10} {_num(row['ce_recovered']):>9}")  # fmt: skip
    if rows and rows[0]["ce_clean"] is not None:
        ablated = {r["splice_hook"]: r["ce_ablated"] for r in rows}
        listed = ", ".join(f"{v:.4f} ({h} zeroed)" for h, v in sorted(ablated.items()))
        print(f"CE clean {rows[0]['ce_clean']:.4f}; ablated {listed}")
    print(f"table: {collected['path']}/sweep.parquet ({collected['status']})")
    print(f"plot:  {collected['path']}/sweep.png")
    print('query: circuitflow sql "select * from sweep"' + _store_flag(collected["path"]))
    print(f"total {seconds:.1f} s")


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _store_flag(path: str) -> str:
    return f" --store {Path(path).parent.parent}"
