"""Trace-stage artifacts: nodes.parquet, edges.parquet, graph.json (for a viewer) and graph.html
(self-contained inline SVG: layers up, tokens across, edge width = |weight|), plus the DuckDB views."""

from __future__ import annotations

import html
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from storage.layout import atomic_file
from storage.tables import write_table

if TYPE_CHECKING:  # annotations only (the graph vocabulary, core.circuit)
    from core.circuit import Circuit, GraphNode

NODES_FILE = "nodes.parquet"
EDGES_FILE = "edges.parquet"
GRAPH_JSON = "graph.json"
GRAPH_HTML = "graph.html"
MAX_DRAWN_EDGES = 250
"""The picture draws at most this many edges (the largest |weight|); the tables keep them all."""

NODES_SCHEMA = pa.schema(
    [
        ("root", pa.int32()),
        ("graph", pa.string()),
        ("id", pa.string()),
        ("kind", pa.string()),
        ("layer", pa.int32()),
        ("pos", pa.int32()),
        ("token", pa.string()),
        ("feature", pa.int32()),
        ("head", pa.int32()),
        ("dst", pa.int32()),
        ("activation", pa.float64()),
        ("attribution", pa.float64()),
        ("influence", pa.float64()),
        ("label", pa.string()),
    ]
)
EDGES_SCHEMA = pa.schema(
    [
        ("root", pa.int32()),
        ("graph", pa.string()),
        ("source", pa.string()),
        ("target", pa.string()),
        ("weight", pa.float64()),
    ]
)


@dataclass
class GraphRecord:
    """One traced graph with what a reader needs to make sense of it."""

    root: int
    """Index of the root in the config (0 for an ad-hoc trace)."""
    kind: str
    """`paths` (the paper's path search) or `full` (pruned full attribution graph)."""
    circuit: Circuit
    tokens: list[str]
    """Text of every prompt token, BOS first."""
    prompt: str
    paths: list[dict[str, Any]] = field(default_factory=list)
    """Path graphs: the found paths, best first per length: {"nodes": [ids], "contrib": x}."""


