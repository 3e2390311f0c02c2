"""One intervention experiment: checked against the model's and transcoders' shapes before the model
loads (`prepare_experiment`), then run on the loaded model (`run_experiment`) into a plain report:
the target token's log-probability clean and intervened, the KL divergence, the tokens and features
that moved most, an optional root feature with the ratio of its real (recomputed) change to its
linearised (frozen) one, and optional greedy generations. Used by `circuitflow intervene` and the
experiments flow."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from core.experiment_config import ExperimentConfig
from core.intervention_hooks import Intervention, InterventionError, Shapes, ablate_feature, check, from_spec
from core.intervention_spec import Spec, parse_spec
from core.transcoder import Transcoder
from tasks.trace import Prompt, encode_prompt


class Root(NamedTuple):
    layer: int
    feature: int
    pos: int


class Prepared(NamedTuple):
    """An experiment ready to run: every position resolved, every index checked."""

    name: str
    prompt: Prompt
    specs: list[Spec]
    interventions: list[Intervention]
    frozen: bool
    target: int | None
    """Target token id (None: the clean run's top token)."""
    root: Root | None
    generate: int


def shapes_for(model_name: str, transcoders: dict[int, Transcoder], n_pos: int) -> Shapes:
    """Shapes from the model's config (no weights loaded) and the transcoders."""
    from core.model import model_config

    cfg = model_config(model_name)
    return Shapes(cfg.n_layers, cfg.n_heads, {layer: tc.cfg.d_sae for layer, tc in transcoders.items()}, n_pos)


def prepare_experiment(
    model_name: str, transcoders: dict[int, Transcoder], exp: ExperimentConfig, prompt: Prompt, name: str
) -> Prepared:
    """Check an experiment before the model loads (InterventionError, one line, for the first problem)."""
    shapes = shapes_for(model_name, transcoders, len(prompt.tokens))
    specs = exp.specs()
    interventions = []
    for spec in specs:
        try:
            interventions += check([from_spec(spec)], shapes)
        except InterventionError as err:
            raise InterventionError(f"{spec.flag} {spec.text}: {str(err).split(': ', 1)[1]}") from None
    root = None
    if exp.root is not None:
        spec = parse_spec("ablate", exp.root)
        try:
            checked = check([ablate_feature(spec.layer, spec.index, -1 if spec.pos is None else spec.pos)], shapes)[0]
        except InterventionError as err:
            raise InterventionError(f"--root {exp.root}: {str(err).split(': ', 1)[1]}") from None
        root = Root(checked.layer, checked.feature, checked.pos)  # type: ignore[union-attr]
    target = None if exp.target is None else target_token(model_name, exp.target)
    return Prepared(name, prompt, specs, interventions, exp.frozen, target, root, exp.generate)


def target_token(model_name: str, text: str) -> int:
    """The id of a one-token text (InterventionError otherwise)."""
    from core.model import load_tokenizer

    ids = load_tokenizer(model_name)(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise InterventionError(f"--target {text!r} is {len(ids)} tokens; give text that is exactly one token")
    return int(ids[0])


def prepare_all(cfg: Any, transcoders: dict[int, Transcoder]) -> list[Prepared]:
    """Every run of the config's experiments section, prepared (all checked before any model loads)."""
    runs = cfg.experiments.runs
    return [
        prepare_experiment(cfg.model.name, transcoders, r, encode_prompt(cfg, r.prompt), r.name or f"exp{i}")
        for i, r in enumerate(runs)
    ]


@torch.no_grad()
def run_experiment(
    model: Any, transcoders: dict[int, Transcoder], p: Prepared, top_k: int = 10, max_changes: int = 50
) -> dict[str, Any]:
    """Run a prepared experiment; a plain report (see the module docstring)."""
    from core.interventions import Spliced

    spliced = Spliced(model, transcoders, p.prompt.tokens)
    result = spliced.run(p.interventions, frozen=p.frozen)
    target = int(torch.argmax(spliced.clean_logits[-1])) if p.target is None else p.target
    decode = model.tokenizer.decode
    report: dict[str, Any] = {
        "name": p.name,
        "prompt": p.prompt.text,
        "n_tokens": len(p.prompt.tokens),
        "frozen": p.frozen,
        "interventions": [f"{s.flag} {s.text}" for s in p.specs],
        "target": target,
        "target_text": decode([target]),
        "clean_logprob": result.logprob(target, clean=True),
        "patched_logprob": result.logprob(target),
        "kl": result.kl(),
        "top_changes": [
            {"token": c.token, "text": decode([c.token]), "before": c.before, "after": c.after}
            for c in result.top_changes(top_k)
        ],
        "feature_changes": [
            {**c._asdict(), "token": p.prompt.texts[c.pos]} for c in result.feature_changes(limit=max_changes)
        ],
        "root": None if p.root is None else root_report(spliced, result, p),
        "generation": None,
    }
    if p.generate:
        report["generation"] = generations(model, transcoders, p)
    return report


def root_report(spliced: Any, result: Any, p: Prepared) -> dict[str, Any]:
    """The root feature's pre-activation clean and intervened, its linearised change, and their ratio."""
    layer, feature, pos = p.root  # type: ignore[misc]
    clean = float(spliced.clean_pre[layer][pos, feature])
    change = float(result.pre[layer][pos, feature]) - clean
    frozen = result if p.frozen else spliced.run(p.interventions, frozen=True)
    linear = float(frozen.pre[layer][pos, feature]) - clean
    ratio = change / linear if linear else float("nan")
    return {"layer": layer, "feature": feature, "pos": pos, "token": p.prompt.texts[pos], "clean_pre": clean,
            "pre": clean + change, "change": change, "linearised_change": linear, "ratio": ratio}  # fmt: skip


def generations(model: Any, transcoders: dict[int, Transcoder], p: Prepared) -> dict[str, str]:
    """Greedy continuations of the prompt, clean and with the interventions at every step."""
    from core.interventions import generate

    n = len(p.prompt.tokens)
    clean = generate(model, transcoders, p.prompt.tokens, (), p.generate)
    steered = generate(model, transcoders, p.prompt.tokens, p.interventions, p.generate)
    return {
        "clean": model.tokenizer.decode(clean[n:].tolist()),
        "intervened": model.tokenizer.decode(steered[n:].tolist()),
    }
