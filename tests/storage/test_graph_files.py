"""graph.json round trip: what the trace stage writes, `circuitflow serve` reads back unchanged.

Both kinds of circuit (path graph, pruned full graph) of a tiny float64 model are written with
storage.graphs.write_graphs and read with storage.web.load_records into the same core.circuit
vocabulary: ids, node order, every field (NaN stays NaN), edges and root are equal.
"""

from __future__ import annotations

import math

import pytest

from core import attribution as A
from core import graph as G
from core import paths as P
from core.circuit import Circuit
from storage import graphs, web
from tests.core.attribution_models import TOKENS, tiny_model, tiny_transcoders


@pytest.fixture(scope="module")
def records():
    state = A.prepare(tiny_model(), tiny_transcoders(), TOKENS)
    root = A.feature_root(state, 2, 3, 6)
    full = G.full_graph(state, [root])
    tokens = [str(t) for t in TOKENS.tolist()]
    return [
        graphs.GraphRecord(0, "paths", P.trace(state, root, num_iters=2, num_branches=4).circuit, tokens, "p"),
        graphs.GraphRecord(0, "full", G.to_circuit(full, G.prune_graph(full)), tokens, "p"),
    ]


def same(a: float, b: float) -> bool:
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


def test_graph_json_reads_back_into_the_same_circuits(records, tmp_path):
    graphs.write_graphs(records, tmp_path)
    back = web.load_records(tmp_path / graphs.GRAPH_JSON)
    assert [b.kind for b in back] == ["paths", "full"]
    for rec, got in zip(records, back, strict=True):
        assert isinstance(got.circuit, Circuit)
        assert [n.id for n in got.circuit.nodes] == [n.id for n in rec.circuit.nodes]
        for x, y in zip(rec.circuit.nodes, got.circuit.nodes, strict=True):
            assert all(same(getattr(x, f), getattr(y, f)) for f in x._fields), (x, y)
        assert got.circuit.edges == rec.circuit.edges and got.circuit.root == rec.circuit.root
        assert got.circuit.meta["kind"] == rec.kind and got.tokens == rec.tokens
