"""The frozen prompt that attribution linearises around (Dunefsky, Chlenski & Nanda, NeurIPS 2024, App. D).

`prepare` runs the model once and freezes what the linearised model holds fixed: attention patterns,
normalisation scales (`FrozenNorm`) and transcoder errors, with the clean residual stream at every
site (`site`, `site_name`). `core.attribution` makes roots and splits nodes on top of this state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from core.errors import UserError
from core.transcoder import Transcoder


class AttributionError(UserError, ValueError):
    """A model, transcoder or root the tracer cannot handle, described in one line."""


# ---------------------------------------------------------------- residual sites
# Site 2l is resid_pre of layer l, 2l+1 its resid_mid, 2l+2 its resid_post (= resid_pre of l+1).


def site(layer: int, sublayer: Literal["pre", "mid", "post"]) -> int:
    """Index of a residual-stream site."""
    return 2 * layer + {"pre": 0, "mid": 1, "post": 2}[sublayer]


def site_name(index: int) -> str:
    """Human name of a site, e.g. `resid_mid 3`."""
    layer, odd = divmod(index, 2)
    return f"resid_mid {layer}" if odd else f"resid_pre {layer}"


# ---------------------------------------------------------------- frozen normalisation


@dataclass(frozen=True)
class FrozenNorm:
    """A normalisation with its scale frozen: x -> weight * P x / scale + bias, affine per token.

    P removes the mean (LayerNorm) or is the identity (RMSNorm). With the scale frozen the map is
    linear up to `bias`, so a vector read after the norm pulls back to a vector before it.
    """

    scale: Float[Tensor, " pos"]
    center: bool = False
    weight: Float[Tensor, " d_model"] | None = None
    bias: Float[Tensor, " d_model"] | None = None

    def apply(self, x: Float[Tensor, "pos d_model"]) -> Float[Tensor, "pos d_model"]:
        """The norm's output with the frozen scale (equals the real output at the clean input)."""
        if self.center:
            x = x - x.mean(-1, keepdim=True)
        out = x / self.scale[: x.shape[0], None]
        if self.weight is not None:
            out = out * self.weight
        return out if self.bias is None else out + self.bias

    def pull(self, vec: Float[Tensor, "... d_model"], pos: int | slice | Tensor) -> Float[Tensor, "... d_model"]:
        """The vector u with u . x = vec . (norm(x) - bias) for x at token(s) `pos`."""
        if self.weight is not None:
            vec = vec * self.weight
        if self.center:
            vec = vec - vec.mean(-1, keepdim=True)
        scale = self.scale[pos]
        return vec / (scale[..., None] if scale.ndim else scale)

    def offset(self, vec: Float[Tensor, "... d_model"]) -> Float[Tensor, ...]:
        """vec . bias: the constant a vector reads from the norm's bias."""
        if self.bias is None:
            return torch.zeros(vec.shape[:-1], dtype=vec.dtype, device=vec.device)
        return vec @ self.bias


def frozen_norm(module: torch.nn.Module, scale: Tensor | None, n_pos: int, dtype: torch.dtype) -> FrozenNorm:
    """Freeze a TransformerLens norm module (LayerNorm[Pre], RMSNorm[Pre] or Identity) at `scale`."""
    name = type(module).__name__
    if name not in ("LayerNorm", "LayerNormPre", "RMSNorm", "RMSNormPre", "Identity"):
        raise AttributionError(f"normalisation {name} is not supported for tracing; use LayerNorm or RMSNorm models")
    if scale is None:
        scale = torch.ones(n_pos, dtype=dtype)
    weight = getattr(module, "w", None)
    bias = getattr(module, "b", None)
    return FrozenNorm(
        scale=scale.reshape(-1).to(dtype),
        center=name.startswith("LayerNorm"),
        weight=None if weight is None else weight.detach().to(dtype),
        bias=None if bias is None else bias.detach().to(dtype),
    )


# ---------------------------------------------------------------- the frozen prompt


class TranscoderWeights(NamedTuple):
    W_enc: Float[Tensor, "d_model d_sae"]
    b_enc: Float[Tensor, " d_sae"]
    W_dec: Float[Tensor, "d_sae d_model"]
    b_dec: Float[Tensor, " d_model"]
    """Input pre-bias."""
    b_dec_out: Float[Tensor, " d_model"]


