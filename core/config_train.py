"""The training sections: how one transcoder trains (`train`) and the grid `circuitflow sweep` trains."""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from core.config_base import ConfigError, _Section
from core.config_convert import _convert

TOPK_ACTIVATIONS = ("topk", "batchtopk")
"""The activations that keep the k largest pre-activations (per token, or k * batch per batch)."""


@dataclass(frozen=True)
class TrainConfig(_Section):
    activation: Literal["relu", "topk", "batchtopk", "jumprelu"] = "relu"
    """Feature activation function; relu + L1 is the paper's. batchtopk keeps the k * batch_size largest
    activations of each batch while training and is saved as JumpReLU with the threshold it learned."""
    kind: Literal["transcoder", "skip_transcoder", "sae_mlp_out", "sae_mlp_in"] = "transcoder"
    """What to train: a transcoder (MLP in -> MLP out), with a skip connection, or an SAE on one side."""
    expansion_factor: int = 4
    """d_sae = expansion_factor * d_model."""
    k: int = 32
    """Active features per token for topk (on average for batchtopk)."""
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
    """Weight of the TopK auxiliary loss on dead features (topk, batchtopk)."""
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
