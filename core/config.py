"""Experiment configuration: frozen dataclasses loaded from YAML, validated before any heavy work.

Every stage reads one section; a section's ``digest()`` is part of that stage's content key, so a
changed setting reruns exactly the stages that read it (and everything downstream).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from core.config_base import ConfigError, _plain, _Section  # noqa: F401 (re-exported)
from core.experiment_config import ExperimentsConfig


@dataclass(frozen=True)
class ModelConfig(_Section):
    name: str = "bundled:smollm2-135m"
    """Model spec: a TransformerLens name (hub), a local Hugging Face folder, `bundled:smollm2-135m`,
    or `tiny:<preset>` for tests."""
    device: str = "auto"
    """`auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`. Not part of any content key."""
    dtype: Literal["float32", "float16", "bfloat16", "float64"] = "float32"
    """Dtype the model runs in."""


@dataclass(frozen=True)
class CorpusConfig(_Section):
    source: str = "bundled:docstrings"
    """A folder of .txt files, a .jsonl/.parquet file with a text column, an HF dataset id
    (`hf:owner/name`, needs network) or `bundled:docstrings`."""
    text_column: str = "text"
    """Column holding the text in JSONL/Parquet/HF sources."""
    min_chars: int = 200
    """Documents shorter than this many characters are skipped."""
    max_docs: int | None = 4000
    """Read at most this many documents (after the length filter, before the train/held-out split); None for all."""
    split: str = "train"
    """Split of an HF dataset."""


@dataclass(frozen=True)
class TokensConfig(_Section):
    context_size: int = 128
    """Tokens per packed row, BOS included."""
    train_rows: int = 2048
    """Rows of training tokens."""
    mine_rows: int = 512
    """Rows of held-out tokens for feature mining."""
    holdout_fraction: float = 0.1
    """Fraction of documents held out from training for mining (when mining uses the same corpus)."""
    seed: int = 0
    """Seed for the document shuffle."""


@dataclass(frozen=True)
class ActivationsConfig(_Section):
    layers: tuple[int, ...] = (0, 1, 2, 3)
    """Layers whose MLP (input, output) pairs are cached and get a transcoder."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Storage dtype of cached activations."""
    drop_bos: bool = True
    """Drop BOS positions (outliers that dominate training)."""
    batch_rows: int = 8
    """Token rows per forward pass. Not part of the content key."""
    shard_tokens: int = 65536
    """Maximum tokens per shard file (a shard always holds whole token rows, at least one)."""
    hook_in: str = "blocks.{layer}.ln2.hook_normalized"
    """Hook of the transcoder input, `{layer}` replaced by the layer (default: the MLP's input)."""
    hook_out: str = "blocks.{layer}.hook_mlp_out"
    """Hook of the transcoder target, `{layer}` replaced by the layer (default: the MLP's output)."""

    def __post_init__(self) -> None:
        for name in ("hook_in", "hook_out"):
            template = getattr(self, name)
            rest = template.replace("{layer}", "")
            if "{layer}" not in template or "{" in rest or "}" in rest:
                raise ConfigError(
                    f"activations.{name}: {template!r} must name the layer as {{layer}} and nothing else in braces, "
                    f"e.g. 'blocks.{{layer}}.hook_mlp_out'"
                )


