"""Experiment configuration: frozen dataclasses loaded from YAML, validated before any heavy work.

Every stage reads one section; a section's ``digest()`` is part of that stage's content key, so a
changed setting reruns exactly the stages that read it (and everything downstream).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from core.config_base import ConfigError, _plain, _Section  # noqa: F401 (re-exported)
from core.config_convert import _convert  # noqa: F401 (re-exported)
from core.config_convert import from_dict as _from_data
from core.config_data import ActivationsConfig, CorpusConfig, ModelConfig, TokensConfig
from core.config_trace import FeatureInputsConfig, MineConfig, RootConfig, TraceConfig  # noqa: F401 (re-exported)
from core.config_train import TOPK_ACTIVATIONS, SweepConfig, TrainConfig  # noqa: F401 (re-exported)
from core.experiment_config import ExperimentsConfig


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


def from_dict(data: dict[str, Any] | None, cls: type = Config, where: str = "") -> Any:
    """Build a config dataclass (default: the whole Config) from plain data, with one-line errors for unknown
    keys and types."""
    return _from_data(data, cls, where)


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
