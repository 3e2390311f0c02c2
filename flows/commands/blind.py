"""`circuitflow blind make A B`: mine two dictionaries and write a blind rating page (the answer key stays
in the store); `circuitflow blind tally RATINGS`: check a rater's answers, unblind and count them per
dictionary, as the paper's Table 1."""

from __future__ import annotations

import argparse


def main(args: argparse.Namespace) -> int:
    return _tally(args) if args.blind_command == "tally" else _make(args)


def _make(args: argparse.Namespace) -> int:
    from flows.blind_compare import blind_compare, prepare_blind
    from flows.runners import local_api

    overrides = list(args.overrides) + ([f"store.root={args.store}"] if args.store else [])
    names = [s.strip() for s in args.names.split(",")] if args.names else None
    params = {"layer": args.layer, "names": names, "n": args.n, "min_density": args.min_density}
    cfg, _, _ = prepare_blind(args.config, overrides, args.dictionaries, **params)  # bad input fails before Prefect
    with local_api():
        result = blind_compare(
            dictionaries=list(args.dictionaries), config=args.config, overrides=overrides, seed=args.seed,
            out=args.out, force=args.force, **params,
        )  # fmt: skip
    for s in result["stages"]:
        print(f"{s['stage']:<8} {s['status']:<7} {s['seconds']:>8.1f}  {s['path']}")
    rater = result.get("exported") or result["rater"]
    print(f"rater's page: {rater}/index.html (hand over the folder {rater}; ratings.csv is the CSV template)")
    print(f"answer key:   {result['path']}/key.json (keep it from the rater)")
    print(f"then:         circuitflow blind tally ratings.json --store {cfg.store.root}")
    return 0


def _tally(args: argparse.Namespace) -> int:
    from storage.blind import format_tally, write_tally
    from tasks.blind import tally_ratings

    result = tally_ratings(args.ratings, args.store, args.key, args.partial)
    print(format_tally(result.rows))
    print(
        f"{result.rated} of {result.total} features rated (set {result.set_id}); "
        "context-free / context-dependent count interpretable features only"
    )
    if args.out:
        print(f"wrote {write_tally(result.rows, args.out)}")
    return 0