@dataclass(frozen=True)
class TrainConfig(_Section):
    activation: Literal["relu", "topk", "jumprelu"] = "relu"
    """Feature activation function; relu + L1 is the paper's."""
    kind: Literal["transcoder", "skip_transcoder", "sae_mlp_out", "sae_mlp_in"] = "transcoder"
    """What to train: a transcoder (MLP in -> MLP out), with a skip connection, or an SAE on one side."""
    expansion_factor: int = 4
    """d_sae = expansion_factor * d_model."""
    k: int = 32
    """Active features per token for topk."""
    l1_coefficient: float = 1e-3
    """Weight of the decoder-norm-weighted L1 penalty (relu)."""
    l0_coefficient: float = 1e-3
    """Weight of the L0 penalty (jumprelu)."""
    jumprelu_init_threshold: float = 1e-3
    """Initial threshold (jumprelu)."""
    jumprelu_bandwidth: float = 1e-3
    """Straight-through estimator bandwidth (jumprelu)."""
    lr: float = 1e-3
    """Adam learning rate."""
    lr_schedule: Literal["constant", "warmup", "linear", "cosine"] = "constant"
    """constant; constant after linear warm-up; warm-up then linear decay to 0; warm-up then cosine."""
    warmup_steps: int = 100
    """Warm-up steps for schedules that warm up."""
    batch_size: int = 1024
    """Tokens per optimiser step."""
    epochs: int = 3
    """Passes over the cached training tokens."""
    init_b_dec: Literal["mean", "geometric_median", "zeros"] = "mean"
    """Initialisation of the input pre-bias."""
    dead_window: int = 1000
    """Steps without firing after which a feature counts as dead."""
    dead_revival: Literal["none", "resample", "ghost_grads"] = "none"
    """How to revive dead features."""
    resample_every: int = 2000
    """Steps between resampling rounds (dead_revival: resample)."""
    aux_k_coefficient: float = 1 / 32
    """Weight of the TopK auxiliary loss on dead features (topk)."""
    eval_fraction: float = 0.05
    """Fraction of cached tokens held out for evaluation (FVU, L0)."""
    eval_ce_rows: int = 32
    """Held-out token rows for the spliced cross-entropy evaluation."""
    checkpoint_every: int = 500
    """Steps between resumable checkpoints."""
    autocast_bf16: bool = False
    """Run the forward pass under bfloat16 autocast (GPU)."""
    seed: int = 0
    """Seed for init and data order."""
    lr_final_fraction: float = 0.0
    """linear/cosine schedules decay to this fraction of lr at the last step."""
    sparsity_warmup_steps: int = 0
    """Steps over which the sparsity coefficient ramps linearly from 0 (0 = no ramp)."""
    normalize_decoder: bool = True
    """Keep decoder rows at unit norm (renormalise after each step, remove the parallel gradient)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    init_tokens: int = 32768
    """Sampled training tokens used to initialise b_dec and b_dec_out."""
    resample_tokens: int = 32768
    """Sampled training tokens scored when resampling dead features."""
    log_every: int = 1
    """Steps between logged metric rows (and finiteness checks); the last step is always logged."""

    def __post_init__(self) -> None:
        for name in ("init_tokens", "resample_tokens", "log_every"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"train.{name}: must be > 0, got {getattr(self, name)!r}")
        if self.sparsity_warmup_steps < 0:
            raise ConfigError(f"train.sparsity_warmup_steps: must be >= 0, got {self.sparsity_warmup_steps!r}")
        for name in ("lr_final_fraction", "adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"train.{name}: must be between 0 and 1, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class MineConfig(_Section):
    corpus: str | None = None
    """Mining corpus source; None = the held-out split of the training corpus."""
    top_k: int = 20
    """Top examples kept per feature."""
    num_bands: int = 10
    """Activation bands for the banded examples."""
    per_band: int = 3
    """Examples per band."""
    histogram_bins: int = 20
    """Bins of the per-feature activation histogram."""
    batch_rows: int = 8
    """Token rows per forward pass. Not part of the content key."""
    view_top: int = 10
    """Tokens/features kept per input-invariant view."""
    skip_bos: bool = True
    """Do not mine BOS tokens (row starts and document separators): attention sinks whose outlier
    activations would crowd out every feature's top examples."""
    dashboard_pages: int = 16
    """Feature pages the pipeline writes per layer (its most frequent features; 0 for none), linked
    from the index. Any feature's page on demand: `circuitflow feature L F --html FILE`."""