def _num(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    """NaN (not applicable) as null, so graph.json is strict JSON."""
    return {k: _num(v) if isinstance(v, float) else v for k, v in row.items()}


def _token(rec: GraphRecord, pos: int) -> str:
    return rec.tokens[pos] if 0 <= pos < len(rec.tokens) else ""


def nodes_table(records: list[GraphRecord]) -> pa.Table:
    cols: dict[str, list] = {name: [] for name in NODES_SCHEMA.names}
    for rec in records:
        for n in rec.circuit.nodes:
            row = {
                "root": rec.root, "graph": rec.kind, "id": n.id, "kind": n.kind, "layer": n.layer, "pos": n.pos,
                "token": _token(rec, n.pos), "feature": n.feature, "head": n.head, "dst": n.dst,
                "activation": _num(n.activation), "attribution": _num(n.attribution),
                "influence": _num(n.influence), "label": n.label,
            }  # fmt: skip
            for name, value in row.items():
                cols[name].append(value)
    return pa.Table.from_pydict(cols, schema=NODES_SCHEMA)


def edges_table(records: list[GraphRecord]) -> pa.Table:
    cols: dict[str, list] = {name: [] for name in EDGES_SCHEMA.names}
    for rec in records:
        for e in rec.circuit.edges:
            for name, value in zip(EDGES_SCHEMA.names, (rec.root, rec.kind, e.source, e.target, e.weight), strict=True):
                cols[name].append(value)
    return pa.Table.from_pydict(cols, schema=EDGES_SCHEMA)


def graph_json(records: list[GraphRecord]) -> dict[str, Any]:
    """Everything a graph viewer needs, one entry per graph."""
    graphs = []
    for rec in records:
        graphs.append(
            {
                "root": rec.root,
                "graph": rec.kind,
                "prompt": rec.prompt,
                "tokens": rec.tokens,
                "root_id": rec.circuit.root,
                "meta": rec.circuit.meta,
                "nodes": [{**_finite(n._asdict()), "token": _token(rec, n.pos)} for n in rec.circuit.nodes],
                "edges": [e._asdict() for e in rec.circuit.edges],
                "paths": rec.paths,
            }
        )
    return {"graphs": graphs}


def write_graphs(records: list[GraphRecord], out: str | Path) -> dict[str, str]:
    """Write nodes.parquet, edges.parquet, graph.json and graph.html into `out`; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_table(nodes_table(records), out / NODES_FILE)
    write_table(edges_table(records), out / EDGES_FILE)
    with atomic_file(out / GRAPH_JSON) as tmp:
        tmp.write_text(json.dumps(graph_json(records), allow_nan=False, default=_json_default, indent=1))
    with atomic_file(out / GRAPH_HTML) as tmp:
        tmp.write_text(render_page(records))
    return {name: str(out / name) for name in (NODES_FILE, EDGES_FILE, GRAPH_JSON, GRAPH_HTML)}


def _json_default(value: Any) -> Any:
    raise TypeError(f"graph.json: cannot store {type(value).__name__}")


# ---------------------------------------------------------------- the picture

ROW_HEIGHT = 64
COLUMN_WIDTH = 96
NARROW_WIDTH = 22
MARGIN = 60


def _row(node: GraphNode) -> float:
    """Vertical level: embedding 0, attention of layer l at 2l+1, MLP (features, errors) at 2l+2."""
    if node.kind == "embed":
        return 0.0
    if node.kind == "head":
        return 2.0 * node.layer + 1
    return 2.0 * node.layer + 2


def _columns(nodes: list[GraphNode], n_tokens: int) -> list[float]:
    """Left edge of every token column: wide where nodes sit, narrow elsewhere (plus the right end)."""
    used = {n.pos for n in nodes}
    edges, x = [], float(MARGIN)
    for pos in range(n_tokens):
        edges.append(x)
        x += COLUMN_WIDTH if pos in used else NARROW_WIDTH
    return edges + [x]


def _layout(nodes: list[GraphNode], columns: list[float]) -> dict[str, tuple[float, float]]:
    """x (pixels) and level of every node; a path graph's error terms sit just below their node."""
    rows = {n.id: _row(n) for n in nodes if "|" not in n.id and n.kind != "root"}
    top = max(rows.values(), default=0.0) + 1
    rows.update({n.id: top for n in nodes if n.kind == "root"})
    rows.update({n.id: rows.get(n.id.split("|")[0], top) - 0.45 for n in nodes if "|" in n.id})
    cells: dict[tuple[float, int], list[str]] = defaultdict(list)
    for n in nodes:
        cells[(rows[n.id], n.pos)].append(n.id)
    coords = {}
    for (level, pos), ids in cells.items():
        step = min(22.0, (COLUMN_WIDTH - 16) / len(ids))
        centre = (columns[pos] + columns[pos + 1]) / 2
        for i, nid in enumerate(ids):
            coords[nid] = (centre + (i - (len(ids) - 1) / 2) * step, level)
    return coords


def _color(value: float, scale: float) -> str:
    """Blue for positive, red for negative attribution, paler when small."""
    if not math.isfinite(value) or scale <= 0:
        return "#bbbbbb"
    strength = min(abs(value) / scale, 1.0)
    light = int(235 - 150 * strength)
    return f"rgb({light},{light},255)" if value >= 0 else f"rgb(255,{light},{light})"


def render_svg(rec: GraphRecord, link: Any = None) -> str:
    """The graph as an inline SVG: layers up, tokens across, edge width = |weight|; with `link`
    ((layer, feature) -> href), the root and feature nodes link to their feature pages."""
    circuit = rec.circuit
    edges = sorted(circuit.edges, key=lambda e: -abs(e.weight))[:MAX_DRAWN_EDGES]
    keep = {circuit.root} | {e.source for e in edges} | {e.target for e in edges}
    nodes = [n for n in circuit.nodes if n.id in keep]
    columns = _columns(nodes, len(rec.tokens))
    coords = _layout(nodes, columns)
    top = max((y for _, y in coords.values()), default=1.0)
    height = int(MARGIN * 2 + top * ROW_HEIGHT)
    width = int(columns[-1] + MARGIN)

    def y(level: float) -> float:
        return height - MARGIN - level * ROW_HEIGHT

    parts = []
    w_max = max((abs(e.weight) for e in edges), default=1.0) or 1.0
    for e in sorted(edges, key=lambda e: abs(e.weight)):
        (x1, l1), (x2, l2) = coords[e.source], coords[e.target]
        stroke = "#3b6fd8" if e.weight >= 0 else "#d83b3b"
        tip = html.escape(f"{e.source} -> {e.target}: {e.weight:.4g}")
        parts.append(
            f'<line x1="{x1:.1f}" y1="{y(l1):.1f}" x2="{x2:.1f}" y2="{y(l2):.1f}" stroke="{stroke}" '
            f'stroke-opacity="0.55" stroke-width="{0.6 + 6 * abs(e.weight) / w_max:.2f}"><title>{tip}</title></line>'
        )
    a_max = max((abs(n.attribution) for n in nodes if n.kind != "root" and math.isfinite(n.attribution)), default=1.0)
    for n in nodes:
        x, level = coords[n.id]
        node = _node_svg(rec, n, x, y(level), a_max)
        href = link(n.layer, n.feature) if link and n.kind in ("root", "feature") and n.feature >= 0 else None
        parts.append(f'<a href="{html.escape(href)}">{node}</a>' if href else node)
    for pos, text in enumerate(rec.tokens):
        cx, cy = (columns[pos] + columns[pos + 1]) / 2, height - MARGIN / 2
        turn = f' transform="rotate(-60 {cx:.1f} {cy:.1f})"' if columns[pos + 1] - columns[pos] < COLUMN_WIDTH else ""
        parts.append(
            f'<text x="{cx:.1f}" y="{cy:.1f}" text-anchor="middle" font-size="11"{turn}>'
            f"{html.escape(_visible(text))}<title>token {pos}</title></text>"
        )
    for level in range(1, int(top)):
        name = f"attn {(level - 1) // 2}" if level % 2 else f"mlp {(level - 2) // 2}"
        parts.append(f'<text x="4" y="{y(level) + 4:.1f}" font-size="10" fill="#777">{name}</text>')
    body = "".join(parts)
    return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">{body}</svg>'


def _node_svg(rec: GraphRecord, n: GraphNode, x: float, y: float, a_max: float) -> str:
    tip = f"{n.label or n.id} [{_visible(_token(rec, n.pos))}] attribution {n.attribution:.4g}"
    if math.isfinite(n.activation):
        tip += f", activation {n.activation:.4g}"
    tip = html.escape(tip)
    if n.kind == "root":
        return (
            f'<rect x="{x - 9:.1f}" y="{y - 9:.1f}" width="18" height="18" fill="#ffd24d" stroke="#333">'
            f"<title>{tip}</title></rect>"
        )
    r = 4 + 8 * min(abs(n.attribution) / a_max, 1.0) if math.isfinite(n.attribution) and a_max > 0 else 4
    fill = _color(n.attribution, a_max)
    if n.kind in ("error", "bias", "prune_error", "dropped"):
        return (
            f'<rect x="{x - r:.1f}" y="{y - r:.1f}" width="{2 * r:.1f}" height="{2 * r:.1f}" fill="{fill}" '
            f'stroke="#888" stroke-dasharray="2,2"><title>{tip}</title></rect>'
        )
    shape = "#333" if n.kind == "feature" else "#999"
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r:.1f}" fill="{fill}" stroke="{shape}"><title>{tip}</title></circle>'


