"""The `circuitflow` command: run the pipeline, query the store, show features, trace, convert.

Bad input is reported as one line on stderr with exit code 2, before any heavy work.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

DEFAULT_STORE = "./store"


def _prefect_defaults() -> None:
    """Offline-friendly Prefect settings (a caller's environment wins)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (what is wrong, and where to look) with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="circuitflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_OneLineParser)

    run = sub.add_parser("run", help="run the pipeline (cached stages are skipped)")
    run.add_argument("config", help="YAML experiment config, e.g. configs/default.yaml")
    run.add_argument("--store", help="store root (overrides store.root)")
    run.add_argument(
        "--stages", help="comma-separated stages to run: tokens,activations,train,mine,trace,feature_inputs"
    )
    run.add_argument(
        "--force", action="append", default=[], metavar="STAGE", help="recompute STAGE and what depends on it"
    )
    run.add_argument(
        "--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE", help="override a config value"
    )
    run.add_argument(
        "--prefect", action="store_true", help="go through Prefect even when every stage is already cached"
    )
    run.add_argument("--verbose", action="store_true", help="also print Prefect's logs (always in <store>/logs/)")

    _add_plan(sub)
    sql = sub.add_parser("sql", help="run a read-only SQL query over the store")
    sql.add_argument("query")
    sql.add_argument("--store", default=DEFAULT_STORE)
    sql.add_argument("--format", choices=["table", "csv", "json"], default="table")
    sql.add_argument("--timeout", type=float, metavar="SECONDS", help="stop the query after this long (default 30)")
    sql.add_argument("--memory-limit", metavar="SIZE", help="DuckDB memory (and spill) limit (default 2GB)")
    sql.add_argument("--max-rows", type=int, metavar="N", help="most result rows (default 1000000)")

    feature = sub.add_parser("feature", help="show a feature's dashboard")
    feature.add_argument("layer", type=int)
    feature.add_argument("feature", type=int)
    feature.add_argument("--store", default=DEFAULT_STORE)
    feature.add_argument("--html", metavar="FILE", help="write a self-contained HTML dashboard")

    trace = sub.add_parser("trace", help="trace a circuit for a feature or a logit on a prompt")
    trace.add_argument("--prompt", required=True)
    trace.add_argument("--layer", type=int, help="root feature's layer (default: a logit root)")
    trace.add_argument(
        "--feature", type=int, help="root feature (default: the one with the largest activation at --pos)"
    )
    trace.add_argument("--logit", metavar="TOKEN", help="root = this token's logit (default: the top prediction)")
    trace.add_argument("--vs", metavar="TOKEN", help="with --logit: root = logit(TOKEN) - logit(this token)")
    trace.add_argument(
        "--through", action="append", default=[], metavar="NODE", help="keep paths through NODE (F3.12@5, H1.2, E)"
    )
    trace.add_argument("--not-through", action="append", default=[], metavar="NODE", help="drop paths through NODE")
    trace.add_argument("--pos", type=int, default=-1)
    trace.add_argument("--config", default="configs/default.yaml")
    trace.add_argument("--store", help="store root (overrides store.root)")
    trace.add_argument("--out", metavar="DIR", help="also write nodes/edges/graph/html here")
    trace.add_argument("--full", action="store_true", help="full attribution graph instead of the path search")
    trace.add_argument(
        "--cap-heads", action="store_true", help="at most n_heads (head, source) children per layer (the original's)"
    )
    trace.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")

    convert = sub.add_parser("convert", help="convert a transcoder between formats")
    convert.add_argument("src")
    convert.add_argument("dst")
    convert.add_argument("--to", choices=["native", "saelens", "circuit-tracer"], default="native")

    sweep = sub.add_parser("sweep", help="train every point of the config's sweep and plot L0 vs CE per kind")
    sweep.add_argument("config", help="YAML config with a sweep section, e.g. configs/sweep.yaml")
    sweep.add_argument("--store", help="store root (overrides store.root)")
    sweep.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")

    _add_blind(sub)
    importlib.import_module("flows.commands.intervene").add_parser(sub, DEFAULT_STORE)
    for name in ("deploy", "serve"):  # these command modules declare their own arguments
        importlib.import_module(f"flows.commands.{name}").add_parser(sub)
    return parser


def _add_plan(sub: argparse._SubParsersAction) -> None:
    """`plan CONFIG`: the dry run (each stage's key, cached or will run, and why)."""
    plan = sub.add_parser("plan", help="dry run: each stage's key, cached or will run, and why")
    plan.add_argument("config", help="YAML experiment config, e.g. configs/default.yaml")
    plan.add_argument("--store", help="store root (overrides store.root)")
    plan.add_argument(
        "--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE", help="override a config value"
    )
    plan.add_argument("--format", choices=["table", "json"], default="table")


def _add_blind(sub: argparse._SubParsersAction) -> None:
    """`blind make A B` (a blind rating page for two dictionaries) and `blind tally RATINGS` (unblind, count)."""
    blind = sub.add_parser("blind", help="blind interpretability comparison of two dictionaries (transcoders, SAEs)")
    actions = blind.add_subparsers(dest="blind_command", required=True, metavar="ACTION", parser_class=_OneLineParser)
    make = actions.add_parser("make", help="mine two dictionaries and write a blind rating page")
    make.add_argument("dictionaries", nargs=2, metavar="DICT", help="a checkpoint folder, e.g. <store>/train/<key>")
    make.add_argument("--config", default="configs/default.yaml", help="model, mining tokens and mine settings")
    make.add_argument("--store", help="store root (overrides store.root)")
    make.add_argument("--layer", type=int, help="pick this layer from folders holding several")
    make.add_argument("--n", type=int, default=20, help="live features drawn from each dictionary")
    make.add_argument("--seed", type=int, default=0, help="fixes the draw and the order; keep it from the rater")
    make.add_argument("--min-density", type=float, default=0.0, help="draw only features firing on this fraction")
    make.add_argument("--names", metavar="A,B", help="dictionary names in the tally (default: kind, layer, folder)")
    make.add_argument("--out", metavar="DIR", help="also copy the rater's folder here")
    make.add_argument("--force", action="store_true", help="rebuild the blind set (mining stays cached)")
    make.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    tally = actions.add_parser("tally", help="check ratings, unblind them and count per dictionary")
    tally.add_argument("ratings", help="ratings.json from the page, or the filled-in ratings.csv")
    tally.add_argument("--store", default=DEFAULT_STORE)
    tally.add_argument("--key", metavar="FILE", help="the answer key (default: <store>/blind/<set>/key.json)")
    tally.add_argument("--partial", action="store_true", help="tally the rated features, allow unrated ones")
    tally.add_argument("--out", metavar="FILE", help="also write the table (.csv, .json or .md)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _prefect_defaults()
    from core.errors import RunFailed, UserError

    try:
        module = importlib.import_module(f"flows.commands.{args.command}")
        return int(module.main(args) or 0)
    except UserError as exc:
        print(f"circuitflow: error: {exc}", file=sys.stderr)
        return 2
    except RunFailed as exc:
        print(f"circuitflow: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("circuitflow: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