@dataclass(frozen=True)
class RootConfig(_Section):
    prompt: str
    """The prompt to trace on."""
    layer: int | None = None
    """Transcoder layer of the root feature. Without `layer` (and without `logit` / `logit_diff`)
    the root is the logit of the model's top predicted token at `pos`."""
    feature: int | None = None
    """Root feature index. When omitted (or null) the root is the feature of `layer` with the largest
    activation at `pos` on this prompt (the largest pre-activation if none fires), chosen at trace
    time and recorded in the trace outputs (manifest, nodes, graph.json) like a given index."""
    pos: int = -1
    """Token position (negative counts from the end)."""
    logit: str | None = None
    """Root = the logit of this token (a string that encodes to one token, e.g. " the") at `pos`."""
    logit_diff: tuple[str, ...] | None = None
    """Root = logit of the first token minus logit of the second, e.g. [" is", " are"]."""

    def __post_init__(self) -> None:
        if self.logit_diff is not None and len(self.logit_diff) != 2:
            raise ConfigError(
                f"trace.roots[].logit_diff: give two tokens, e.g. [' is', ' are'], got {self.logit_diff!r}"
            )
        if self.logit is not None and self.logit_diff is not None:
            raise ConfigError("trace.roots[]: give `logit` or `logit_diff`, not both")
        named = self.logit is not None or self.logit_diff is not None
        if named and (self.layer is not None or self.feature is not None):
            raise ConfigError("trace.roots[]: a logit root takes no `layer` or `feature`; remove them or the logit")
        if self.feature is not None and self.layer is None:
            raise ConfigError(f"trace.roots[]: feature {self.feature} needs its `layer`")

    @property
    def is_logit(self) -> bool:
        """The root is a logit (given, a difference, or the top prediction when no layer is given)."""
        return self.logit is not None or self.logit_diff is not None or self.layer is None

    def logit_tokens(self) -> tuple[str | None, str | None]:
        """(token, other) strings of a logit root; (None, None) for the top prediction."""
        if self.logit_diff is not None:
            return self.logit_diff[0], self.logit_diff[1]
        return self.logit, None


@dataclass(frozen=True)
class TraceConfig(_Section):
    roots: tuple[RootConfig, ...] = ()
    """Roots traced by the pipeline's trace stage."""
    num_iters: int = 3
    """Path-search iterations (path length)."""
    num_branches: int = 15
    """Beam width of the path search."""
    signed: bool = False
    """Rank by signed contribution (the original behaviour) instead of |contribution|."""
    skip_bos: bool = True
    """Skip attention edges from the BOS token."""
    cap_heads: bool = False
    """Path search: each parent offers at most n_heads (head, source) children per attention layer,
    as the original search did (with signed ranking, this reproduces its path set)."""
    node_threshold: float = 0.8
    """Full graph pruning: keep nodes explaining this fraction of influence."""
    edge_threshold: float = 0.98
    """Full graph pruning: keep edges explaining this fraction of influence."""
    full: bool = True
    """The trace stage also builds a pruned full attribution graph per root (all active features)."""
    max_features: int | None = 2048
    """Full graph: trace at most this many features (largest |total attribution|); the others become
    exact frozen per-token sources. None: every active feature."""
    dtype: Literal["float32", "float64"] = "float32"
    """Precision of the attribution arithmetic (the model runs in model.dtype); float64 halves the
    speed of the full graph and makes its sums exact to ~1e-12 instead of ~1e-6."""

    def __post_init__(self) -> None:
        if self.max_features is not None and self.max_features < 1:
            raise ConfigError(f"trace.max_features: must be >= 1 or null, got {self.max_features!r}")


@dataclass(frozen=True)
class FeatureInputsConfig(_Section):
    features: tuple[str, ...] = ()
    """Features whose mean inputs the feature_inputs stage computes, as "L:F" (e.g. "3:496")."""
    top: int = 0
    """Also the `top` most frequently firing features of each layer in `layers`."""
    layers: tuple[int, ...] = ()
    """Layers whose most frequent features are analysed (with `top`)."""
    roots: bool = False
    """Also the trace roots' features (a root without `feature`: the one the trace stage chooses)."""
    max_contexts: int | None = 256
    """Per feature, at most this many held-out contexts where it fires (the strongest activations
    first); None: every one."""
    dtype: Literal["float32", "float64"] = "float32"
    """Precision of the attribution arithmetic."""

    def __post_init__(self) -> None:
        for text in self.features:
            if not re.fullmatch(r"\d+:\d+", str(text)):
                raise ConfigError(f"feature_inputs.features: {text!r} is not LAYER:FEATURE, e.g. '3:496'")
        if self.top < 0:
            raise ConfigError(f"feature_inputs.top: must be >= 0, got {self.top!r}")
        if self.max_contexts is not None and self.max_contexts < 1:
            raise ConfigError(f"feature_inputs.max_contexts: must be >= 1 or null, got {self.max_contexts!r}")

    def pairs(self) -> list[tuple[int, int]]:
        """The listed features as (layer, feature)."""
        return [tuple(int(x) for x in str(text).split(":")) for text in self.features]  # type: ignore[misc]


@dataclass(frozen=True)
class StoreConfig(_Section):
    root: str = "./store"
    """Store root directory; every artifact lives under it."""


