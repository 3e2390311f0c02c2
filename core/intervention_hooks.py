"""What an intervention is, how it is checked, and the TransformerLens hooks that apply it.

Every layer with a transcoder is spliced in: its features z are computed from the transcoder's input u,
an intervention edits them to z', and the MLP output becomes

    recomputed:  x + (z' - z) W_dec                                   z = act(pre(u))
    frozen:      x_clean + (z' - z_clean) W_dec + (u - u_clean) W_skip  z = z_clean + (pre - pre_clean) * [z_clean != 0]

where x is the real MLP output, so the transcoder's error x - tc(u) is kept (live when recomputed, fixed
at its clean value when frozen) and an empty intervention reproduces the model exactly. Frozen runs also
replace every attention pattern and normalisation scale by its clean value and every MLP without a
transcoder by its clean output: the linearised model the attribution graph describes, in which features
respond linearly on their clean active set.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from core.errors import UserError
from core.intervention_spec import Spec
from core.transcoder import Transcoder

Hook = tuple[str, Callable[..., Tensor]]


class InterventionError(UserError, ValueError):
    """An intervention the model or its transcoders cannot take, in one line."""


def _at(pos: int | None) -> str:
    return "" if pos is None else f"@{pos}"


@dataclass(frozen=True)
class FeatureEdit:
    """Set, scale or add to a transcoder feature's activation (feature None: every feature of the layer)."""

    layer: int
    feature: int | None
    op: Literal["set", "scale", "add"]
    value: float
    pos: int | None = None
    """Token position (negative from the end of the prompt); None: every token."""

    @property
    def label(self) -> str:
        what = "*" if self.feature is None else self.feature
        return f"{self.op} {self.layer}:{what}={self.value:g}{_at(self.pos)}"


@dataclass(frozen=True)
class HeadAblation:
    """Zero attention head `head` of `layer` (its `hook_z` output) at `pos` or every token."""

    layer: int
    head: int
    pos: int | None = None

    @property
    def label(self) -> str:
        return f"ablate head {self.layer}.{self.head}{_at(self.pos)}"


@dataclass(frozen=True)
class MlpAblation:
    """Zero the whole output of MLP `layer` (transcoder, error and all) at `pos` or every token."""

    layer: int
    pos: int | None = None

    @property
    def label(self) -> str:
        return f"ablate MLP {self.layer}{_at(self.pos)}"


@dataclass(frozen=True)
class Steering:
    """Add `strength` times feature `feature`'s decoder row to MLP `layer`'s output at `pos` or every token."""

    layer: int
    feature: int
    strength: float
    pos: int | None = None

    @property
    def label(self) -> str:
        return f"steer {self.layer}:{self.feature}={self.strength:g}{_at(self.pos)}"


Intervention = FeatureEdit | HeadAblation | MlpAblation | Steering


def ablate_feature(layer: int, feature: int, pos: int | None = None) -> FeatureEdit:
    """Zero-ablate one feature."""
    return FeatureEdit(layer, feature, "set", 0.0, pos)


def ablate_layer(layer: int, pos: int | None = None) -> FeatureEdit:
    """Zero-ablate every feature of a layer's transcoder (its error term stays)."""
    return FeatureEdit(layer, None, "set", 0.0, pos)


def from_spec(spec: Spec) -> Intervention:
    """The intervention a parsed spec describes."""
    if spec.kind == "ablate":
        return ablate_feature(spec.layer, spec.index, spec.pos)
    if spec.kind in ("clamp", "scale"):
        return FeatureEdit(spec.layer, spec.index, "set" if spec.kind == "clamp" else "scale", spec.value, spec.pos)
    if spec.kind == "steer":
        return Steering(spec.layer, spec.index, spec.value, spec.pos)
    if spec.kind == "ablate_head":
        return HeadAblation(spec.layer, spec.index, spec.pos)
    return MlpAblation(spec.layer, spec.pos)


# ---------------------------------------------------------------- checks (no model needed)


class Shapes(NamedTuple):
    """What checking an intervention needs to know: the model's and transcoders' sizes, the prompt's length."""

    n_layers: int
    n_heads: int
    d_sae: dict[int, int]
    """Features of each layer's transcoder."""
    n_pos: int


def check(interventions: Sequence[Intervention], shapes: Shapes) -> list[Intervention]:
    """The interventions with positions made non-negative; InterventionError for the first bad one."""
    return [_check_one(iv, shapes) for iv in interventions]


def _check_one(iv: Intervention, shapes: Shapes) -> Intervention:
    if not 0 <= iv.layer < shapes.n_layers:
        raise InterventionError(f"{iv.label}: layer {iv.layer} is out of range; the model has 0..{shapes.n_layers - 1}")
    if isinstance(iv, (FeatureEdit, Steering)):
        if iv.layer not in shapes.d_sae:
            have = ", ".join(map(str, sorted(shapes.d_sae))) or "none"
            raise InterventionError(f"{iv.label}: layer {iv.layer} has no transcoder; layers with one: {have}")
        d_sae = shapes.d_sae[iv.layer]
        if iv.feature is not None and not 0 <= iv.feature < d_sae:
            raise InterventionError(
                f"{iv.label}: feature {iv.feature} is out of range; layer {iv.layer}'s transcoder has 0..{d_sae - 1}"
            )
    if isinstance(iv, HeadAblation) and not 0 <= iv.head < shapes.n_heads:
        raise InterventionError(
            f"{iv.label}: head {iv.head} is out of range; layers have heads 0..{shapes.n_heads - 1}"
        )
    if iv.pos is None:
        return iv
    if not -shapes.n_pos <= iv.pos < shapes.n_pos:
        raise InterventionError(
            f"{iv.label}: position {iv.pos} is out of range; the prompt has {shapes.n_pos} tokens "
            f"(0..{shapes.n_pos - 1}, or negative from the end)"
        )
    return replace(iv, pos=iv.pos % shapes.n_pos)


