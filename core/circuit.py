"""The graph vocabulary shared by path search and full graphs: nodes, edges, a documented node order.

`core.attribution.paths_to_graph` builds a `Circuit` from search paths, `core.graph.to_circuit` from a
(pruned) full graph (`core.graph_data.AttributionGraph`, whose dense matrix uses the same ids); storage
writes it as nodes/edges.parquet and graph.json and reads it back for the dashboards and
`circuitflow serve`. This module holds names and data only (no computation, no torch).

Node ids: `root` (`root0`, `root1`, ... when a full graph has several roots), `F{layer}.{feature}@{pos}`
(transcoder feature), `H{layer}.{head}@{src}>{dst}` (attention head, source to destination token),
`E@{pos}` (token embedding), `err{layer}@{pos}` and `drop{layer}@{pos}` (full graphs: a layer's MLP
error, the summed features left out by `max_features`), `{parent}|error`, `{parent}|bias`,
`{parent}|prune_error` (path graphs: the terms of an expanded node that no path explains).

Node order (`Circuit.nodes`):
- path graphs: the search nodes in the order the paths first reach them (the root first), then, for
  every expanded node in that same order, its `error`, `bias` and `prune_error` nodes;
- full graphs: `FULL_GRAPH_ORDER` by kind; features by (layer, token, feature index), errors and
  dropped sources by (layer, token), embeddings by token, roots in the order they were given.
Edges (`source` feeds `target`) carry the source's direct effect on the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

PATH_GRAPH_KINDS = ("root", "feature", "head", "embed", "error", "bias", "prune_error")
"""Node kinds of a path graph (`Circuit.meta["kind"] == "paths"`)."""
FULL_GRAPH_ORDER = ("feature", "error", "dropped", "embed", "root")
"""Node kinds of a full graph (`Circuit.meta["kind"] == "full"`), in the order its nodes come."""


class GraphNode(NamedTuple):
    id: str
    kind: str
    """One of PATH_GRAPH_KINDS or FULL_GRAPH_ORDER; `error` is a node's transcoder errors (path graphs) or
    one layer's MLP error at one token (full graphs)."""
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
