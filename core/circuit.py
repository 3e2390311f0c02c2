"""The storable circuit: nodes, edges and metadata shared by path graphs and full graphs.

`core.attribution.paths_to_graph` builds one from search paths, `core.graph.to_circuit` from a
(pruned) full graph; storage writes and reads it as graph.json.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple


class GraphNode(NamedTuple):
    id: str
    kind: str
    """root, feature, head, embed, error, bias, prune_error (path graphs); error = per-layer MLP error (full graphs)."""
    layer: int
    pos: int
    feature: int = -1
    head: int = -1
    dst: int = -1
    activation: float = math.nan
    attribution: float = math.nan
    """Attribution to the root: summed over the merged paths (path graph) or over every path (full graph)."""
    influence: float = math.nan
    """Full graphs: share of the roots' |attribution| flowing through the node (pruning score)."""
    label: str = ""


class GraphEdge(NamedTuple):
    source: str
    target: str
    weight: float


@dataclass
class Circuit:
    """A traced circuit ready to store: nodes, edges (source feeds target), the root's id, metadata."""

    nodes: list[GraphNode]
    edges: list[GraphEdge]
    root: str = "root"
    meta: dict = field(default_factory=dict)

    def node(self, node_id: str) -> GraphNode:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(node_id)

    def incoming(self, node_id: str) -> list[GraphEdge]:
        return [e for e in self.edges if e.target == node_id]
