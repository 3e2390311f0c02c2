"""Circuit attribution by feature-vector propagation (Dunefsky, Chlenski & Nanda, NeurIPS 2024, App. D).

Phases: (1) `prepare` (in `core.attribution_state`, re-exported here) runs the model once and freezes
what the linearised model holds fixed (attention patterns, normalisation scales, transcoder errors);
(2) a root becomes a feature vector at a residual site (`feature_root`, `logit_root`, `direction_root`);
(3) `children` splits a node's value exactly into upstream transcoder features, attention heads per
source token, the embedding, error and bias terms; (4) `paths_to_graph` merges paths into a `Circuit`
(`core.circuit`, re-exported here) with error nodes (Alg. 2). The beam search over children (Alg. 1),
path filters and `trace` live in `core.paths`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from core.attribution_state import (
    AttributionError,
    FrozenNorm,
    PromptState,
    TranscoderWeights,
    frozen_norm,
    prepare,
    site,
    site_name,
)
from core.circuit import Circuit, GraphEdge, GraphNode

__all__ = [
    "AttributionError",
    "Candidate",
    "Children",
    "Circuit",
    "FrozenNorm",
    "GraphEdge",
    "GraphNode",
    "Node",
    "NodeKind",
    "Path",
    "PromptState",
    "TranscoderWeights",
    "children",
    "direction_root",
    "feature_root",
    "frozen_norm",
    "logit_root",
    "make_child",
    "paths_to_graph",
    "prepare",
    "site",
    "site_name",
]

NodeKind = Literal["root", "feature", "head", "embed"]


# ---------------------------------------------------------------- nodes and roots


@dataclass(frozen=True, eq=False)
class Node:
    """A feature vector at a residual site: its value is vector . x[site, pos] + const.

    `contrib` is that value: the node's attribution to the root along the path that reached it.
    """

    kind: NodeKind
    layer: int
    """Feature/head layer; for a root, the layer it reads; -1 for the embedding."""
    pos: int
    """Token the vector sits at (a head's source token)."""
    site: int
    vector: Float[Tensor, " d_model"]
    const: float
    contrib: float
    feature: int = -1
    head: int = -1
    dst: int = -1
    """A head's destination token."""
    activation: float = math.nan
    """A feature's (or root feature's) activation z; a head's attention weight."""
    label: str = ""

    @property
    def key(self) -> str:
        """Identity of the node in a merged graph."""
        if self.kind == "root":
            return "root"
        if self.kind == "feature":
            return f"F{self.layer}.{self.feature}@{self.pos}"
        if self.kind == "head":
            return f"H{self.layer}.{self.head}@{self.pos}>{self.dst}"
        return f"E@{self.pos}"

    def __repr__(self) -> str:
        return f"<{self.label or self.key}: {self.contrib:.4g}>"


Path = tuple[Node, ...]


def _position(state: PromptState, pos: int) -> int:
    n = state.n_pos
    if not -n <= pos < n:
        raise AttributionError(f"position {pos} is out of range; the prompt has {n} tokens (0..{n - 1})")
    return pos % n


def feature_root(state: PromptState, layer: int, feature: int, pos: int = -1) -> Node:
    """Root = pre-activation of transcoder feature `feature` of layer `layer` at token `pos`.

    v0 = frozen-norm pullback of f_enc, so v0 . x_mid + (b_enc - f_enc . b_dec) = pre. With the residual
    centred (LayerNorm) or RMSNorm this is the paper's c * f_enc with c = (f . LN2(x)) / (f . x).
    """
    if layer not in state.transcoders:
        have = ", ".join(map(str, sorted(state.transcoders))) or "none"
        raise AttributionError(f"layer {layer} has no transcoder; layers with one: {have}")
    tc = state.transcoders[layer]
    d_sae = tc.W_enc.shape[1]
    if not 0 <= feature < d_sae:
        raise AttributionError(
            f"feature {feature} is out of range; layer {layer}'s transcoder has features 0..{d_sae - 1}"
        )
    t = _position(state, pos)
    f_enc = tc.W_enc[:, feature]
    norm = state.mlp_in[layer]
    vector = norm.pull(f_enc, t)
    const = float(tc.b_enc[feature] - f_enc @ tc.b_dec + norm.offset(f_enc))
    pre = float(vector @ state.resid[state.mlp_read_site(layer), t]) + const
    z = float(state.z[layer][t, feature])
    label = f"F{layer}.{feature}@{t}"
    return Node(
        "root", layer, t, state.mlp_read_site(layer), vector, const, pre, feature=feature, activation=z, label=label
    )


def logit_root(state: PromptState, token: int, other: int | None = None, pos: int = -1) -> Node:
    """Root = logit of `token` (minus the logit of `other`) at `pos`, through the frozen ln_final."""
    if state.final is None or state.W_U is None or state.b_U is None:
        raise AttributionError("logit roots need the whole model: call prepare(..., max_layer=None)")
    t = _position(state, pos)
    direction = state.W_U[:, token] - (state.W_U[:, other] if other is not None else 0)
    bias = state.b_U[token] - (state.b_U[other] if other is not None else 0)
    vector = state.final.pull(direction, t)
    const = float(state.final.offset(direction) + bias)
    at = 2 * state.n_layers
    value = float(vector @ state.resid[at, t]) + const
    label = f"logit[{token}]" + (f"-logit[{other}]" if other is not None else "") + f"@{t}"
    return Node("root", state.n_layers, t, at, vector, const, value, activation=value, label=label)


def direction_root(state: PromptState, vector: Float[Tensor, " d_model"], pos: int = -1, at: int | None = None) -> Node:
    """Root = vector . x at residual site `at` (default: after the last layer run) and token `pos`."""
    at = 2 * state.n_layers if at is None else at
    t = _position(state, pos)
    vector = vector.to(state.dtype)
    value = float(vector @ state.resid[at, t])
    return Node("root", at // 2, t, at, vector, 0.0, value, activation=value, label=f"direction@{site_name(at)},{t}")


# ---------------------------------------------------------------- children of a node


class Children(NamedTuple):
    """A node's value split exactly into what feeds it (docs/method.md, section 5); `total()` equals its contrib."""

    features: dict[int, Float[Tensor, " d_sae"]]
    """Per transcoder layer: z_j (f_dec_j . v) at the node's token."""
    heads: dict[int, Float[Tensor, "head src"]]
    """Per attention layer: A[h, t, s] ((ln1(x_s) W_V + b_V) W_O . v) for s <= t (BOS included)."""
    embed: float
    """v . embedding (token plus learned position, when the model has one)."""
    error: dict[int, float]
    """Per MLP layer: v . (mlp_out - z W_dec - b_dec_out), the transcoder error (whole MLP if none)."""
    bias: float
    """The node's own constant plus v . b_O and v . b_dec_out of every layer below it."""

    def total(self) -> float:
        parts = [sum(float(x.sum()) for x in self.features.values()), sum(float(x.sum()) for x in self.heads.values())]
        return sum(parts) + self.embed + sum(self.error.values()) + self.bias


def children(state: PromptState, node: Node) -> Children:
    """Decompose `node` into its children: batched over features, heads and source tokens."""
    v, t = node.vector, node.pos
    features = {
        layer: state.z[layer][t] * (state.transcoders[layer].W_dec @ v)
        for layer in state.mlp_layers(node.site)
        if layer in state.transcoders
    }
    heads = {}
    bias = node.const
    for layer in state.attn_layers(node.site):
        heads[layer] = state.pattern[layer, :, t, : t + 1] * (state.head_out[layer, :, : t + 1] @ v)  # [head src]
        bias += float(state.b_O[layer] @ v)
    error = {}
    for layer in state.mlp_layers(node.site):
        error[layer] = float(state.error[layer, t] @ v)
        if layer in state.transcoders:
            bias += float(state.transcoders[layer].b_dec_out @ v)
    embed = float(state.resid[0, t] @ v)
    return Children(features, heads, embed, error, bias)


class Candidate(NamedTuple):
    kind: NodeKind
    layer: int
    index: int
    """Feature index, or head index."""
    src: int
    """Source token of a head; the node's token otherwise."""
    contrib: float


def make_child(state: PromptState, parent: Node, cand: Candidate) -> Node:
    """The child node: its vector carries the product of every factor on the path above it."""
    v, t = parent.vector, parent.pos
    if cand.kind == "feature":
        tc = state.transcoders[cand.layer]
        f_enc = tc.W_enc[:, cand.index]
        a = tc.W_dec[cand.index] @ v  # connection f_dec_j . v
        norm = state.mlp_in[cand.layer]
        vector = a * norm.pull(f_enc, t)
        const = float(a * (tc.b_enc[cand.index] - f_enc @ tc.b_dec + norm.offset(f_enc)))
        z = float(state.z[cand.layer][t, cand.index])
        at = state.mlp_read_site(cand.layer)
        return Node("feature", cand.layer, t, at, vector, const, cand.contrib, feature=cand.index, activation=z)
    if cand.kind == "head":
        layer, h, s = cand.layer, cand.index, cand.src
        weight = state.pattern[layer, h, t, s]
        w_out = state.W_O[layer][h] @ v  # [d_head]
        w = state.W_V[layer][h] @ w_out  # [d_model]
        vector = weight * state.ln1[layer].pull(w, s)
        const = float(weight * (state.value_bias[layer, h] @ v))  # (ln1.bias W_V + b_V) W_O . v
        return Node(
            "head", layer, s, site(layer, "pre"), vector, const, cand.contrib, head=h, dst=t, activation=float(weight)
        )
    return Node("embed", -1, t, 0, v, 0.0, cand.contrib)


# ---------------------------------------------------------------- paths -> graph (Alg. 2)


@dataclass
class _Merged:
    template: Node
    vector: Tensor
    const: float = 0.0
    contrib: float = 0.0


def paths_to_graph(state: PromptState, paths: Iterable[Path]) -> Circuit:
    """Merge paths into one graph (paper Alg. 2) and add error nodes to every expanded node.

    A node's attribution and each edge's weight are sums over distinct path prefixes. Every expanded
    node gets an `error` child (transcoder errors below it), a `bias` child (its own constant, b_O and
    b_dec_out terms) and a `prune_error` child (its attribution minus all its incoming edges), so the
    incoming edges of every expanded node sum exactly to its attribution.
    """
    merged: dict[str, _Merged] = {}
    edges: dict[tuple[str, str], float] = {}
    seen: set[tuple[str, ...]] = set()
    for path in paths:
        keys = tuple(n.key for n in path)
        for j, node in enumerate(path):
            if keys[: j + 1] in seen:
                continue
            seen.add(keys[: j + 1])
            acc = merged.setdefault(node.key, _Merged(node, torch.zeros_like(node.vector)))
            acc.vector += node.vector
            acc.const += node.const
            acc.contrib += node.contrib
            if j > 0:
                edges[(node.key, keys[j - 1])] = edges.get((node.key, keys[j - 1]), 0.0) + node.contrib
    nodes = [_graph_node(m.template, m.contrib) for m in merged.values()]
    for parent in sorted({target for _, target in edges}, key=list(merged).index):
        m = merged[parent]
        ch = children(state, replace(m.template, vector=m.vector, const=m.const, contrib=m.contrib))
        explained = sum(w for (_, target), w in edges.items() if target == parent)
        extra = {"error": sum(ch.error.values()), "bias": ch.bias}
        extra["prune_error"] = m.contrib - explained - extra["error"] - extra["bias"]
        for kind, value in extra.items():
            nid = f"{parent}|{kind}"
            t = m.template
            nodes.append(GraphNode(nid, kind, t.layer, t.pos, attribution=value, label=f"{kind} of {parent}"))
            edges[(nid, parent)] = value
    circuit_edges = [GraphEdge(s, t, w) for (s, t), w in edges.items()]
    return Circuit(nodes, circuit_edges, "root", {"kind": "paths"})


def _graph_node(node: Node, contrib: float) -> GraphNode:
    return GraphNode(
        node.key,
        node.kind,
        node.layer,
        node.pos,
        node.feature,
        node.head,
        node.dst,
        node.activation,
        contrib,
        label=node.label,
    )