@dataclass(frozen=True)
class RunnerConfig(_Section):
    kind: Literal["threads", "dask", "ray"] = "threads"
    """Task runner for fan-out stages."""
    address: str | None = None
    """Scheduler address for dask/ray; None starts a local cluster."""
    max_workers: int = 2
    """Concurrent tasks (threads runner) or local workers."""
    torch_threads: int = 2
    """torch.set_num_threads for stage work."""
    gpu_tag: str | None = "gpu"
    """Prefect concurrency-limit tag for the tasks that run the model (activations, train, mine,
    trace). When a limit exists for it (`prefect concurrency-limit create gpu 1`) those tasks carry
    the tag and never oversubscribe one device; with no limit they run untagged. None: never tag."""


@dataclass(frozen=True)
class SweepConfig(_Section):
    grid: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    """Train settings to sweep and their values, e.g. `{l1_coefficient: [1e-4, 1e-3], expansion_factor: [4, 8]}`:
    every combination is a point, trained as the base `train` section with `train.<name>` overridden."""
    kinds: tuple[Literal["transcoder", "skip_transcoder", "sae_mlp_out", "sae_mlp_in"], ...] = ()
    """What is trained at every grid point (values of train.kind); empty: train.kind alone."""
    layers: tuple[int, ...] = ()
    """Layers swept, among activations.layers; empty: every layer of activations.layers."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(TrainConfig)
        grid = {}
        for name, values in self.grid.items():
            where = f"sweep.grid.{name}"
            if name == "kind":
                raise ConfigError(f"{where}: list kinds under sweep.kinds, e.g. kinds: [transcoder, sae_mlp_out]")
            if name not in hints:
                close = difflib.get_close_matches(str(name), list(hints), n=1)
                hint = f"did you mean {close[0]!r}?" if close else "sweep the fields of the train section"
                raise ConfigError(f"{where}: unknown train setting; {hint}")
            if not isinstance(values, (list, tuple)) or not values:
                raise ConfigError(f"{where}: list at least one value, e.g. {name}: [{getattr(TrainConfig(), name)!r}]")
            typed = tuple(_convert(v, hints[name], f"{where}[{i}]") for i, v in enumerate(values))
            if len(set(map(repr, typed))) != len(typed):
                raise ConfigError(f"{where}: a value is listed twice in {list(typed)}")
            grid[str(name)] = typed
        object.__setattr__(self, "grid", grid)
        for name in ("kinds", "layers"):
            if len(set(getattr(self, name))) != len(getattr(self, name)):
                raise ConfigError(f"sweep.{name}: duplicates in {list(getattr(self, name))}")

    def __hash__(self) -> int:  # the grid is a dict; hash the content instead
        return hash(self.digest())


@dataclass(frozen=True)
class Config(_Section):
    model: ModelConfig = field(default_factory=ModelConfig)
    """The language model."""
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    """Training (and by default mining) text."""
    tokens: TokensConfig = field(default_factory=TokensConfig)
    """Tokenisation and packing."""
    activations: ActivationsConfig = field(default_factory=ActivationsConfig)
    """Activation caching."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Transcoder training."""
    mine: MineConfig = field(default_factory=MineConfig)
    """Feature mining."""
    trace: TraceConfig = field(default_factory=TraceConfig)
    """Circuit tracing."""
    feature_inputs: FeatureInputsConfig = field(default_factory=FeatureInputsConfig)
    """Dataset-level attribution: the mean inputs of chosen features over the held-out contexts."""
    store: StoreConfig = field(default_factory=StoreConfig)
    """Where artifacts go."""
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    """How tasks run."""
    sweep: SweepConfig = field(default_factory=SweepConfig)
    """The sparsity/fidelity sweep of `circuitflow sweep` (no effect on `circuitflow run`)."""
    experiments: ExperimentsConfig = field(default_factory=ExperimentsConfig)
    """Batches of interventions run by the experiments flow (no effect on `circuitflow run`)."""
    transcoders: str | None = None
    """Path or glob of external transcoders; when set, training is skipped."""

    def __post_init__(self) -> None:
        _check_ranges(self)

    def check_layers(self, n_layers: int) -> None:
        """Raise ConfigError when a configured layer does not exist in a model of n_layers."""
        for where, layer in [("activations.layers", x) for x in self.activations.layers] + [
            ("trace.roots[].layer", r.layer) for r in self.trace.roots if r.layer is not None
        ]:
            if not 0 <= layer < n_layers:
                raise ConfigError(
                    f"{where}: layer {layer} is out of range; model {self.model.name!r} has layers 0..{n_layers - 1}"
                )


