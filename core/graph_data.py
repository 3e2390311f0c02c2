"""The dense attribution graph (`AttributionGraph`), its pruning masks, and its conversion to a `Circuit`.

Node order, fixed by `core.graph.full_graph`: active features, then per-layer error nodes (layer-major,
one per token) and dropped-feature sources, then token embeddings, then roots. `to_circuit` turns a
(pruned) graph into the storable nodes-and-edges form shared with path graphs (`core.circuit`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from core.circuit import Circuit, GraphEdge, GraphNode


@dataclass
class AttributionGraph:
    """Dense direct-effect graph. Node order: features, errors (and dropped features), embeddings, roots.

    adjacency[k, j] = a_j * d(value_k)/d(a_j) with everything but node j frozen, where a_j is j's
    activation (1 for errors and embeddings). Every target's value is exactly the sum of its row
    plus `bias[k]` (constants from biases and normalisation offsets).
    """

    nodes: list[GraphNode]
    adjacency: Float[Tensor, "target source"]
    bias: Float[Tensor, " node"]
    value: Float[Tensor, " node"]
    """Features: pre-activation; roots: root value; errors and embeddings: 1."""
    activation: Float[Tensor, " node"]
    """Features: z; roots: value; errors and embeddings: 1."""
    root_weights: Float[Tensor, " node"]
    n_features: int
    n_errors: int
    """Error and dropped-feature nodes (frozen sources), after the features."""
    n_embeds: int
    n_roots: int

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    def index(self, node_id: str) -> int:
        for i, n in enumerate(self.nodes):
            if n.id == node_id:
                return i
        raise KeyError(node_id)


@dataclass
class PrunedGraph:
    node_mask: Bool[Tensor, " node"]
    edge_mask: Bool[Tensor, "target source"]
    node_influence: Float[Tensor, " node"]
    edge_score: Float[Tensor, "target source"]


def to_circuit(graph: AttributionGraph, pruned: PrunedGraph | None = None) -> Circuit:
    """Nodes and edges of a (pruned) graph as a storable circuit; edge weights are the direct effects."""
    node_mask = pruned.node_mask if pruned is not None else torch.ones(graph.n_nodes, dtype=torch.bool)
    edge_mask = pruned.edge_mask if pruned is not None else graph.adjacency != 0
    edge_mask = edge_mask & node_mask[:, None] & node_mask[None, :]
    keep: Int[Tensor, " kept"] = torch.nonzero(node_mask).flatten()
    nodes = [graph.nodes[i] for i in keep.tolist()]
    edges = [
        GraphEdge(graph.nodes[s].id, graph.nodes[t].id, float(graph.adjacency[t, s]))
        for t, s in torch.nonzero(edge_mask).tolist()
    ]
    root_index = int(torch.nonzero(graph.root_weights).flatten()[0])
    meta = {
        "kind": "full",
        "n_nodes_total": graph.n_nodes,
        "n_edges_total": int((graph.adjacency != 0).sum()),
        "root_terms": root_terms(graph, root_index),
    }
    return Circuit(nodes, edges, graph.nodes[root_index].id, meta)


def root_terms(graph: AttributionGraph, root: int) -> dict[str, float]:
    """A root's value split by the kind of its direct sources (before pruning), plus its bias."""
    terms: dict[str, float] = {}
    for node, weight in zip(graph.nodes, graph.adjacency[root].tolist(), strict=True):
        terms[node.kind] = terms.get(node.kind, 0.0) + weight
    terms.pop("root", None)
    terms["bias"] = float(graph.bias[root])
    return terms