def _visible(text: str) -> str:
    """Whitespace-only tokens made visible; newlines and tabs as arrows."""
    text = text.replace("\n", "⏎").replace("\t", "⇥")
    return "␣" * len(text) if text.isspace() else text or "∅"


def summary_rows(circuit: Circuit, k: int = 15) -> list[dict[str, Any]]:
    """The k nodes with the largest |attribution|, after the root's own error terms (path graphs)."""
    rows = [n for n in circuit.nodes if n.id != circuit.root and math.isfinite(n.attribution)]
    rows.sort(key=lambda n: -abs(n.attribution))
    picked = [n for n in rows if n.id.startswith(f"{circuit.root}|")]
    picked += [n for n in rows if n not in picked][:k]
    return [n._asdict() for n in picked]


def root_terms(circuit: Circuit) -> dict[str, float]:
    """What the root's value is made of: its direct terms by kind (full graphs) or its error terms
    and traced children (path graphs)."""
    if "root_terms" in circuit.meta:
        return dict(circuit.meta["root_terms"])
    terms: dict[str, float] = {}
    for e in circuit.incoming(circuit.root):
        kind = e.source.split("|")[1] if "|" in e.source else "traced children"
        terms[kind] = terms.get(kind, 0.0) + e.weight
    return terms


def _terms_text(terms: dict[str, float]) -> str:
    return " + ".join(f"{html.escape(k)} {v:.4g}" for k, v in terms.items()) or "?"


def render_page(records: list[GraphRecord], link: Any = None) -> str:
    """The trace page: per graph its root terms, the SVG and the largest nodes; `link` as in render_svg."""
    sections = []
    for rec in records:
        root = rec.circuit.node(rec.circuit.root)
        rows = "".join(
            f"<tr><td>{html.escape(r['id'])}</td><td>{html.escape(r['kind'])}</td>"
            f"<td>{html.escape(_visible(_token(rec, r['pos'])))}</td><td>{r['attribution']:.4g}</td></tr>"
            for r in summary_rows(rec.circuit)
        )
        shown = min(len(rec.circuit.edges), MAX_DRAWN_EDGES)
        sections.append(
            f"<section><h2>root {rec.root}: {html.escape(root.label or root.id)} = {root.attribution:.4g} "
            f"({html.escape(rec.kind)} graph)</h2>"
            f"<p>Root = {_terms_text(root_terms(rec.circuit))}.</p>"
            f"<p>{len(rec.circuit.nodes)} nodes, {len(rec.circuit.edges)} edges ({shown} largest drawn). "
            "Blue: positive, red: negative; dashed squares: error, bias and pruned terms.</p>"
            f"<div class='svg'>{render_svg(rec, link)}</div>"
            f"<table><tr><th>node</th><th>kind</th><th>token</th><th>attribution</th></tr>{rows}</table></section>"
        )
    prompt = html.escape(records[0].prompt) if records else ""
    style = (
        "body{font-family:sans-serif;margin:20px}.svg{overflow-x:auto;border:1px solid #ddd}"
        "table{border-collapse:collapse;margin-top:8px}td,th{border:1px solid #ddd;padding:2px 6px;font-size:12px}"
    )
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>circuitflow trace</title>'
        f"<style>{style}</style></head><body><h1>Circuit trace</h1><p>Prompt: <code>{prompt}</code></p>"
        f"{''.join(sections)}</body></html>"
    )
