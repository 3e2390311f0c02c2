"""The run plan: every stage's content key derived from the config alone (no heavy work), and the
pre-flight checks that reject a bad config before anything runs."""

from __future__ import annotations

import dataclasses
import glob
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from core.config import Config, ConfigError, CorpusConfig
from core.corpus import corpus_fingerprint, mine_corpus
from storage.layout import is_complete, stage_dir, stage_key
from tasks.preflight import check_resources

STAGES = ("tokens", "activations", "train", "mine", "trace", "feature_inputs")
"""Pipeline stages in order; each depends on the ones before it."""
EVAL_STAGE = "evaluate"
"""Stage dir of the joint evaluation (every layer's transcoder spliced in at once), run with the train stage:
<store>/evaluate/<key>/ (eval.json, eval.md)."""


@dataclass(frozen=True)
class Plan:
    tokens_train: str
    """Key of the training token rows."""
    tokens_mine: str
    """Key of the held-out mining token rows."""
    activations: str
    """Key of the activation cache."""
    train: dict[int, str] = field(default_factory=dict)
    """Per layer: key of the trained (or imported) transcoder."""
    mine: str = ""
    """Key of the mining stage."""
    trace: str = ""
    """Key of the trace stage."""
    feature_inputs: str = ""
    """Key of the feature_inputs stage (dataset-level attribution)."""

    def keys(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _without(section: Any, *names: str) -> dict[str, Any]:
    data = section.to_dict()
    for name in names:
        data.pop(name, None)
    return data


def tokens_key(cfg: Config, corpus: CorpusConfig, split: str, n_rows: int) -> str:
    settings = {
        "tokenizer": cfg.model.name,
        "corpus": corpus.to_dict(),
        "fingerprint": corpus_fingerprint(corpus.source),
        "split": split,
        "rows": n_rows,
        "context_size": cfg.tokens.context_size,
        "holdout_fraction": cfg.tokens.holdout_fraction,
        "seed": cfg.tokens.seed,
    }
    return stage_key("tokens", settings)


def external_transcoder_files(pattern: str) -> list[str]:
    """Files or folders matched by `transcoders:` in a config, sorted."""
    matches = sorted(glob.glob(str(Path(pattern).expanduser())))
    if not matches:
        raise ConfigError(f"transcoders: {pattern!r} matches no file or folder")
    return matches


def make_plan(cfg: Config) -> Plan:
    """Derive every stage key from the config."""
    model = {"name": cfg.model.name, "dtype": cfg.model.dtype}
    t_train = tokens_key(cfg, cfg.corpus, "train", cfg.tokens.train_rows)
    corpus, split = mine_corpus(cfg)
    t_mine = tokens_key(cfg, corpus, split, cfg.tokens.mine_rows)
    acts = stage_key("activations", {"model": model, **_without(cfg.activations, "batch_rows")}, {"tokens": t_train})
    if cfg.transcoders is None:
        train = {
            layer: stage_key("train", {"model": model, "layer": layer, **cfg.train.to_dict()}, {"activations": acts})
            for layer in cfg.activations.layers
        }
    else:
        files = external_transcoder_files(cfg.transcoders)
        stamps = [(f, Path(f).stat().st_mtime_ns) for f in files]
        train = {layer: stage_key("import", {"files": stamps, "layer": layer}) for layer in cfg.activations.layers}
    inputs = {f"train_{layer}": key for layer, key in sorted(train.items())}
    mine = stage_key("mine", {"model": model, **_without(cfg.mine, "batch_rows")}, {"tokens": t_mine, **inputs})
    trace = stage_key("trace", {"model": model, **cfg.trace.to_dict()}, inputs)
    fi = cfg.feature_inputs
    roots = [r.to_dict() for r in cfg.trace.roots] if fi.roots else []
    inputs_key = stage_key("feature_inputs", {"model": model, **fi.to_dict(), "roots": roots}, {"mine": mine, **inputs})
    return Plan(t_train, t_mine, acts, train, mine, trace, inputs_key)


def replacement_key(cfg: Config, train_keys: dict[int, str]) -> str:
    """Content key of the all-layers evaluation: the transcoders' keys and the held-out rows used."""
    settings = {"eval_fraction": cfg.train.eval_fraction, "eval_ce_rows": cfg.train.eval_ce_rows,
                "drop_bos": cfg.activations.drop_bos, "model": cfg.model.name, "dtype": cfg.model.dtype}  # fmt: skip
    return stage_key(EVAL_STAGE, settings, {f"train_{layer}": k for layer, k in sorted(train_keys.items())})


def wants_feature_inputs(cfg: Config) -> bool:
    """The config names features for dataset-level attribution (listed, top N, or trace roots)."""
    fi = cfg.feature_inputs
    feature_roots = [r for r in cfg.trace.roots if r.layer is not None]  # logit roots name no feature
    return bool(fi.features or (fi.top and fi.layers) or (fi.roots and feature_roots))


def runs_replacement_eval(cfg: Config) -> bool:
    """Whether the train stage also evaluates every layer's transcoder spliced in at once."""
    return cfg.transcoders is None and len(cfg.activations.layers) > 1 and cfg.train.eval_ce_rows > 0


class StageEntry(NamedTuple):
    """One task run of the pipeline as `circuitflow plan` lists it."""

    label: str
    """The stage, with the layer or split: `train[1]`, `tokens[mine]`."""
    stage: str
    key: str
    section: str
    """The config section holding the stage's settings."""


def stage_entries(cfg: Config, plan: Plan) -> list[StageEntry]:
    """Every task run of the pipeline for this config, in order, with its key."""
    out = [
        StageEntry("tokens[train]", "tokens", plan.tokens_train, "tokens"),
        StageEntry("tokens[mine]", "tokens", plan.tokens_mine, "tokens"),
        StageEntry("activations", "activations", plan.activations, "activations"),
    ]
    if cfg.transcoders is None:
        out += [StageEntry(f"train[{layer}]", "train", key, "train") for layer, key in sorted(plan.train.items())]
    if runs_replacement_eval(cfg):
        out.append(StageEntry(EVAL_STAGE, EVAL_STAGE, replacement_key(cfg, plan.train), "train"))
    out.append(StageEntry("mine", "mine", plan.mine, "mine"))
    if cfg.trace.roots:
        out.append(StageEntry("trace", "trace", plan.trace, "trace"))
    if wants_feature_inputs(cfg):
        out.append(StageEntry("feature_inputs", "feature_inputs", plan.feature_inputs, "feature_inputs"))
    return out


def check_config(cfg: Config) -> None:
    """Pre-flight: the model exists and has the configured layers, trace roots sit on layers that get
    a transcoder, the corpus is large enough for the token rows, and external transcoders fit the model.
    Raises a one-line UserError."""
    from core.activations import check_capture_config
    from core.model import folded_config, model_config, model_info

    info = model_info(cfg.model.name)
    cfg.check_layers(info.n_layers)
    check_resources(cfg, info.d_model)
    check_capture_config(
        folded_config(model_config(cfg.model.name)),
        cfg.activations.layers,
        cfg.activations.hook_in,
        cfg.activations.hook_out,
    )
    layers = set(cfg.activations.layers)
    for i, root in enumerate(cfg.trace.roots):
        if root.layer is not None and root.layer not in layers:
            raise ConfigError(
                f"trace.roots[{i}].layer: layer {root.layer} has no transcoder; "
                f"add it to activations.layers (now {sorted(layers)})"
            )
    for layer in [x for x, _ in cfg.feature_inputs.pairs()] + list(cfg.feature_inputs.layers):
        if layer not in layers:
            raise ConfigError(
                f"feature_inputs: layer {layer} has no transcoder; add it to activations.layers (now {sorted(layers)})"
            )
    if any(r.is_logit for r in cfg.trace.roots):
        from tasks.trace import logit_spec

        for root in (r for r in cfg.trace.roots if r.is_logit):
            logit_spec(cfg, root)
    check_corpus(cfg.corpus)
    if cfg.mine.corpus is not None:
        check_corpus(mine_corpus(cfg)[0])
    check_corpus_size(cfg)
    if cfg.transcoders is not None:
        check_external_transcoders(cfg, info)


def check_corpus(corpus: CorpusConfig) -> None:
    """The corpus opens and yields at least one document (hub datasets are opened by the stage)."""
    from core.corpus import CorpusError, iter_documents

    if corpus.source.startswith("hf:"):
        return
    docs = iter_documents(corpus.source, corpus.text_column, corpus.min_chars, corpus.split)
    if next(docs, None) is None:
        raise CorpusError(
            f"corpus {corpus.source!r}: no document of at least corpus.min_chars={corpus.min_chars} characters; "
            "add text or lower corpus.min_chars"
        )


_SIZE_CHECKED: set[str] = set()
"""Tokens keys whose corpus was found large enough in this process (the CLI and the flow both check)."""


def check_corpus_size(cfg: Config) -> None:
    """The corpus packs into tokens.train_rows training rows and the mining corpus into tokens.mine_rows
    rows. Found by tokenising documents only until enough tokens are seen; skipped for a split whose
    tokens artifact already exists (and for hub datasets, which the stage opens)."""
    mine, split = mine_corpus(cfg)
    wanted = [(cfg.corpus, "train", cfg.tokens.train_rows), (mine, split, cfg.tokens.mine_rows)]
    todo = []
    for corpus, name, rows in wanted:
        key = tokens_key(cfg, corpus, name, rows)
        complete = is_complete(stage_dir(cfg.store.root, "tokens", key))
        if not (complete or key in _SIZE_CHECKED or corpus.source.startswith("hf:")):
            todo.append((corpus, name, rows, key))
    if not todo:
        return
    from core.corpus import count_rows, iter_documents, take
    from core.model import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.name)
    for corpus in dict.fromkeys(c for c, *_ in todo):
        needed = {name: rows for c, name, rows, _ in todo if c == corpus}
        docs = iter_documents(corpus.source, corpus.text_column, corpus.min_chars, corpus.split)
        seen = [0]
        found = count_rows(_counted(take(docs, corpus.max_docs), seen), tokenizer, needed, cfg.tokens.context_size,
                           cfg.tokens.holdout_fraction)  # fmt: skip
        for name, rows in needed.items():
            if found[name] < rows:
                raise ConfigError(_too_small(cfg, corpus, name, found[name], seen[0] == corpus.max_docs))
    _SIZE_CHECKED.update(key for *_, key in todo)


