"""Input-invariant views of transcoder features (docs/method.md section 4): which tokens drive a
feature directly (de-embedding, also through one attention head's OV circuit), which tokens it
promotes (logit lens), which earlier transcoder features feed it (pullback), and OV norms per head.

All views ignore LayerNorm scales and attention patterns: they are properties of the weights only.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from core.transcoder import Transcoder

VIEWS = ("deembed", "head_deembed", "ov_norm", "logit_top", "logit_bottom", "pullback")
"""Names of the views, as stored in the `view` column."""


def deembedding(model: HookedTransformer, f_enc: Float[Tensor, "d_model n"]) -> Float[Tensor, "n d_vocab"]:
    """W_E f_enc: each token's direct (embedding-only) contribution to each feature's pre-activation."""
    return f_enc.to(model.W_E.dtype).T @ model.W_E.T  # [n d_vocab], contiguous for topk


def ov_vectors(
    model: HookedTransformer, layer: int, f_enc: Float[Tensor, "d_model n"]
) -> Float[Tensor, "head d_model n"]:
    """W_OV^{layer,h} f_enc = W_V^h W_O^h f_enc for every head h of an attention layer."""
    attn = model.blocks[layer].attn
    w_o_f = attn.W_O @ f_enc.to(attn.W_O.dtype)  # [head d_head n]
    return attn.W_V @ w_o_f  # [head d_model n]


def head_deembedding(
    model: HookedTransformer, layer: int, head: int, f_enc: Float[Tensor, "d_model n"]
) -> Float[Tensor, "n d_vocab"]:
    """W_E W_OV^{layer,head} f_enc: how much each token, attended to by the head, drives each feature."""
    attn = model.blocks[layer].attn
    vec = attn.W_V[head] @ (attn.W_O[head] @ f_enc.to(attn.W_O.dtype))  # [d_model n]
    return vec.T @ model.W_E.T


def ov_norms(
    model: HookedTransformer, max_layer: int, f_enc: Float[Tensor, "d_model n"]
) -> Float[Tensor, "n layer head"]:
    """||W_OV^{l,h} f_enc|| for every head of layers 0..max_layer."""
    norms = [ov_vectors(model, layer, f_enc).norm(dim=1) for layer in range(max_layer + 1)]  # each [head n]
    return torch.stack(norms).permute(2, 0, 1)


def logit_lens(model: HookedTransformer, f_dec: Float[Tensor, "n d_model"]) -> Float[Tensor, "n d_vocab"]:
    """f_dec W_U: the direct effect of each feature's decoder vector on every logit."""
    return f_dec.to(model.W_U.dtype) @ model.W_U


def pullback(earlier: Transcoder, f_enc: Float[Tensor, "d_model n"]) -> Float[Tensor, "n d_sae_earlier"]:
    """W_dec^{(l')} f_enc: the input-invariant connection from each earlier feature to each feature."""
    return f_enc.to(earlier.W_dec.dtype).T @ earlier.W_dec.T


class ViewRows(NamedTuple):
    """One view of a chunk of features in long form: rows (feature, rank) -> item and value.

    `token`, `src_layer`, `src_head`, `src_feature` are -1 where they do not apply."""

    view: str
    feature: Tensor
    """int64 [n]"""
    rank: Tensor
    """int64 [n]"""
    token: Tensor
    src_layer: Tensor
    src_head: Tensor
    src_feature: Tensor
    value: Tensor
    """float32 [n]"""


def _long(view: str, features: Tensor, values: Float[Tensor, "n k"], **columns: Tensor | int) -> ViewRows:
    """Flatten per-feature top lists [n, k] into rows; `columns` give token/src_* as [n, k] or a constant."""
    n, k = values.shape
    out: dict[str, Tensor] = {}
    for name in ("token", "src_layer", "src_head", "src_feature"):
        value = columns.get(name, -1)
        if isinstance(value, Tensor):
            out[name] = value.expand(n, k).reshape(-1).long().cpu()
        else:
            out[name] = torch.full((n * k,), value, dtype=torch.long)
    feature = features[:, None].expand(n, k).reshape(-1).cpu()
    rank = torch.arange(k).expand(n, k).reshape(-1)
    return ViewRows(view, feature, rank, value=values.reshape(-1).float().cpu(), **out)


