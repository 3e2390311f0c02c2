"""`circuitflow trace`: trace one feature on a prompt with the transcoders a config trained (or names
in `transcoders:`); print the top paths and nodes with the error terms, and with --out write
nodes.parquet, edges.parquet, graph.json and graph.html. Without --feature the root is the feature
of --layer with the largest activation at --pos, and the line `root feature chosen: ...` says which."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from core.config import load_config
from flows.commands.sql import write
from storage.graphs import root_terms
from tasks.plan import make_plan
from tasks.trace import (
    Traced,
    TraceInputError,
    check_root,
    encode_prompt,
    load_transcoders_for,
    table_rows,
    trace_prompt,
)


def main(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.store:
        overrides.append(f"store.root={args.store}")
    if args.cap_heads:
        overrides.append("trace.cap_heads=true")
    cfg = load_config(args.config, overrides)
    if args.layer not in cfg.activations.layers:
        have = ", ".join(map(str, sorted(cfg.activations.layers)))
        raise TraceInputError(f"--layer {args.layer}: no transcoder for this layer; layers with one: {have}")
    transcoders = load_transcoders_for(cfg, make_plan(cfg).keys())
    prompt = encode_prompt(cfg, args.prompt)
    check_root(transcoders, args.layer, args.feature, args.pos, len(prompt.tokens))

    import torch

    from core.model import load_model

    torch.set_num_threads(cfg.runner.torch_threads)
    model = load_model(cfg.model.name, cfg.model.device, cfg.model.dtype)
    traced = trace_prompt(
        model, transcoders, prompt, args.layer, args.feature, args.pos, cfg.trace, paths=not args.full, full=args.full
    )
    report(traced)
    if args.out:
        from storage.graphs import write_graphs

        files = write_graphs(traced.records, args.out)
        print(f"\nwrote {', '.join(sorted(files.values()))}")
    return 0


def report(traced: Traced, out: Any = None) -> None:
    """The root, its terms (children kept, error, bias, prune error), top paths and nodes."""
    out = out or sys.stdout
    s = traced.summary
    if s.get("feature_auto"):
        out.write(
            f"root feature chosen: {s['feature']} (no --feature: the largest activation of layer {s['layer']} "
            f"at token {s['pos']})\n"
        )
    out.write(
        f"root: layer {s['layer']} feature {s['feature']} at token {s['pos']} {s['token']!r}: "
        f"pre-activation {s['pre_activation']:.4g}, activation {s['activation']:.4g}\n"
    )
    for rec in traced.records:
        terms = ", ".join(f"{k} {v:+.4g}" for k, v in root_terms(rec.circuit).items())
        out.write(f"  {rec.kind} graph: root = {terms}\n")
    for rec in traced.records:
        if rec.paths:
            out.write(f"\ntop paths ({len(rec.paths)} found; contribution = attribution to the root):\n")
            rows = [(i + 1, p["contrib"], " <- ".join(p["nodes"][1:])) for i, p in enumerate(_best(rec.paths, 15))]
            write(["rank", "contrib", "path (from the root down)"], rows, "table", out)
        if rec.kind == "full":
            meta = rec.circuit.meta
            out.write(
                f"\nfull graph: {len(rec.circuit.nodes)} nodes and {len(rec.circuit.edges)} edges kept of "
                f"{meta['n_nodes_total']} nodes ({meta['traced_features']} features traced)\n"
            )
    rows = [
        (r["graph"], r["id"], r["kind"], r["token"], r["attribution"], _blank(r["activation"]))
        for r in table_rows(traced.records)
    ]
    out.write("\nlargest nodes by |attribution| (the root's own error terms first):\n")
    write(["graph", "node", "kind", "token", "attribution", "activation"], rows, "table", out)


def _blank(value: float) -> float | str:
    return "" if math.isnan(value) else value


def _best(paths: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    return sorted(paths, key=lambda p: -abs(p["contrib"]))[:k]
