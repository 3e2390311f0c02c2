"""Influence and pruning of an attribution graph: pure functions on its adjacency matrix.

`compute_influence` sums what flows back from the weighted roots through every path (the adjacency is
nilpotent); `prune_graph` keeps the nodes and edges explaining most of the roots' attribution.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor

from core.graph_data import AttributionGraph, PrunedGraph


def normalize_matrix(adjacency: Float[Tensor, "target source"]) -> Float[Tensor, "target source"]:
    """|A| with every row scaled to sum to 1 (rows without inputs stay zero)."""
    magnitude = adjacency.abs()
    return magnitude / magnitude.sum(1, keepdim=True).clamp_min(1e-30)


def compute_influence(
    matrix: Float[Tensor, "target source"], weights: Float[Tensor, " node"], max_iters: int = 1000
) -> Float[Tensor, " node"]:
    """sum_{n>=1} weights M^n: what flows from the weighted targets back to every node (M nilpotent)."""
    current = weights @ matrix
    total = current.clone()
    for _ in range(max_iters):
        if not bool(current.any()):
            return total
        current = current @ matrix
        total += current
    raise ValueError("compute_influence: the graph has a cycle (the adjacency is not nilpotent)")


def node_influence(graph: AttributionGraph) -> Float[Tensor, " node"]:
    """Each node's share of the roots' normalised |attribution| (circuit-tracer's node influence)."""
    return compute_influence(normalize_matrix(graph.adjacency), graph.root_weights)


def total_attribution(graph: AttributionGraph) -> Float[Tensor, " node"]:
    """a_j * d(weighted roots)/d(a_j) through every path, features responding linearly.

    Equals the sum of the path-search contributions of every path that ends at node j.
    """
    per_unit = graph.adjacency / torch.where(graph.activation == 0, 1.0, graph.activation)[None, :]
    return compute_influence(per_unit, graph.root_weights) * graph.activation


def _threshold(scores: Tensor, fraction: float) -> float:
    """Smallest score among the top scores whose cumulative sum reaches `fraction` of the total."""
    ordered = torch.sort(scores.flatten(), descending=True).values
    total = ordered.sum()
    if total <= 0:
        return math.inf
    cumulative = torch.cumsum(ordered, 0) / total
    index = min(
        int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=cumulative.dtype))), ordered.numel() - 1
    )
    return float(ordered[index])


def prune_graph(graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PrunedGraph:
    """Keep the nodes explaining `node_threshold` of the roots' influence, then the edges explaining
    `edge_threshold` of it; roots and embeddings always stay; nodes left without edges are removed."""
    influence = node_influence(graph)
    roots = graph.root_weights != 0
    embeds = torch.zeros(graph.n_nodes, dtype=torch.bool)
    embeds[graph.n_features + graph.n_errors : graph.n_features + graph.n_errors + graph.n_embeds] = True
    candidates = ~roots & ~embeds
    node_mask = roots | embeds
    if candidates.any():
        node_mask |= candidates & (influence >= _threshold(influence[candidates], node_threshold))
    pruned = graph.adjacency * node_mask[:, None] * node_mask[None, :]
    normalised = normalize_matrix(pruned)
    target_weight = compute_influence(normalised, graph.root_weights) + graph.root_weights
    edge_score = normalised * target_weight[:, None]
    positive = edge_score > 0
    edge_mask = positive
    if positive.any():
        edge_mask = positive & (edge_score >= _threshold(edge_score[positive], edge_threshold))
    node_mask, edge_mask = _drop_isolated(graph, node_mask, edge_mask, roots, embeds)
    return PrunedGraph(node_mask, edge_mask, influence, edge_score)


def _drop_isolated(
    graph: AttributionGraph, node_mask: Tensor, edge_mask: Tensor, roots: Tensor, embeds: Tensor
) -> tuple[Tensor, Tensor]:
    """Repeatedly remove non-root nodes without outgoing edges and features without incoming ones."""
    features = torch.zeros_like(node_mask)
    features[: graph.n_features] = True
    while True:
        edge_mask = edge_mask & node_mask[:, None] & node_mask[None, :]
        keep = node_mask & (roots | embeds | edge_mask.any(0))
        keep &= ~features | edge_mask.any(1)
        if torch.equal(keep, node_mask):
            return node_mask, edge_mask
        node_mask = keep
