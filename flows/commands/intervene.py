"""`circuitflow intervene`: run a prompt with the transcoders spliced in and intervene on features, heads
and MLPs; print what moved (the target token's log-probability, KL, tokens, features), optionally a
root feature's change with its real/linearised ratio and greedy generations. Reads the transcoders of
--config (with --store), or of the store's latest run. Every spec is checked before the model loads."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from core.config import ConfigError, apply_overrides, from_dict, load_config
from core.experiment_config import ExperimentConfig
from core.intervention_spec import parse_spec, parse_specs
from storage import runs
from storage.layout import StoreError


def add_parser(sub: argparse._SubParsersAction, default_store: str) -> None:
    """The `intervene` subcommand's arguments."""
    p = sub.add_parser("intervene", help="run a prompt with interventions on features, heads or MLPs")
    p.add_argument("--prompt", required=True)
    p.add_argument("--config", help="YAML config whose transcoders to use (default: the store's latest run)")
    p.add_argument("--store", help=f"store root (default: store.root of --config, else {default_store})")
    p.add_argument("--ablate", action="append", default=[], metavar="L:F[@pos]", help="zero-ablate a feature")
    p.add_argument("--clamp", action="append", default=[], metavar="L:F=VALUE[@pos]", help="set a feature")
    p.add_argument("--steer", action="append", default=[], metavar="L:F=STRENGTH", help="add a decoder row")
    p.add_argument("--ablate-head", action="append", default=[], metavar="L.H[@pos]", help="zero an attention head")
    p.add_argument("--ablate-mlp", action="append", default=[], metavar="L[@pos]", help="zero an MLP's output")
    p.add_argument("--frozen", action="store_true", help="freeze attention, norm scales and transcoder errors")
    p.add_argument("--root", metavar="L:F[@pos]", help="report this feature's change and real/linearised ratio")
    p.add_argument("--target", metavar="TOKEN", help="token whose log-probability is reported (default: the top one)")
    p.add_argument("--generate", type=int, default=0, metavar="N", help="greedy tokens with and without")
    p.add_argument("--top", type=int, default=10, help="tokens and features listed")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")


def main(args: argparse.Namespace) -> int:
    experiment = _experiment(args)
    cfg, transcoders = _context(args)
    from tasks.intervene import prepare_experiment, run_experiment
    from tasks.trace import encode_prompt

    prepared = prepare_experiment(cfg.model.name, transcoders, experiment, encode_prompt(cfg, args.prompt), "cli")

    import torch

    from core.model import load_model

    torch.set_num_threads(cfg.runner.torch_threads)
    model = load_model(cfg.model.name, cfg.model.device, cfg.model.dtype)
    report = run_experiment(model, transcoders, prepared, args.top, max(args.top, 100 if args.format == "json" else 0))
    if args.format == "json":
        json.dump(report, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print_report(report, args.top)
    return 0


def _experiment(args: argparse.Namespace) -> ExperimentConfig:
    """The command's interventions as an experiment, malformed specs refused first."""
    kinds = ("ablate", "clamp", "steer", "ablate_head", "ablate_mlp")
    parse_specs(**{k: getattr(args, k) for k in kinds})
    if args.root is not None:
        parse_spec("ablate", args.root)
    if args.generate < 0 or args.top < 1:
        raise ConfigError("--generate must be >= 0 and --top >= 1")
    if args.frozen and args.generate:
        raise ConfigError("--generate recomputes attention at every step; drop --frozen to generate")
    fields = {k: tuple(getattr(args, k)) for k in kinds}
    return ExperimentConfig(args.prompt, "cli", **fields, frozen=args.frozen, target=args.target, root=args.root,
                            generate=args.generate)  # fmt: skip


def _context(args: argparse.Namespace) -> tuple[Any, dict]:
    """The config and its transcoders: --config's, or the latest run's in the store."""
    from tasks.plan import make_plan
    from tasks.trace import load_transcoders, load_transcoders_for

    overrides = list(args.overrides)
    if args.config:
        if args.store:
            overrides.append(f"store.root={args.store}")
        cfg = load_config(args.config, overrides)
        return cfg, load_transcoders_for(cfg, make_plan(cfg).keys())
    store = Path(args.store or "./store")
    run = runs.read_latest(store)
    if run is None:
        raise StoreError(f"{store}: no runs/latest.json; run `circuitflow run CONFIG` first, or pass --config")
    cfg = from_dict(apply_overrides(run["config"], [f"store.root={store}", *overrides]))
    return cfg, load_transcoders(cfg, run["plan"])


def print_report(r: dict[str, Any], top: int, out: Any = None) -> None:
    """The report as lines and tables."""
    from flows.commands.sql import write

    out = out or sys.stdout
    how = "frozen (linearised: attention, norm scales, transcoder errors fixed)" if r["frozen"] else "recomputed"
    out.write(f"prompt {r['prompt']!r} ({r['n_tokens']} tokens, BOS included), {how}\n")
    out.write(f"interventions: {', '.join(r['interventions']) or 'none'}\n")
    change = r["patched_logprob"] - r["clean_logprob"]
    out.write(
        f"target {r['target_text']!r}: log p clean {r['clean_logprob']:.4f}, intervened {r['patched_logprob']:.4f} "
        f"(change {change:+.4f}); KL(clean || intervened) {r['kl']:.3g} nats\n"
    )
    root = r["root"]
    if root:
        out.write(
            f"root {root['layer']}:{root['feature']}@{root['pos']} {root['token']!r}: pre-activation "
            f"{root['clean_pre']:.4f} -> {root['pre']:.4f} (change {root['change']:+.4f}); linearised change "
            f"{root['linearised_change']:+.4f}; real/linearised ratio {root['ratio']:.4f}\n"
        )
    rows = [(c["token"], c["text"], c["before"], c["after"]) for c in r["top_changes"]]
    out.write("\ntokens whose probability moved most (last position):\n")
    write(["token", "text", "p clean", "p intervened"], rows, "table", out)
    rows = [(c["layer"], c["feature"], c["pos"], c["token"], c["before"], c["after"]) for c in r["feature_changes"]]
    out.write("\nfeature activations that moved most:\n")
    write(["layer", "feature", "pos", "token", "before", "after"], rows[:top], "table", out)
    if r["generation"]:
        out.write(f"\ngenerated, clean:       {r['generation']['clean']!r}\n")
        out.write(f"generated, intervened:  {r['generation']['intervened']!r}\n")