@dataclass
class PromptState:
    """Everything the linearised model holds fixed for one prompt, plus the clean activations."""

    tokens: Int[Tensor, " pos"]
    n_layers: int
    """Layers run (the model may have more)."""
    parallel: bool
    """Attention and MLP read the same residual (GPT-J / NeoX style)."""
    resid: Float[Tensor, "site pos d_model"]
    """Residual stream at every site 0..2*n_layers."""
    pattern: Float[Tensor, "layer head pos pos"]
    head_out: Float[Tensor, "layer head pos d_model"]
    """Per source token: (ln1(x_pre) W_V + b_V) W_O, before the attention pattern weights it."""
    value_bias: Float[Tensor, "layer head d_model"]
    """(ln1.bias W_V + b_V) W_O: the part of head_out that does not depend on the residual."""
    W_V: list[Float[Tensor, "head d_model d_head"]]
    W_O: list[Float[Tensor, "head d_head d_model"]]
    b_O: Float[Tensor, "layer d_model"]
    ln1: list[FrozenNorm]
    mlp_in: list[FrozenNorm]
    """Transcoder input as a frozen map of the residual at the MLP's read site."""
    mlp_out: Float[Tensor, "layer pos d_model"]
    error: Float[Tensor, "layer pos d_model"]
    """mlp_out - (z W_dec + b_dec_out): the transcoder error (plus any skip term); mlp_out without one."""
    transcoders: dict[int, TranscoderWeights]
    z: dict[int, Float[Tensor, "pos d_sae"]]
    pre: dict[int, Float[Tensor, "pos d_sae"]]
    final: FrozenNorm | None = None
    """ln_final (when the whole model ran), for logit roots."""
    W_U: Float[Tensor, "d_model d_vocab"] | None = None
    b_U: Float[Tensor, " d_vocab"] | None = None
    attn_bias_at: Float[Tensor, "layer pos d_model"] = field(init=False)
    """sum_h sum_s A[h,t,s] value_bias[h]: what the value biases add at each destination token."""

    def __post_init__(self) -> None:
        weights = self.pattern.sum(-1)  # [layer head pos]
        self.attn_bias_at = torch.einsum("lht,lhd->ltd", weights, self.value_bias)

    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.resid.dtype

    def mlp_read_site(self, layer: int) -> int:
        return site(layer, "pre" if self.parallel else "mid")

    def attn_layers(self, at: int) -> list[int]:
        """Attention layers whose output is already in the residual at site `at`."""
        offset = 2 if self.parallel else 1
        return [layer for layer in range(self.n_layers) if 2 * layer + offset <= at]

    def mlp_layers(self, at: int) -> list[int]:
        """MLP layers whose output is already in the residual at site `at`."""
        return [layer for layer in range(self.n_layers) if 2 * layer + 2 <= at]


def _check_model(model: torch.nn.Module) -> None:
    cfg = model.cfg
    if getattr(cfg, "attn_only", False):
        raise AttributionError("attention-only models have no MLPs to replace by transcoders")
    if getattr(cfg, "use_normalization_before_and_after", False):
        raise AttributionError("models with post-sublayer norms (e.g. Gemma 2) are not supported for tracing")
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    if cfg.original_architecture in POST_NORM_ARCHITECTURES:
        raise AttributionError(f"post-norm architecture {cfg.original_architecture} is not supported for tracing")


