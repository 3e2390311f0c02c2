"""`circuitflow plan CONFIG`: a dry run. Every task run of the pipeline with its key, `cached` when its
artifact is in the store, else `will run` and why (config changed, upstream key changed, code changed:
which files). Derives keys from the config and the code on disk only: no model is loaded, nothing runs.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from core.config import Config, load_config
from storage import layout
from tasks.common import why_run
from tasks.plan import StageEntry, make_plan, stage_entries


def main(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"store.root={args.store}"] if args.store else [])
    cfg = load_config(args.config, overrides)
    rows = plan_rows(cfg)
    if args.format == "json":
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows))
    return 0


def plan_rows(cfg: Config) -> list[dict[str, Any]]:
    """One row per task run: stage (with layer or split), key, status, reason, path."""
    return [_row(cfg, entry) for entry in stage_entries(cfg, make_plan(cfg))]


def _row(cfg: Config, entry: StageEntry) -> dict[str, Any]:
    path = layout.stage_dir(cfg.store.root, entry.stage, entry.key)
    if layout.is_complete(path):
        status, reason = "cached", "in the store"
    else:
        status, reason = "will run", why_run(cfg.store.root, entry.stage, entry.key, entry.section)
    return {"stage": entry.label, "key": entry.key, "status": status, "reason": reason, "path": str(path)}


def format_table(rows: list[dict[str, Any]]) -> str:
    """`stage  key  status: reason`, aligned."""
    width = max([len("stage"), *(len(r["stage"]) for r in rows)])
    lines = [f"{'stage':<{width}}  {'key':<{layout.KEY_LENGTH}}  status"]
    for r in rows:
        tail = r["status"] if r["status"] == "cached" else f"{r['status']}: {r['reason']}"
        lines.append(f"{r['stage']:<{width}}  {r['key']:<{layout.KEY_LENGTH}}  {tail}")
    return "\n".join(lines)