# ---------------------------------------------------------------- hooks


class Clean(NamedTuple):
    """The clean run a frozen intervention holds fixed (batch of one)."""

    cache: dict[str, Tensor]
    """Attention patterns, norm scales, MLP outputs and transcoder inputs."""
    pre: dict[int, Float[Tensor, "1 pos d_sae"]]
    z: dict[int, Float[Tensor, "1 pos d_sae"]]


Record = dict[int, tuple[Tensor, Tensor]]
"""Per spliced layer: (pre-activations, activations after the edits), each [batch pos d_sae]."""


def mlp_out_hook(layer: int) -> str:
    return f"blocks.{layer}.hook_mlp_out"


def build_hooks(
    transcoders: Mapping[int, Transcoder],
    n_layers: int,
    interventions: Sequence[Intervention],
    record: Record,
    clean: Clean | None = None,
) -> list[Hook]:
    """Hooks that splice the transcoders in and apply checked `interventions`; `clean` freezes the run."""
    hooks: list[Hook] = []
    if clean is not None:
        hooks += [(n, _constant(v)) for n, v in clean.cache.items() if n.endswith(("hook_pattern", "hook_scale"))]
    inputs: dict[int, Tensor] = {}
    for layer, tc in transcoders.items():
        hooks.append((tc.cfg.hook_in, _capture(inputs, layer)))
    for layer in range(n_layers):
        mine = [iv for iv in interventions if iv.layer == layer and not isinstance(iv, HeadAblation)]
        if layer in transcoders:
            splice = _Splice(transcoders[layer], layer, mine, inputs, record, clean)
            hooks.append((mlp_out_hook(layer), splice))
        elif clean is not None or mine:
            hooks.append((mlp_out_hook(layer), _plain_mlp(layer, mine, clean)))
    for iv in interventions:
        if isinstance(iv, HeadAblation):
            hooks.append((f"blocks.{iv.layer}.attn.hook_z", _zero_head(iv.head, iv.pos)))
    return hooks


def _constant(value: Tensor) -> Callable[..., Tensor]:
    return lambda x, hook: value


def _capture(inputs: dict[int, Tensor], layer: int) -> Callable[..., Tensor]:
    def hook(x: Tensor, hook: Any) -> Tensor:
        inputs[layer] = x
        return x

    return hook


def _where(pos: int | None, index: int | None = None) -> tuple:
    return (slice(None), slice(None) if pos is None else pos) + (() if index is None else (index,))


class _Splice:
    """The MLP-output hook of a layer with a transcoder (see the module docstring)."""

    def __init__(self, tc: Transcoder, layer: int, mine: list, inputs: dict, record: Record, clean: Clean | None):
        self.tc, self.layer, self.mine, self.inputs, self.record, self.clean = tc, layer, mine, inputs, record, clean

    def __call__(self, x: Float[Tensor, "batch pos d_model"], hook: Any) -> Tensor:
        tc, u = self.tc, self.inputs[self.layer]
        pre = tc.pre_acts(u)
        if self.clean is None:
            z, base = tc.activate(pre), x
        else:
            z_clean = self.clean.z[self.layer]
            z = z_clean + (pre - self.clean.pre[self.layer]) * (z_clean != 0)
            base = self.clean.cache[mlp_out_hook(self.layer)]
            if tc.W_skip is not None:
                base = base + (u - self.clean.cache[tc.cfg.hook_in]) @ tc.W_skip
        edited = _edit(z, [iv for iv in self.mine if isinstance(iv, FeatureEdit)])
        self.record[self.layer] = (pre, edited)
        clean_z = z if self.clean is None else self.clean.z[self.layer]
        out = base if edited is clean_z else base + (edited - clean_z) @ tc.W_dec
        for iv in self.mine:
            if isinstance(iv, Steering):
                add = torch.zeros_like(out)
                add[_where(iv.pos)] = iv.strength * tc.W_dec[iv.feature]
                out = out + add
        return _ablate_mlp(out, self.mine)


def _edit(z: Tensor, edits: list[FeatureEdit]) -> Tensor:
    """z with the edits applied in order (z itself when there are none)."""
    if not edits:
        return z
    z = z.clone()
    for e in edits:
        at = _where(e.pos, e.feature)
        if e.op == "set":
            z[at] = e.value
        elif e.op == "scale":
            z[at] *= e.value
        else:
            z[at] += e.value
    return z


def _plain_mlp(layer: int, mine: list, clean: Clean | None) -> Callable[..., Tensor]:
    """An MLP without a transcoder: frozen at its clean output (frozen runs), then any ablation."""

    def hook(x: Tensor, hook: Any) -> Tensor:
        return _ablate_mlp(x if clean is None else clean.cache[mlp_out_hook(layer)], mine)

    return hook


def _ablate_mlp(out: Tensor, mine: list) -> Tensor:
    for iv in mine:
        if isinstance(iv, MlpAblation):
            out = out.clone()
            out[_where(iv.pos)] = 0.0
    return out


def _zero_head(head: int, pos: int | None) -> Callable[..., Tensor]:
    def hook(z: Float[Tensor, "batch pos head d_head"], hook: Any) -> Tensor:
        z = z.clone()
        z[_where(pos) + (head,)] = 0.0
        return z

    return hook
