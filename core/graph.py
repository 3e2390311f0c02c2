"""Full attribution graphs (beyond the paper, as circuit-tracer builds them).

`full_graph` computes every direct-effect edge between active transcoder features, per-layer error
terms, token embeddings and the roots, with attention patterns and normalisation scales frozen and
every other feature held fixed. The graph type and its conversion to a circuit live in
`core.graph_data`, influence and pruning in `core.graph_prune`; both are re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from core.attribution import AttributionError, GraphNode, Node, PromptState
from core.graph_data import AttributionGraph, PrunedGraph, root_terms, to_circuit
from core.graph_prune import (
    _threshold,
    compute_influence,
    node_influence,
    normalize_matrix,
    prune_graph,
    total_attribution,
)

__all__ = [
    "AttributionGraph",
    "PrunedGraph",
    "_threshold",
    "compute_influence",
    "feature_scores",
    "full_graph",
    "node_influence",
    "normalize_matrix",
    "prune_graph",
    "root_terms",
    "to_circuit",
    "total_attribution",
]


# ---------------------------------------------------------------- building


class _Targets:
    """Feature vectors whose values get a row in the adjacency: site, token, vector, constant."""

    def __init__(self, sites: Tensor, pos: Tensor, vectors: Tensor, consts: Tensor):
        self.sites, self.pos, self.vectors, self.consts = sites, pos, vectors, consts


def _feature_nodes(state: PromptState, max_site: int, max_pos: int) -> list[tuple[int, int, int]]:
    """(layer, pos, feature) of every active feature that can feed a root at or below (max_site, max_pos)."""
    out = []
    for layer in state.mlp_layers(max_site):
        if layer not in state.transcoders:
            continue
        for pos, feature in torch.nonzero(state.z[layer][: max_pos + 1]).tolist():
            out.append((layer, pos, feature))
    return out


def _feature_targets(state: PromptState, feats: list[tuple[int, int, int]], roots: Sequence[Node]) -> _Targets:
    sites, poss, vectors, consts = [], [], [], []
    for layer, pos, feature in feats:
        tc = state.transcoders[layer]
        f_enc = tc.W_enc[:, feature]
        norm = state.mlp_in[layer]
        sites.append(state.mlp_read_site(layer))
        poss.append(pos)
        vectors.append(norm.pull(f_enc, pos))
        consts.append(tc.b_enc[feature] - f_enc @ tc.b_dec + norm.offset(f_enc))
    for root in roots:
        sites.append(root.site)
        poss.append(root.pos)
        vectors.append(root.vector)
        consts.append(torch.tensor(root.const, dtype=state.dtype))
    d = state.resid.shape[-1]
    return _Targets(
        torch.tensor(sites, dtype=torch.long),
        torch.tensor(poss, dtype=torch.long),
        torch.stack(vectors) if vectors else torch.zeros(0, d, dtype=state.dtype),
        torch.stack([torch.as_tensor(c, dtype=state.dtype) for c in consts]) if consts else torch.zeros(0),
    )


def _attn_pullback(
    state: PromptState, layer: int, grad: Float[Tensor, "n pos d_model"]
) -> Float[Tensor, "n pos d_model"]:
    """Gradient at resid_pre of `layer` from the gradient at its attention output (pattern frozen)."""
    T = grad.shape[1]
    pattern = state.pattern[layer, :, :T, :T]  # [head dst src]
    y = torch.einsum("ntd,hed->nhte", grad, state.W_O[layer])  # [n head dst d_head]
    y = torch.einsum("hts,nhte->nhse", pattern, y)  # [n head src d_head]
    W_V = state.W_V[layer]
    group = _kv_group(W_V)
    if group > 1:  # grouped-query attention: heads of a group share W_V, so sum them first
        y = y.reshape(y.shape[0], -1, group, *y.shape[2:]).sum(2)  # [n kv_head src d_head]
        W_V = W_V[::group]
    u = torch.einsum("nhse,hde->nsd", y, W_V)  # [n src d_model]
    return state.ln1[layer].pull(u, slice(0, T))


def _kv_group(W_V: Tensor) -> int:
    """Heads per shared value matrix (TransformerLens expands grouped-query heads in order)."""
    for group in range(W_V.shape[0], 1, -1):
        if W_V.shape[0] % group == 0 and torch.equal(W_V[::group].repeat_interleave(group, 0), W_V):
            return group
    return 1


def _attn_pullback_at(
    state: PromptState, layer: int, vectors: Float[Tensor, "k d_model"], pos: Tensor, T: int
) -> Float[Tensor, "k pos d_model"]:
    """_attn_pullback of gradients that sit at one token each (a target before its first crossing)."""
    y = torch.einsum("kd,hed->khe", vectors, state.W_O[layer])  # [k head d_head]
    w = torch.einsum("khe,hde->khd", y, state.W_V[layer])  # [k head d_model]
    weights = state.pattern[layer][:, pos, :T].transpose(0, 1)  # [k head src]
    return state.ln1[layer].pull(torch.einsum("khs,khd->ksd", weights, w), slice(0, T))


class _Columns:
    """Adjacency column of every source node: features, errors, dropped features, embeddings, roots."""

    def __init__(
        self, feats: list[tuple[int, int, int]], dropped: dict[tuple[int, int], Tensor], n_layers: int, n_pos: int
    ):
        self.groups: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
        by_group: dict[tuple[int, int], list[int]] = {}
        for i, (layer, pos, _) in enumerate(feats):
            by_group.setdefault((layer, pos), []).append(i)
        for (layer, pos), rows in by_group.items():
            idx = torch.tensor(rows, dtype=torch.long)
            self.groups[(layer, pos)] = (idx, torch.tensor([feats[i][2] for i in rows], dtype=torch.long))
        self.n_pos = n_pos
        self.error_base = len(feats)
        self.dropped = {
            key: (self.error_base + n_layers * n_pos + i, vec) for i, (key, vec) in enumerate(dropped.items())
        }
        self.embed_base = self.error_base + n_layers * n_pos + len(dropped)
        self.root_base = self.embed_base + n_pos

    def error(self, layer: int, pos: int) -> int:
        return self.error_base + layer * self.n_pos + pos


def _backward_chunk(
    state: PromptState, targets: _Targets, cols: _Columns, adjacency: Tensor, bias: Tensor, mlp_layers: list[int]
) -> None:
    """Fill the adjacency rows of one chunk of targets by one batched backward pass (frozen model).

    Walking down the residual sites: a target's vector is injected at the site it reads; crossing
    an MLP records the edges from what it wrote; crossing attention pulls the gradient back
    through the frozen pattern (freshly injected vectors, still at one token, the cheap way)."""
    n = targets.pos.numel()
    T = int(targets.pos.max()) + 1
    grad = torch.zeros(n, T, state.resid.shape[-1], dtype=state.dtype)  # d(target)/d(residual) here
    bias += targets.consts
    for at in range(int(targets.sites.max()), -1, -1):
        rows = torch.nonzero(targets.sites == at).flatten()
        fresh = (rows, targets.pos[rows], targets.vectors[rows])
        before = grad.clone() if len(rows) and at > 0 else grad
        grad[rows, fresh[1]] += fresh[2]
        if at == 0:
            break
        layer, odd = divmod(at - 1, 2)
        if odd and layer in mlp_layers:  # `at` = 2l+2: MLP l wrote here
            _mlp_edges(state, layer, grad, cols, adjacency, bias)
        if bool(odd) == state.parallel:  # attention l wrote here (at 2l+1, or 2l+2 when parallel)
            grad = grad + _attn_step(state, layer, before, fresh, grad, bias)
    adjacency[:, cols.embed_base : cols.embed_base + T] = torch.einsum("ntd,td->nt", grad, state.resid[0, :T])


def _attn_step(
    state: PromptState, layer: int, before: Tensor, fresh: tuple[Tensor, Tensor, Tensor], grad: Tensor, bias: Tensor
) -> Tensor:
    """Bias terms of attention `layer` and the gradient it sends back to resid_pre."""
    T = grad.shape[1]
    bias += grad.sum(1) @ state.b_O[layer] + torch.einsum("ntd,td->n", grad, state.attn_bias_at[layer, :T])
    step = _attn_pullback(state, layer, before) if bool(before.any()) else torch.zeros_like(grad)
    rows, pos, vectors = fresh
    if len(rows):
        step[rows] += _attn_pullback_at(state, layer, vectors, pos, T)
    return step


def _mlp_edges(state: PromptState, layer: int, grad: Tensor, cols: _Columns, adjacency: Tensor, bias: Tensor) -> None:
    """Edges from what MLP `layer` writes: its features, its error, its dropped features; b_dec_out."""
    T = grad.shape[1]
    start = cols.error(layer, 0)
    adjacency[:, start : start + T] = torch.einsum("ntd,td->nt", grad, state.error[layer, :T])
    if layer not in state.transcoders:
        return
    tc = state.transcoders[layer]
    bias += grad.sum(1) @ tc.b_dec_out
    for pos in range(T):
        if (layer, pos) in cols.groups:
            idx, feats = cols.groups[(layer, pos)]
            adjacency[:, idx] = grad[:, pos] @ tc.W_dec[feats].T * state.z[layer][pos, feats]  # [n m]
        if (layer, pos) in cols.dropped:
            col, vec = cols.dropped[(layer, pos)]
            adjacency[:, col] = grad[:, pos] @ vec


@torch.no_grad()
def feature_scores(
    state: PromptState, roots: Sequence[Node], weights: Sequence[float] | None = None
) -> dict[int, Float[Tensor, "pos d_sae"]]:
    """Total attribution of every active feature to the weighted roots, in one backward pass.

    Features respond linearly on their active set (patterns, scales and errors frozen), so this is
    `total_attribution` of the complete graph without building it; used to choose which features
    a capped graph traces.
    """
    weights = [1.0] * len(roots) if weights is None else list(weights)
    T = max(r.pos for r in roots) + 1
    grad = torch.zeros(1, T, state.resid.shape[-1], dtype=state.dtype)
    scores: dict[int, Tensor] = {}
    for at in range(max(r.site for r in roots), -1, -1):
        for root, w in zip(roots, weights, strict=True):
            if root.site == at:
                grad[0, root.pos] += w * root.vector
        if at == 0:
            break
        layer, odd = divmod(at - 1, 2)
        if not odd:
            if not state.parallel:
                grad = grad + _attn_pullback(state, layer, grad)
            continue
        step = _attn_pullback(state, layer, grad) if state.parallel else torch.zeros_like(grad)
        if layer in state.transcoders:
            tc, z = state.transcoders[layer], state.z[layer][:T]
            per_unit = grad[0] @ tc.W_dec.T  # [pos d_sae]: d(roots)/d(z)
            scores[layer] = z * per_unit
            step[0] += state.mlp_in[layer].pull((per_unit * (z != 0)) @ tc.W_enc.T, slice(0, T))
        grad = grad + step
    return scores


def _select(
    state: PromptState, feats: list[tuple[int, int, int]], scores: dict[int, Tensor], max_features: int
) -> tuple[list[tuple[int, int, int]], dict[tuple[int, int], Tensor]]:
    """Keep the `max_features` features with the largest |total attribution|; sum the decoder
    outputs of the rest per (layer, token) into frozen `dropped` sources."""
    index = torch.tensor(feats, dtype=torch.long)  # [n 3]: layer, pos, feature
    score = torch.zeros(len(feats), dtype=torch.float64)
    for layer in scores:
        rows = index[:, 0] == layer
        score[rows] = scores[layer][index[rows, 1], index[rows, 2]].abs().double()
    keep = torch.zeros(len(feats), dtype=torch.bool)
    keep[torch.topk(score, max_features).indices] = True
    kept = [f for f, k in zip(feats, keep.tolist(), strict=True) if k]
    dropped: dict[tuple[int, int], Tensor] = {}
    for layer in sorted({f[0] for f in feats}):
        rows = ~keep & (index[:, 0] == layer)
        pos, feature = index[rows, 1], index[rows, 2]
        tc, n_pos = state.transcoders[layer], int(state.z[layer].shape[0])
        out = torch.zeros(n_pos, tc.W_dec.shape[1], dtype=state.dtype)  # [pos d_model]
        out.index_add_(0, pos, state.z[layer][pos, feature, None] * tc.W_dec[feature])
        dropped.update({(layer, p): out[p] for p in sorted(set(pos.tolist()))})
    return kept, dropped


@torch.no_grad()
def full_graph(
    state: PromptState,
    roots: Sequence[Node],
    weights: Sequence[float] | None = None,
    max_features: int | None = None,
    batch_size: int = 256,
) -> AttributionGraph:
    """Every direct-effect edge between active features, errors, embeddings and `roots`.

    Features are those that can reach a root (layers below it, tokens up to it); with
    `max_features`, only that many (by |total attribution|, `feature_scores`) are traced and the
    rest are summed per (layer, token) into frozen `dropped` sources, so rows still sum exactly.
    Targets are processed in batches of `batch_size`: each batch is one backward pass through the
    frozen attention layers, written out as linear algebra.
    """
    if not roots:
        raise AttributionError("full_graph needs at least one root")
    max_site = max(r.site for r in roots)
    n_pos = max(r.pos for r in roots) + 1
    feats = _feature_nodes(state, max_site, n_pos - 1)
    dropped: dict[tuple[int, int], Tensor] = {}
    if max_features is not None and len(feats) > max_features:
        feats, dropped = _select(state, feats, feature_scores(state, roots, weights), max_features)
    cols = _Columns(feats, dropped, state.n_layers, n_pos)
    n_nodes = cols.root_base + len(roots)
    targets = _feature_targets(state, feats, roots)
    target_nodes = torch.cat([torch.arange(len(feats)), cols.root_base + torch.arange(len(roots))])
    adjacency = torch.zeros(n_nodes, n_nodes, dtype=state.dtype)
    bias = torch.zeros(n_nodes, dtype=state.dtype)
    order = torch.argsort(targets.sites * (n_pos + 1) + targets.pos)  # chunks of one site, similar tokens
    for start in range(0, order.numel(), batch_size):
        chunk = order[start : start + batch_size]
        sub = _Targets(targets.sites[chunk], targets.pos[chunk], targets.vectors[chunk], targets.consts[chunk])
        rows = torch.zeros(chunk.numel(), n_nodes, dtype=state.dtype)
        row_bias = torch.zeros(chunk.numel(), dtype=state.dtype)
        _backward_chunk(state, sub, cols, rows, row_bias, state.mlp_layers(max_site))
        adjacency[target_nodes[chunk]] = rows
        bias[target_nodes[chunk]] = row_bias
    return _assemble(state, feats, roots, weights, cols, adjacency, bias, n_pos)


def _assemble(
    state: PromptState,
    feats: list[tuple[int, int, int]],
    roots: Sequence[Node],
    weights: Sequence[float] | None,
    cols: _Columns,
    adjacency: Tensor,
    bias: Tensor,
    n_pos: int,
) -> AttributionGraph:
    n_nodes = adjacency.shape[0]
    value = torch.ones(n_nodes, dtype=state.dtype)
    activation = torch.ones(n_nodes, dtype=state.dtype)
    nodes: list[GraphNode] = []
    for i, (layer, pos, feature) in enumerate(feats):
        value[i] = state.pre[layer][pos, feature]
        activation[i] = state.z[layer][pos, feature]
        nodes.append(GraphNode(f"F{layer}.{feature}@{pos}", "feature", layer, pos, feature))
    for layer in range(state.n_layers):
        nodes += [GraphNode(f"err{layer}@{pos}", "error", layer, pos) for pos in range(n_pos)]
    nodes += [GraphNode(f"drop{layer}@{pos}", "dropped", layer, pos) for layer, pos in cols.dropped]
    nodes += [GraphNode(f"E@{pos}", "embed", -1, pos) for pos in range(n_pos)]
    for i, root in enumerate(roots):
        value[cols.root_base + i] = root.contrib
        activation[cols.root_base + i] = root.contrib
        nodes.append(
            GraphNode(
                "root" if len(roots) == 1 else f"root{i}", "root", root.layer, root.pos, root.feature, label=root.label
            )
        )
    root_weights = torch.zeros(n_nodes, dtype=state.dtype)
    root_weights[cols.root_base :] = torch.tensor(
        list(weights) if weights is not None else [1.0] * len(roots), dtype=state.dtype
    )
    n_leaves = state.n_layers * n_pos + len(cols.dropped)
    graph = AttributionGraph(
        nodes, adjacency, bias, value, activation, root_weights, len(feats), n_leaves, n_pos, len(roots)
    )
    attribution = total_attribution(graph)
    attribution[cols.root_base :] = value[cols.root_base :]  # a root's attribution to itself: its value
    influence = node_influence(graph)
    graph.nodes = [
        n._replace(activation=float(a), attribution=float(b), influence=float(c))
        for n, a, b, c in zip(nodes, activation, attribution, influence, strict=False)
    ]
    return graph