def _top(scores: Tensor, k: int, largest: bool = True) -> tuple[Tensor, Tensor]:
    k = min(k, scores.shape[-1])
    return scores.topk(k, dim=-1, largest=largest)


@torch.inference_mode()
def feature_views(
    model: HookedTransformer,
    transcoders: Mapping[int, Transcoder],
    layer: int,
    top: int,
    chunk: int = 256,
) -> Iterator[ViewRows]:
    """Every view of every feature of `transcoders[layer]`, `chunk` features at a time.

    deembed: top tokens of W_E f_enc. logit_top / logit_bottom: top and bottom tokens of f_dec W_U.
    ov_norm: the `top` heads (layers <= layer) with the largest ||W_OV f_enc||. head_deembed: top
    tokens of W_E W_OV f_enc through the head with the largest OV norm. pullback: for each earlier
    transcoder layer l', the `top` features with the largest |W_dec^{(l')} f_enc| (signed value)."""
    tc = transcoders[layer]
    n_heads = model.cfg.n_heads
    for start in range(0, tc.cfg.d_sae, chunk):
        features = torch.arange(start, min(start + chunk, tc.cfg.d_sae))
        f_enc = tc.W_enc[:, start : start + chunk]  # [d_model n]
        f_dec = tc.W_dec[start : start + chunk]  # [n d_model]
        value, token = _top(deembedding(model, f_enc), top)
        yield _long("deembed", features, value, token=token)
        lens = logit_lens(model, f_dec)  # [n d_vocab]
        value, token = _top(lens, top)
        yield _long("logit_top", features, value, token=token)
        value, token = _top(lens, top, largest=False)
        yield _long("logit_bottom", features, value, token=token)
        norms = ov_norms(model, layer, f_enc).flatten(1)  # [n layer*head]
        value, flat = _top(norms, top)
        yield _long("ov_norm", features, value, src_layer=flat // n_heads, src_head=flat % n_heads)
        yield from _head_deembed(model, features, f_enc, flat[:, 0], n_heads, top)
        for earlier in sorted(x for x in transcoders if x < layer):
            scores = pullback(transcoders[earlier], f_enc)  # [n d_sae']
            _, src = _top(scores.abs(), top)
            value = scores.gather(1, src)
            yield _long("pullback", features, value, src_layer=earlier, src_feature=src)


def _head_deembed(
    model: HookedTransformer, features: Tensor, f_enc: Tensor, best: Tensor, n_heads: int, top: int
) -> Iterator[ViewRows]:
    """head_deembed rows for each feature through its own strongest head (`best` = layer*n_heads + head),
    one group of rows per head. Each feature's W_OV f_enc is formed through its head, then every
    feature is de-embedded in one product (one small product per head costs twice as much)."""
    heads = best.unique().tolist()
    groups = [(flat, (best == flat).nonzero()[:, 0]) for flat in heads]
    vecs = torch.empty(f_enc.shape, dtype=model.W_E.dtype, device=f_enc.device)  # [d_model n]
    for flat, which in groups:
        attn = model.blocks[flat // n_heads].attn
        head = flat % n_heads
        vecs[:, which] = attn.W_V[head] @ (attn.W_O[head] @ f_enc[:, which].to(attn.W_O.dtype))
    value, token = _top(vecs.T @ model.W_E.T, top)  # [n top]
    for flat, which in groups:
        yield _long(
            "head_deembed", features[which.to(features.device)], value[which], token=token[which],
            src_layer=flat // n_heads, src_head=flat % n_heads,
        )  # fmt: skip
