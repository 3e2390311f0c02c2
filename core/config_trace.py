"""The analysis sections: feature mining, circuit tracing (its roots) and the dataset-level feature inputs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from core.config_base import ConfigError, _Section


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
