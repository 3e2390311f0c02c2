"""Path search over the attribution tree (paper Alg. 1), path filters, and trace in one call.

A node's children come from `core.attribution.children`; the search ranks them, keeps a beam of
the best paths per iteration, and stops at leaves. A leaf is any node at the first residual site
(the embedding, and a layer-0 attention head's source vector, whose only child would be the
embedding repeating the head's value), as in the original transcoder-circuits search.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from core.attribution import (
    AttributionError,
    Candidate,
    Children,
    Circuit,
    Node,
    NodeKind,
    Path,
    PromptState,
    children,
    make_child,
    paths_to_graph,
)

# ---------------------------------------------------------------- candidates of a node


def candidates(
    state: PromptState,
    node: Node,
    ch: Children,
    skip_bos: bool = True,
    k: int | None = None,
    signed: bool = False,
    head_cap: int | None = None,
) -> list[Candidate]:
    """Children that can extend a path: active features, every (head, source) pair, the embedding.

    With `k`, only each group's k best are returned (the overall top k is always among them): a
    group is one transcoder layer's features or one attention layer's (head, source) pairs. With
    `head_cap`, an attention layer offers at most that many (head, source) pairs.
    """
    out: list[Candidate] = []
    for layer, contribs in ch.features.items():
        active = torch.nonzero(state.z[layer][node.pos]).flatten()
        for j in _best(contribs[active], k, signed):
            out.append(Candidate("feature", layer, int(active[j]), node.pos, float(contribs[active[j]])))
    first = 1 if skip_bos else 0
    per_layer = k if head_cap is None else min(head_cap, k if k is not None else head_cap)
    for layer, contribs in ch.heads.items():
        flat = contribs[:, first:]  # [head src]
        for i in _best(flat.flatten(), per_layer, signed):
            h, s = divmod(i, flat.shape[1])
            out.append(Candidate("head", layer, h, s + first, float(flat[h, s])))
    out.append(Candidate("embed", -1, -1, node.pos, ch.embed))
    return out


def _best(values: Tensor, k: int | None, signed: bool) -> list[int]:
    if k is None or k >= values.numel():
        return list(range(values.numel()))
    scores = values if signed else values.abs()
    return torch.topk(scores, k).indices.tolist()


def _rank(value: float, signed: bool) -> float:
    return value if signed else abs(value)


def top_candidates(cands: list[Candidate], k: int, signed: bool = False) -> list[Candidate]:
    """The k best candidates by |contrib| (or signed contrib, the original ranking), best first."""
    return sorted(cands, key=lambda c: _rank(c.contrib, signed), reverse=True)[:k]


def is_leaf(node: Node) -> bool:
    """Nodes at the first residual site (embedding, layer-0 head sources) are not expanded."""
    return node.site == 0


@dataclass(frozen=True)
class SearchOptions:
    """How `find_paths` ranks and limits children (defaults: |contrib|, BOS skipped, no head cap)."""

    num_branches: int = 15
    signed: bool = False
    skip_bos: bool = True
    head_cap: int | None = None
    """At most this many (head, source) children per attention layer for each parent (the original
    used the model's head count); None: every pair competes."""


def top_children(state: PromptState, node: Node, k: int, signed: bool = False, skip_bos: bool = True) -> list[Node]:
    """The node's k best children as nodes (a leaf has none)."""
    opts = SearchOptions(k, signed, skip_bos)
    return [make_child(state, node, c) for c in _top(state, node, opts)]


def _top(state: PromptState, node: Node, opts: SearchOptions) -> list[Candidate]:
    if is_leaf(node):
        return []
    k = opts.num_branches
    cands = candidates(state, node, children(state, node), opts.skip_bos, k, opts.signed, opts.head_cap)
    return top_candidates(cands, k, opts.signed)


# ---------------------------------------------------------------- path search (Alg. 1)


def find_paths(
    state: PromptState,
    root: Node,
    num_iters: int = 3,
    num_branches: int = 15,
    signed: bool = False,
    skip_bos: bool = True,
    *,
    head_cap: int | None = None,
) -> list[Path]:
    """Beam search for the paths that carry most attribution to `root` (paper Alg. 1).

    Each iteration extends every path in the beam by its top `num_branches` children, pools the
    extensions and keeps the best `num_branches`; paths ending at a leaf (`is_leaf`) are not
    extended. Returns the beam of every iteration (paths of length 2..num_iters+1), best first per
    iteration.
    """
    opts = SearchOptions(num_branches, signed, skip_bos, head_cap)
    beam: list[Path] = [(root,)]
    found: list[Path] = []
    for _ in range(num_iters):
        pool = [(path, cand) for path in beam for cand in _top(state, path[-1], opts)]
        pool.sort(key=lambda pc: _rank(pc[1].contrib, signed), reverse=True)  # stable: ties keep beam order
        beam = [path + (make_child(state, path[-1], cand),) for path, cand in pool[:num_branches]]
        found += beam
        if not beam:
            break
    return found


# ---------------------------------------------------------------- path filters


@dataclass(frozen=True)
class NodePattern:
    """Matches nodes whose given fields are equal (None = any). Parse `F3.120@5`, `H2.1`, `E@4`."""

    kind: NodeKind | None = None
    layer: int | None = None
    pos: int | None = None
    feature: int | None = None
    head: int | None = None

    def matches(self, node: Node) -> bool:
        wanted = {"kind": self.kind, "layer": self.layer, "pos": self.pos, "feature": self.feature, "head": self.head}
        return all(value is None or getattr(node, name) == value for name, value in wanted.items())

    @classmethod
    def parse(cls, text: str) -> NodePattern:
        """`F3.120@5` (a feature at a token), `F3` (any feature of layer 3), `H2.1` (a head, any source
        token), `H2`, `E@4`, or just `F` / `H` / `E` (any node of that kind)."""
        match = re.fullmatch(r"\s*([FHE])(?:(\d+)(?:\.(\d+))?)?(?:@(\d+))?\s*", text)
        if not match or (match.group(1) == "E" and match.group(2) is not None):
            raise AttributionError(
                f"node pattern {text!r}: expected F[<layer>[.<feature>]][@pos], H[<layer>[.<head>]][@pos] or E[@pos]"
            )
        letter, a, b, pos = match.groups()
        kind = {"F": "feature", "H": "head", "E": "embed"}[letter]
        layer, index, at = (None if x is None else int(x) for x in (a, b, pos))
        if kind == "feature":
            return cls("feature", layer, at, feature=index)
        if kind == "head":
            return cls("head", layer, at, head=index)
        return cls("embed", pos=at)


def filter_paths(
    paths: Iterable[Path], through: Sequence[NodePattern] = (), not_through: Sequence[NodePattern] = ()
) -> list[Path]:
    """Paths that pass through a node matching every `through` pattern and none of `not_through`."""
    kept = []
    for path in paths:
        if all(any(p.matches(n) for n in path) for p in through) and not any(
            p.matches(n) for p in not_through for n in path
        ):
            kept.append(path)
    return kept


# ---------------------------------------------------------------- one call


class TraceResult(NamedTuple):
    root: Node
    paths: list[Path]
    circuit: Circuit


def trace(
    state: PromptState,
    root: Node,
    num_iters: int = 3,
    num_branches: int = 15,
    signed: bool = False,
    skip_bos: bool = True,
    through: Sequence[NodePattern] = (),
    not_through: Sequence[NodePattern] = (),
    *,
    head_cap: int | None = None,
) -> TraceResult:
    """Path search, filters and graph merge in one call."""
    paths = find_paths(state, root, num_iters, num_branches, signed, skip_bos, head_cap=head_cap)
    if through or not_through:
        paths = filter_paths(paths, through, not_through)
    circuit = paths_to_graph(state, [(root,)] + paths)
    circuit.meta.update(root=root.label, root_value=root.contrib, num_iters=num_iters, num_branches=num_branches)
    if head_cap is not None:
        circuit.meta["head_cap"] = head_cap
    return TraceResult(root, paths, circuit)
