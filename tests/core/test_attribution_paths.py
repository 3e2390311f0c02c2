"""Roots that cannot be traced, and what path search and merging make of a root (docs/method.md sections 5-7).

On the tiny LayerNorm model of tests/core/attribution_models.py: the beam search keeps exactly the best
extensions (checked against ranking every candidate by hand), path filters partition the paths, and the
merged path graph's incoming edges sum to each expanded node's attribution to 1e-9.
"""

from __future__ import annotations

import math

import pytest

from core import attribution as A
from core import paths as P
from core.circuit import PATH_GRAPH_KINDS
from tests.core.attribution_models import TOKENS, tiny_model, tiny_transcoders


def test_bad_roots_say_what_is_wrong():
    model = tiny_model()
    state = A.prepare(model, tiny_transcoders(layers=[0, 1]), TOKENS, max_layer=1)
    with pytest.raises(A.AttributionError, match="feature 99 is out of range"):
        A.feature_root(state, 1, 99)
    with pytest.raises(A.AttributionError, match="layer 2 has no transcoder"):
        A.feature_root(state, 2, 0)
    with pytest.raises(A.AttributionError, match="position 7 is out of range"):
        A.feature_root(state, 1, 0, pos=7)
    with pytest.raises(A.AttributionError, match="logit roots need the whole model"):
        A.logit_root(state, 3)


# ---------------------------------------------------------------- path search and graph


@pytest.fixture(scope="module")
def ln_state():
    model = tiny_model()
    return A.prepare(model, tiny_transcoders(), TOKENS)


def test_beam_search_keeps_the_best_extensions(ln_state):
    state = ln_state
    root = A.feature_root(state, 2, 3, 6)
    paths = P.find_paths(state, root, num_iters=3, num_branches=4)
    lengths = [len(p) for p in paths]
    assert lengths == sorted(lengths) and set(lengths) <= {2, 3, 4}
    first = [p for p in paths if len(p) == 2]
    # iteration 1 keeps the 4 children of the root with the largest |contrib|
    every = P.candidates(state, root, A.children(state, root))
    best = sorted((abs(c.contrib) for c in every), reverse=True)[:4]
    assert [abs(p[-1].contrib) for p in first] == pytest.approx(best, rel=1e-12)
    # every path of iteration 2 extends a path of iteration 1 and is among the best pooled ones
    second = [p for p in paths if len(p) == 3]
    assert all(p[:2] in [q for q in first] for p in second)
    pool = [
        abs(c.contrib)
        for q in first
        if not P.is_leaf(q[-1])
        for c in P.candidates(state, q[-1], A.children(state, q[-1]))
    ]
    assert min(abs(p[-1].contrib) for p in second) >= sorted(pool, reverse=True)[len(second) - 1] - 1e-12
    assert all(not P.is_leaf(p[-2]) for p in paths if len(p) > 2)


def test_signed_ranking_and_bos_skipping(ln_state):
    state = ln_state
    root = A.feature_root(state, 2, 3, 6)
    signed = P.find_paths(state, root, 1, 6, signed=True)
    values = [p[-1].contrib for p in signed]
    assert values == sorted(values, reverse=True)
    absolute = P.find_paths(state, root, 1, 30, skip_bos=True)
    assert not any(p[-1].kind == "head" and p[-1].pos == 0 for p in absolute)
    with_bos = P.candidates(state, root, A.children(state, root), skip_bos=False)
    assert any(c.kind == "head" and c.src == 0 for c in with_bos)


def test_path_filters(ln_state):
    state = ln_state
    root = A.feature_root(state, 2, 3, 6)
    paths = P.find_paths(state, root, 3, 6)
    target = next(p[-1] for p in paths if p[-1].kind == "feature")
    pattern = P.NodePattern.parse(f"F{target.layer}.{target.feature}@{target.pos}")
    through = P.filter_paths(paths, through=[pattern])
    avoid = P.filter_paths(paths, not_through=[pattern])
    assert through and all(any(pattern.matches(n) for n in p) for p in through)
    assert len(through) + len(avoid) == len(paths)
    assert P.NodePattern.parse("H1.2") == P.NodePattern("head", 1, None, head=2)
    assert P.NodePattern.parse("F2") == P.NodePattern("feature", 2) and P.NodePattern.parse("H") == P.NodePattern(
        "head"
    )
    for bad in ("E1", "F1.", "H1.2.3"):
        with pytest.raises(A.AttributionError, match="node pattern"):
            P.NodePattern.parse(bad)
    with pytest.raises(A.AttributionError, match="node pattern"):
        P.NodePattern.parse("X1")


def test_graph_merge_sums_exactly(ln_state):
    """Every expanded node's incoming edges (children, error, bias, prune error) sum to its
    attribution; merged attributions are sums over distinct prefixes."""
    state = ln_state
    root = A.feature_root(state, 2, 3, 6)
    result = P.trace(state, root, num_iters=3, num_branches=6)
    circuit = result.circuit
    ids = [n.id for n in circuit.nodes]
    assert len(ids) == len(set(ids))
    expanded = {e.target for e in circuit.edges}
    for nid in expanded:
        node = circuit.node(nid)
        incoming = sum(e.weight for e in circuit.incoming(nid))
        assert abs(incoming - node.attribution) < 1e-9
        kinds = {circuit.node(e.source).kind for e in circuit.incoming(nid)}
        assert {"error", "bias", "prune_error"} <= kinds
    assert abs(circuit.node("root").attribution - root.contrib) < 1e-12
    # a node reached by several prefixes carries their summed contribution
    prefixes = {}
    for path in result.paths:
        for j in range(1, len(path)):
            prefixes[tuple(n.key for n in path[: j + 1])] = path[j].contrib
    for node in circuit.nodes:
        if node.kind in ("feature", "head", "embed"):
            total = sum(c for k, c in prefixes.items() if k[-1] == node.id)
            assert abs(total - node.attribution) < 1e-12


def test_prune_error_is_what_the_search_left_out(ln_state):
    """The prune error of the root equals the sum of its children that are not in the graph."""
    state = ln_state
    root = A.feature_root(state, 2, 3, 6)
    circuit = P.trace(state, root, num_iters=1, num_branches=3).circuit
    ch = A.children(state, root)
    kept = {e.source for e in circuit.incoming("root")}
    left_out = 0.0
    for c in P.candidates(state, root, ch, skip_bos=False):
        child = A.make_child(state, root, c)
        if child.key not in kept:
            left_out += c.contrib
    prune = circuit.node("root|prune_error").attribution
    assert abs(prune - left_out) < 1e-9
    assert math.isfinite(prune)


def test_path_graph_nodes_come_in_the_documented_order(ln_state):
    """core.circuit's node order for path graphs: search nodes as the paths first reach them (root
    first), then the error, bias and prune_error nodes of every expanded node in that order."""
    state = ln_state
    result = P.trace(state, A.feature_root(state, 2, 3, 6), num_iters=2, num_branches=4)
    first_seen = list(dict.fromkeys(n.key for path in result.paths for n in path))
    ids = [n.id for n in result.circuit.nodes]
    assert ids[: len(first_seen)] == first_seen and ids[0] == "root"
    expanded = [k for k in first_seen if any(e.target == k for e in result.circuit.edges)]
    terms = [f"{k}|{kind}" for k in expanded for kind in ("error", "bias", "prune_error")]
    assert ids[len(first_seen) :] == terms
    assert {n.kind for n in result.circuit.nodes} <= set(PATH_GRAPH_KINDS)
