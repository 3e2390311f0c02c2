"""`circuitflow trace`: trace one feature or logit on a prompt with the transcoders a config trained (or
names in `transcoders:`); print the top paths and nodes with the error terms, and with --out write
nodes.parquet, edges.parquet, graph.json and graph.html. With --layer and no --feature the root is the
feature of --layer with the largest activation at --pos (`root feature chosen: ...` says which);
with --logit TOKEN [--vs OTHER] it is that logit (difference); with neither it is the logit of the
top predicted token at --pos (`root chosen: ...`). --through / --not-through filter the paths."""

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
    LogitRoot,
    Traced,
    TraceInputError,
    check_pos,
    check_root,
    encode_prompt,
    load_transcoders_for,
    root_name,
    single_token,
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
    through, not_through = _patterns(args)
    logit = _logit(cfg, args)
    if args.layer is not None and args.layer not in cfg.activations.layers:
        have = ", ".join(map(str, sorted(cfg.activations.layers)))
        raise TraceInputError(f"--layer {args.layer}: no transcoder for this layer; layers with one: {have}")
    transcoders = load_transcoders_for(cfg, make_plan(cfg).keys())
    prompt = encode_prompt(cfg, args.prompt)
    if args.layer is None:
        check_pos(args.pos, len(prompt.tokens))
    else:
        check_root(transcoders, args.layer, args.feature, args.pos, len(prompt.tokens))

    import torch

    from core.model import load_model

    torch.set_num_threads(cfg.runner.torch_threads)
    model = load_model(cfg.model.name, cfg.model.device, cfg.model.dtype)
    traced = trace_prompt(
        model, transcoders, prompt, args.layer, args.feature, args.pos, cfg.trace, paths=not args.full,
        full=args.full, logit=logit, through=through, not_through=not_through,
    )  # fmt: skip
    report(traced)
    if args.out:
        from storage.graphs import write_graphs

        files = write_graphs(traced.records, args.out)
        print(f"\nwrote {', '.join(sorted(files.values()))}")
    return 0


def _patterns(args: argparse.Namespace) -> tuple[tuple, tuple]:
    """--through / --not-through as node patterns (a one-line error for a malformed one)."""
    from core.paths import NodePattern

    if (args.through or args.not_through) and args.full:
        raise TraceInputError("--through/--not-through filter the path search; drop --full")
    return tuple(map(NodePattern.parse, args.through)), tuple(map(NodePattern.parse, args.not_through))


def _logit(cfg: Any, args: argparse.Namespace) -> LogitRoot | None:
    """The logit root asked for (None for a feature root); one-line errors for bad combinations."""
    if args.vs is not None and args.logit is None:
        raise TraceInputError("--vs needs --logit: root = logit(--logit) - logit(--vs)")
    if args.logit is not None and (args.layer is not None or args.feature is not None):
        raise TraceInputError("--logit roots at a logit; drop --layer/--feature (or drop --logit for a feature root)")
    if args.feature is not None and args.layer is None:
        raise TraceInputError(f"--feature {args.feature} needs --layer")
    if args.layer is not None:
        return None
    token = None if args.logit is None else single_token(cfg, args.logit, "--logit")
    return LogitRoot(token, None if args.vs is None else single_token(cfg, args.vs, "--vs"))


def report(traced: Traced, out: Any = None) -> None:
    """The root, its terms (children kept, error, bias, prune error), top paths and nodes."""
    out = out or sys.stdout
    s = traced.summary
    if s.get("feature_auto"):
        out.write(
            f"root feature chosen: {s['feature']} (no --feature: the largest activation of layer {s['layer']} "
            f"at token {s['pos']})\n"
        )
    if s.get("logit_auto"):
        out.write(f"root chosen: {root_name(s)} (no --layer or --logit: the top prediction at token {s['pos']})\n")
    if s.get("layer") is None:
        out.write(f"root: {root_name(s)} at token {s['pos']} {s['token']!r}: value {s['pre_activation']:.4g}\n")
    else:
        out.write(
            f"root: layer {s['layer']} feature {s['feature']} at token {s['pos']} {s['token']!r}: "
            f"pre-activation {s['pre_activation']:.4g}, activation {s['activation']:.4g}\n"
        )
    for rec in traced.records:
        terms = ", ".join(f"{k} {v:+.4g}" for k, v in root_terms(rec.circuit).items())
        out.write(f"  {rec.kind} graph: root = {terms}\n")
    for rec in traced.records:
        if rec.kind == "paths" and not rec.paths:
            out.write("\nno path found: none of the paths the search kept passes --through/--not-through\n")
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