def _transcoder_input(model: torch.nn.Module, tc: Transcoder, layer: int, parallel: bool) -> str:
    """The hook a transcoder reads, checked to be one the tracer can linearise."""
    hook = tc.cfg.hook_in or f"blocks.{layer}.ln2.hook_normalized"
    read = "hook_resid_pre" if parallel else "hook_resid_mid"
    allowed = {f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.{read}", f"blocks.{layer}.hook_mlp_in"}
    if hook not in allowed:
        raise AttributionError(
            f"transcoder for layer {layer} reads {hook!r}; tracing needs one of {', '.join(sorted(allowed))}"
        )
    out = tc.cfg.hook_out or f"blocks.{layer}.hook_mlp_out"
    if out != f"blocks.{layer}.hook_mlp_out":
        raise AttributionError(
            f"transcoder for layer {layer} writes {out!r}; tracing needs blocks.{layer}.hook_mlp_out"
        )
    d_model = model.cfg.d_model
    if tc.cfg.d_in != d_model or tc.cfg.d_out != d_model:
        raise AttributionError(
            f"transcoder for layer {layer} maps {tc.cfg.d_in} -> {tc.cfg.d_out}; the model's d_model is {d_model}"
        )
    return hook


def _input_norm(
    model: torch.nn.Module, hook: str, layer: int, cache: Mapping[str, Tensor], dtype: torch.dtype
) -> FrozenNorm:
    """The frozen map from the residual at the MLP's read site to the transcoder input."""
    n_pos = cache[f"blocks.{layer}.hook_resid_pre"].shape[1]
    if hook.endswith("ln2.hook_normalized"):
        ln2 = model.blocks[layer].ln2
        plain = frozen_norm(ln2, _scale(cache, f"blocks.{layer}.ln2.hook_scale"), n_pos, dtype)
        return replace(plain, weight=None, bias=None)  # hook_normalized is taken before weight and bias
    return FrozenNorm(scale=torch.ones(n_pos, dtype=dtype))


def _scale(cache: Mapping[str, Tensor], name: str) -> Tensor | None:
    return cache[name][0].reshape(-1) if name in cache else None


@torch.no_grad()
def prepare(
    model: torch.nn.Module,
    transcoders: Mapping[int, Transcoder],
    tokens: Int[Tensor, " pos"],
    max_layer: int | None = None,
    dtype: torch.dtype | None = None,
) -> PromptState:
    """Run the model once on `tokens` and freeze what attribution holds fixed.

    Layers 0..max_layer are run (all layers and ln_final when None, as logit roots need). A layer
    without a transcoder keeps its whole MLP output as a frozen error term. `dtype` (default: the
    model's) is the precision of the attribution arithmetic.
    """
    _check_model(model)
    cfg = model.cfg
    n_layers = cfg.n_layers if max_layer is None else max_layer + 1
    if not 0 < n_layers <= cfg.n_layers:
        raise AttributionError(f"layer {max_layer} is out of range; the model has layers 0..{cfg.n_layers - 1}")
    parallel = bool(cfg.parallel_attn_mlp)
    dtype = dtype or cfg.dtype
    tokens = tokens.reshape(-1).to(torch.long)
    hooks_in = {
        layer: _transcoder_input(model, tc, layer, parallel) for layer, tc in transcoders.items() if layer < n_layers
    }
    names = set(hooks_in.values()) | {"ln_final.hook_scale"}
    for layer in range(n_layers):
        prefix = f"blocks.{layer}."
        names |= {prefix + n for n in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_mlp_out")}
        names |= {prefix + n for n in ("attn.hook_pattern", "ln1.hook_scale", "ln2.hook_scale")}
    full = n_layers == cfg.n_layers
    _, cache = model.run_with_cache(
        tokens[None].to(cfg.device), names_filter=lambda n: n in names, stop_at_layer=None if full else n_layers
    )
    cache = {k: v.detach().to("cpu") for k, v in cache.items()}
    return _build_state(model, transcoders, tokens.cpu(), cache, hooks_in, n_layers, parallel, dtype, full)


def _activate(tc: Transcoder, pre: Float[Tensor, "pos d_sae"]) -> Float[Tensor, "pos d_sae"]:
    """The transcoder's activation function applied in the attribution dtype, on the CPU."""
    if tc.cfg.activation == "jumprelu":
        assert tc.threshold is not None
        return pre * (pre > tc.threshold.detach().to("cpu", pre.dtype))
    return tc.activate(pre)


class _Attention(NamedTuple):
    """One attention layer, frozen at the prompt."""

    ln1: FrozenNorm
    pattern: Float[Tensor, "head pos pos"]
    head_out: Float[Tensor, "head pos d_model"]
    value_bias: Float[Tensor, "head d_model"]
    W_V: Float[Tensor, "head d_model d_head"]
    W_O: Float[Tensor, "head d_head d_model"]
    b_O: Float[Tensor, " d_model"]


def _attention(
    block: torch.nn.Module, x_pre: Tensor, scale: Tensor | None, pattern: Tensor, dtype: torch.dtype
) -> _Attention:
    ln1 = frozen_norm(block.ln1, scale, x_pre.shape[0], dtype)
    W_V = block.attn.W_V.detach().to("cpu", dtype)  # [head d_model d_head], GQA heads expanded
    W_O = block.attn.W_O.detach().to("cpu", dtype)  # [head d_head d_model]
    b_V = block.attn.b_V.detach().to("cpu", dtype)  # [head d_head]
    v = torch.einsum("sd,hde->hse", ln1.apply(x_pre), W_V) + b_V[:, None]  # [head pos d_head]
    ln1_bias = ln1.bias if ln1.bias is not None else torch.zeros(W_V.shape[1], dtype=dtype)
    value_bias = torch.einsum("he,hed->hd", torch.einsum("d,hde->he", ln1_bias, W_V) + b_V, W_O)  # [head d_model]
    head_out = torch.einsum("hse,hed->hsd", v, W_O)  # [head pos d_model]
    return _Attention(ln1, pattern, head_out, value_bias, W_V, W_O, block.attn.b_O.detach().to("cpu", dtype))


class _Mlp(NamedTuple):
    """One MLP layer: its transcoder's activations at the prompt and the frozen error."""

    mlp_in: FrozenNorm
    error: Float[Tensor, "pos d_model"]
    weights: TranscoderWeights | None = None
    pre: Float[Tensor, "pos d_sae"] | None = None
    z: Float[Tensor, "pos d_sae"] | None = None


def _mlp(tc: Transcoder | None, u: Tensor | None, mlp_in: FrozenNorm, mlp_out: Tensor, dtype: torch.dtype) -> _Mlp:
    if tc is None or u is None:
        return _Mlp(mlp_in, mlp_out)  # no transcoder: the whole MLP output is a frozen error term
    weights = TranscoderWeights(*(getattr(tc, n).detach().to("cpu", dtype) for n in TranscoderWeights._fields))
    pre = (u - weights.b_dec) @ weights.W_enc + weights.b_enc  # [pos d_sae]
    z = _activate(tc, pre)
    return _Mlp(mlp_in, mlp_out - (z @ weights.W_dec + weights.b_dec_out), weights, pre, z)


def _build_state(
    model: torch.nn.Module,
    transcoders: Mapping[int, Transcoder],
    tokens: Tensor,
    cache: dict[str, Tensor],
    hooks_in: dict[int, str],
    n_layers: int,
    parallel: bool,
    dtype: torch.dtype,
    full: bool,
) -> PromptState:
    n_pos = tokens.shape[0]

    def get(name: str) -> Tensor:
        return cache[name][0].to(dtype)

    attns, mlps, sites = [], [], []
    for layer in range(n_layers):
        x_pre = get(f"blocks.{layer}.hook_resid_pre")
        pattern = get(f"blocks.{layer}.attn.hook_pattern")
        attn = _attention(model.blocks[layer], x_pre, _scale(cache, f"blocks.{layer}.ln1.hook_scale"), pattern, dtype)
        if parallel:  # TransformerLens has no resid_mid hook here; nothing reads this site
            x_mid = x_pre + torch.einsum("hts,hsd->td", attn.pattern, attn.head_out) + attn.b_O
        else:
            x_mid = get(f"blocks.{layer}.hook_resid_mid")
        hook = hooks_in.get(layer)
        mlp_in = _input_norm(model, hook, layer, cache, dtype) if hook else FrozenNorm(torch.ones(n_pos, dtype=dtype))
        u = get(hook) if hook else None
        mlps.append(_mlp(transcoders.get(layer), u, mlp_in, get(f"blocks.{layer}.hook_mlp_out"), dtype))
        attns.append(attn)
        sites += [x_pre, x_mid]
    sites.append(get(f"blocks.{n_layers - 1}.hook_resid_post"))
    final, W_U, b_U = _unembedding(model, cache, n_pos, dtype) if full else (None, None, None)
    used = [layer for layer, m in enumerate(mlps) if m.weights is not None]
    return PromptState(
        tokens=tokens,
        n_layers=n_layers,
        parallel=parallel,
        resid=torch.stack(sites),
        pattern=torch.stack([a.pattern for a in attns]),
        head_out=torch.stack([a.head_out for a in attns]),
        value_bias=torch.stack([a.value_bias for a in attns]),
        W_V=[a.W_V for a in attns],
        W_O=[a.W_O for a in attns],
        b_O=torch.stack([a.b_O for a in attns]),
        ln1=[a.ln1 for a in attns],
        mlp_in=[m.mlp_in for m in mlps],
        mlp_out=torch.stack([get(f"blocks.{layer}.hook_mlp_out") for layer in range(n_layers)]),
        error=torch.stack([m.error for m in mlps]),
        transcoders={layer: mlps[layer].weights for layer in used},
        z={layer: mlps[layer].z for layer in used},
        pre={layer: mlps[layer].pre for layer in used},
        final=final,
        W_U=W_U,
        b_U=b_U,
    )


def _unembedding(model: torch.nn.Module, cache: Mapping[str, Tensor], n_pos: int, dtype: torch.dtype) -> tuple:
    """Frozen ln_final (identity when the model has none), W_U and b_U, for logit roots."""
    if hasattr(model, "ln_final"):
        final = frozen_norm(model.ln_final, _scale(cache, "ln_final.hook_scale"), n_pos, dtype)
    else:
        final = FrozenNorm(scale=torch.ones(n_pos, dtype=dtype))
    return final, model.unembed.W_U.detach().to("cpu", dtype), model.unembed.b_U.detach().to("cpu", dtype)