def _counted(items: Iterator[str], seen: list[int]) -> Iterator[str]:
    for item in items:
        seen[0] += 1
        yield item


def _too_small(cfg: Config, corpus: CorpusConfig, split: str, found: int, capped: bool) -> str:
    """One line: which rows setting the corpus cannot fill, by how much, and what to change (raising
    corpus.max_docs only helps when it stopped the reading)."""
    setting = "tokens.train_rows" if split == "train" else "tokens.mine_rows"
    rows = cfg.tokens.train_rows if split == "train" else cfg.tokens.mine_rows
    what = {
        "train": f"the training documents of {corpus.source!r}",
        "heldout": f"the held-out documents (tokens.holdout_fraction={cfg.tokens.holdout_fraction}) of {corpus.source!r}",
        "all": f"mine.corpus {corpus.source!r}",
    }[split]
    larger = (["tokens.holdout_fraction"] if split == "heldout" else []) + (["corpus.max_docs"] if capped else [])
    fixes = ["add text", *([f"raise {' or '.join(larger)}"] if larger else []), f"lower {setting}"]
    return (
        f"{setting}: the corpus yields only {found} rows of {cfg.tokens.context_size} tokens but {rows} are needed "
        f"({what}); {', '.join(fixes[:-1])} or {fixes[-1]}"
    )


def check_external_transcoders(cfg: Config, info: Any) -> None:
    """Every configured layer has an external transcoder whose hooks and widths fit the model."""
    from storage.checkpoints import check_fits, load_transcoders

    assert cfg.transcoders is not None
    external_transcoder_files(cfg.transcoders)
    found = load_transcoders(cfg.transcoders)
    hooks = (cfg.activations.hook_in, cfg.activations.hook_out)
    for layer in cfg.activations.layers:
        if layer not in found:
            raise ConfigError(
                f"transcoders: {cfg.transcoders!r} has no transcoder for layer {layer} "
                f"(found layers {sorted(found)}); set activations.layers to those layers"
            )
        check_fits(found[layer], info, layer, hooks)