_POSITIVE = {
    "tokens.context_size",
    "tokens.train_rows",
    "activations.batch_rows",
    "activations.shard_tokens",
    "train.expansion_factor",
    "train.k",
    "train.batch_size",
    "train.epochs",
    "train.dead_window",
    "train.resample_every",
    "train.checkpoint_every",
    "train.lr",
    "mine.top_k",
    "mine.num_bands",
    "mine.per_band",
    "mine.histogram_bins",
    "mine.batch_rows",
    "mine.view_top",
    "trace.num_iters",
    "trace.num_branches",
    "runner.max_workers",
    "runner.torch_threads",
}
_NON_NEGATIVE = {
    "tokens.mine_rows",
    "corpus.min_chars",
    "train.l1_coefficient",
    "train.l0_coefficient",
    "train.warmup_steps",
    "train.eval_ce_rows",
    "train.aux_k_coefficient",
    "mine.dashboard_pages",
}
_FRACTIONS = {
    "tokens.holdout_fraction",
    "train.eval_fraction",
    "trace.node_threshold",
    "trace.edge_threshold",
}


def _check_ranges(cfg: Config) -> None:
    for section, part in vars(cfg).items():  # every float setting is finite (.inf passes `> 0`)
        for name, value in vars(part).items() if dataclasses.is_dataclass(part) else ():
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{section}.{name}: must be a finite number, got {value!r}")
    for dotted in _POSITIVE | _NON_NEGATIVE | _FRACTIONS:
        section, name = dotted.split(".")
        value = getattr(getattr(cfg, section), name)
        if dotted in _POSITIVE and not value > 0:
            raise ConfigError(f"{dotted}: must be > 0, got {value!r}")
        if dotted in _NON_NEGATIVE and not value >= 0:
            raise ConfigError(f"{dotted}: must be >= 0, got {value!r}")
        if dotted in _FRACTIONS and not 0 <= value <= 1:
            raise ConfigError(f"{dotted}: must be between 0 and 1, got {value!r}")
    if cfg.tokens.context_size < 2:
        raise ConfigError("tokens.context_size: must be >= 2 (BOS plus at least one token)")
    if not cfg.activations.layers:
        raise ConfigError("activations.layers: list at least one layer, e.g. [0, 1]")
    if len(set(cfg.activations.layers)) != len(cfg.activations.layers):
        raise ConfigError(f"activations.layers: duplicate layers in {list(cfg.activations.layers)}")
    if any(x < 0 for x in cfg.activations.layers):
        raise ConfigError(f"activations.layers: layers must be >= 0, got {list(cfg.activations.layers)}")


# ---------------------------------------------------------------- building from plain data


def from_dict(data: dict[str, Any] | None, cls: type = Config, where: str = "") -> Any:
    """Build a config dataclass from plain data, with one-line errors for unknown keys and types."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"{_join(where, str(key))}: unknown key{hint}")
    kwargs = {k: _convert(v, hints[k], _join(where, k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{where or 'config'}: {exc}") from None
    except ConfigError as exc:  # a list item's own check names the list (`x[]`): name the item
        generic = re.sub(r"\[\d+\]$", "[]", where)
        if where and generic != where and str(exc).startswith(generic + ":"):
            raise ConfigError(where + str(exc)[len(generic) :]) from None
        raise


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not allowed; choose one of {', '.join(map(repr, args))}")
        return value
    if tp is Any:  # plain YAML data, checked by the section that holds it
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of keys, got {value!r}")
        return {str(k): _convert(v, args[1], _join(where, str(k))) for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return from_dict(value, tp, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `2e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover - programming error


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides (value parsed as YAML) to a nested dict, returning a new dict."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.l1_coefficient=2e-4")
        dotted, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = data
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {dotted}: {part!r} is not a section")
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (None = all defaults), apply `--set` overrides, validate."""
    data: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or "malformed YAML"
            raise ConfigError(f"{path}: malformed YAML{at}: {problem}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    data = apply_overrides(data, overrides or [])
    return from_dict(data)
