"""Feature dashboards: a self-contained static HTML page per feature (stats, density histogram, top
and banded examples with per-token highlighting, input-invariant views) and an index of all
features, read through the DuckDB views of storage.catalog. No scripts, no external resources.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import duckdb

from core.errors import UserError
from storage.layout import atomic_file

HIGHLIGHT = (255, 122, 0)
"""RGB of a token at the feature's maximum activation; lower activations are lighter."""

Link = Callable[[int, int], "str | None"]
"""(layer, feature) -> href of that feature's page, or None when there is no page."""


class FeatureNotFound(UserError, LookupError):
    """The requested feature is not in the mined tables."""


@dataclass
class Example:
    """One example of a feature: a context window with the feature's activation on every token."""

    band: int
    rank: int
    row: int
    pos: int
    act: float
    texts: list[str]
    """Token texts of the window."""
    acts: list[float]
    """The feature's activation on each window token (0 where it did not fire)."""
    center: int
    """Index of the example's token in the window."""


@dataclass
class FeaturePage:
    """Everything a feature's page shows."""

    layer: int
    feature: int
    stats: dict[str, Any]
    examples: list[Example] = field(default_factory=list)
    views: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    n_tokens: int = 0
    levels: list[float] = field(default_factory=list)
    """The activation each band is centred on (core.mining.band_levels), highest first; empty: not known."""

    def top(self) -> list[Example]:
        return [e for e in self.examples if e.band < 0]

    def bands(self) -> dict[int, list[Example]]:
        out: dict[int, list[Example]] = {}
        for e in self.examples:
            if e.band >= 0:
                out.setdefault(e.band, []).append(e)
        return out


# ---------------------------------------------------------------- loading through SQL


def query_rows(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
    cursor = con.execute(sql, params or [])
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, r, strict=True)) for r in cursor.fetchall()]


def _has(con: duckdb.DuckDBPyConnection, view: str) -> bool:
    found = con.execute("select count(*) from duckdb_views() where view_name = ?", [view]).fetchall()
    return bool(found[0][0])


def load_feature(
    con: duckdb.DuckDBPyConnection,
    layer: int,
    feature: int,
    before: int = 12,
    after: int = 4,
    band_levels: Callable[[float, float, int], Sequence[float]] | None = None,
) -> FeaturePage:
    """Read one feature's stats, examples (with context windows) and views from the catalog views.
    `band_levels(min_act, max_act, num_bands)` (core.mining's, passed by the caller) labels the bands."""
    for view in ("feature_stats", "top_examples", "tokens", "vocab"):
        if not _has(con, view):
            raise FeatureNotFound(f"the store has no {view} table; run the mine stage first (circuitflow run CONFIG)")
    stats = query_rows(con, "select * from feature_stats where layer = ? and feature = ?", [layer, feature])
    if not stats:
        raise FeatureNotFound(_not_found(con, layer, feature))
    page = FeaturePage(layer, feature, stats[0], n_tokens=_n_tokens(con, layer))
    page.examples = _examples(con, layer, feature, before, after)
    if _has(con, "feature_views"):
        page.views = _views(con, layer, feature)
    bands = page.bands()
    if band_levels is not None and bands:
        levels = band_levels(float(page.stats["min_act"]), float(page.stats["max_act"]), max(bands) + 1)
        page.levels = [float(x) for x in levels]
    return page


def _n_tokens(con: duckdb.DuckDBPyConnection, layer: int) -> int:
    """Tokens mined in a layer (n_fired / freq of any feature that fired)."""
    found = con.execute(
        "select max(n_fired / freq) from feature_stats where layer = ? and freq > 0", [layer]
    ).fetchall()
    return int(round(found[0][0])) if found and found[0][0] else 0


def _not_found(con: duckdb.DuckDBPyConnection, layer: int, feature: int) -> str:
    ranges = query_rows(con, "select layer, max(feature) as top from feature_stats group by layer order by layer")
    known = ", ".join(f"layer {r['layer']}: features 0..{r['top']}" for r in ranges) or "none"
    return f"layer {layer} feature {feature} was not mined; mined: {known}"


def _examples(con: duckdb.DuckDBPyConnection, layer: int, feature: int, before: int, after: int) -> list[Example]:
    picked = query_rows(
        con,
        "select e.band, e.rank, e.row, e.pos, e.act, t.tokens from top_examples e join tokens t on t.row = e.row "
        "where e.layer = ? and e.feature = ? order by e.band, e.rank",
        [layer, feature],
    )
    if not picked:
        return []
    rows = sorted({p["row"] for p in picked})
    acts = {
        (r["row"], r["pos"]): r["act"]
        for r in query_rows(
            con,
            "select row, pos, act from feature_acts where layer = ? and feature = ? and list_contains(?, row)",
            [layer, feature, rows],
        )
    }
    windows = [(p, max(0, p["pos"] - before), min(len(p["tokens"]), p["pos"] + after + 1)) for p in picked]
    ids = sorted({t for p, lo, hi in windows for t in p["tokens"][lo:hi]})
    texts = {
        r["token"]: r["text"]
        for r in query_rows(con, "select token, text from vocab where list_contains(?, token)", [ids])
    }
    return [
        Example(
            p["band"],
            p["rank"],
            p["row"],
            p["pos"],
            p["act"],
            [texts.get(t, f"<{t}>") for t in p["tokens"][lo:hi]],
            [acts.get((p["row"], i), 0.0) for i in range(lo, hi)],
            p["pos"] - lo,
        )
        for p, lo, hi in windows
    ]


def _views(con: duckdb.DuckDBPyConnection, layer: int, feature: int) -> dict[str, list[dict[str, Any]]]:
    rows = query_rows(
        con,
        "select f.view, f.rank, f.token, v.text, f.src_layer, f.src_head, f.src_feature, f.value "
        "from feature_views f left join vocab v on v.token = f.token "
        "where f.layer = ? and f.feature = ? order by f.view, f.src_layer, f.rank",
        [layer, feature],
    )
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["view"], []).append(r)
    return out


# ---------------------------------------------------------------- rendering

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#1d2330;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:16px;margin:26px 0 8px;border-bottom:1px solid #e3e6ec;padding-bottom:4px}
.sub{color:#667085;margin:0 0 16px}.cards{display:flex;gap:12px;flex-wrap:wrap}
.card{border:1px solid #e3e6ec;border-radius:8px;padding:8px 14px;min-width:130px}.card b{display:block;font-size:18px}
.card span{color:#667085;font-size:12px}.ex{display:flex;gap:10px;align-items:baseline;margin:3px 0}
.ex .v{font:12px ui-monospace,monospace;color:#667085;min-width:64px;text-align:right}
.ctx{font:13px ui-monospace,SFMono-Regular,Menlo,monospace;white-space:pre-wrap;word-break:break-all}
.tok{border-radius:2px}.tok.c{outline:1.5px solid #1d2330}.band{color:#667085;font-size:12px;margin:10px 0 2px}
table{border-collapse:collapse;font-size:13px}td,th{padding:2px 10px 2px 0;text-align:left;vertical-align:top}
th{color:#667085;font-weight:500}.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:18px}
.num{font-family:ui-monospace,monospace;text-align:right}.neg{color:#b42318}.pos{color:#067647}
.chip{background:#eef1f5;border-radius:3px;padding:0 3px;white-space:pre}
a{color:#175cd3;text-decoration:none}a:hover{text-decoration:underline}.muted{color:#98a2b3}
"""


def _visible(text: str) -> str:
    """Newlines and tabs as arrows, other invisible characters as \\xNN escapes, empty as ∅."""
    marks = {"\n": "↵", "\t": "⇥"}
    shown = "".join(marks.get(c, c if c.isprintable() else f"\\x{ord(c):02x}") for c in text)
    return shown or "∅"


def _token_html(text: str) -> str:
    return html.escape(_visible(text))


def _color(act: float, top: float) -> str:
    if act <= 0 or top <= 0:
        return ""
    alpha = min(act / top, 1.0)
    r, g, b = (round(255 - (255 - c) * alpha) for c in HIGHLIGHT)  # blended on white, exact at alpha 1
    return f"background:rgb({r},{g},{b})"


def render_context(example: Example, top: float) -> str:
    """The window's tokens, each shaded by the feature's activation (hover shows the value)."""
    spans = []
    for i, (text, act) in enumerate(zip(example.texts, example.acts, strict=True)):
        cls = "tok c" if i == example.center else "tok"
        spans.append(f'<span class="{cls}" style="{_color(act, top)}" title="{act:.4g}">{_token_html(text)}</span>')
    return f'<span class="ctx">{"".join(spans)}</span>'


def _example_html(example: Example, top: float) -> str:
    where = f"row {example.row}, pos {example.pos}"
    return (
        f'<div class="ex" title="{where}"><span class="v">{example.act:.3f}</span>{render_context(example, top)}</div>'
    )


def histogram_svg(counts: list[int], lo: float, hi: float, width: int = 520, height: int = 120) -> str:
    """Bars of the activation histogram over [lo, hi] as inline SVG."""
    if not counts or max(counts) == 0:
        return '<p class="muted">no activations</p>'
    top = max(counts)
    bar = width / len(counts)
    rects = []
    for i, c in enumerate(counts):
        h = (height - 20) * c / top
        rects.append(
            f'<rect x="{i * bar + 1:.1f}" y="{height - 16 - h:.1f}" width="{bar - 2:.1f}" height="{h:.1f}" '
            f'fill="rgb({HIGHLIGHT[0]},{HIGHLIGHT[1] + 60},{HIGHLIGHT[2] + 60})"><title>{c}</title></rect>'
        )
    labels = (
        f'<text x="0" y="{height - 2}" font-size="11" fill="#667085">{lo:.3g}</text>'
        f'<text x="{width}" y="{height - 2}" font-size="11" fill="#667085" text-anchor="end">{hi:.3g}</text>'
    )
    return f'<svg width="{width}" height="{height}" role="img" aria-label="activation histogram">{"".join(rects)}{labels}</svg>'


def chips(texts: list[str]) -> str:
    """Token texts as boxed chips, so spaces and empty tokens stay visible."""
    return " ".join(f'<span class="chip">{_token_html(t)}</span>' for t in texts)


def _card(value: str, label: str) -> str:
    return f'<div class="card"><b>{value}</b><span>{label}</span></div>'


def _stats_html(page: FeaturePage) -> str:
    s = page.stats
    freq = s["freq"] or 0.0
    log_freq = f"{math.log10(freq):.2f}" if freq > 0 else "-inf"
    cards = [
        _card(f"{s['n_fired']:,}", f"tokens fired of {page.n_tokens:,}"),
        _card(f"{freq:.3g}", f"frequency (log10 {log_freq})"),
        _card("-" if s["mean_act"] is None else f"{s['mean_act']:.3f}", "mean activation when fired"),
        _card("-" if s["max_act"] is None else f"{s['max_act']:.3f}", "max activation"),
    ]
    return f'<div class="cards">{"".join(cards)}</div>'


def _token_table(rows: list[dict[str, Any]], title: str) -> str:
    if not rows:
        return ""
    body = "".join(
        f'<tr><td class="ctx">{chips([r["text"] if r["text"] is not None else str(r["token"])])}</td>'
        f'<td class="num {"neg" if r["value"] < 0 else "pos"}">{r["value"]:+.3f}</td></tr>'
        for r in rows
    )
    return f"<div><h3>{html.escape(title)}</h3><table>{body}</table></div>"


def feature_ref(layer: int, feature: int, link: Link | None) -> str:
    label = f"L{layer} F{feature}"
    href = link(layer, feature) if link else None
    return f'<a href="{html.escape(href)}">{label}</a>' if href else label


def _views_html(page: FeaturePage, link: Link | None) -> str:
    v = page.views
    blocks = [
        _token_table(v.get("deembed", []), "De-embedding: tokens that drive it directly (W_E f_enc)"),
        _token_table(v.get("logit_top", []), "Logit lens: promoted tokens (f_dec W_U)"),
        _token_table(v.get("logit_bottom", []), "Logit lens: suppressed tokens"),
    ]
    head = v.get("head_deembed", [])
    if head:
        blocks.append(_token_table(head, f"Through head {head[0]['src_layer']}.{head[0]['src_head']} (W_E W_OV f_enc)"))
    ov = v.get("ov_norm", [])
    if ov:
        body = "".join(
            f'<tr><td>head {r["src_layer"]}.{r["src_head"]}</td><td class="num">{r["value"]:.3f}</td></tr>' for r in ov
        )
        blocks.append(f"<div><h3>OV norms ||W_OV f_enc||</h3><table>{body}</table></div>")
    pull = v.get("pullback", [])
    for src in sorted({r["src_layer"] for r in pull}):
        body = "".join(
            f"<tr><td>{feature_ref(r['src_layer'], r['src_feature'], link)}</td>"
            f'<td class="num {"neg" if r["value"] < 0 else "pos"}">{r["value"]:+.3f}</td></tr>'
            for r in pull
            if r["src_layer"] == src
        )
        blocks.append(f"<div><h3>Pullback from layer {src} (W_dec f_enc)</h3><table>{body}</table></div>")
    content = "".join(b for b in blocks if b)
    return f'<div class="grid">{content}</div>' if content else '<p class="muted">no views were computed</p>'


def _bands_html(page: FeaturePage, top: float) -> str:
    bands = page.bands()
    if not bands:
        return '<p class="muted">no examples</p>'
    parts = []
    for b in sorted(bands):
        near = f": activation near {page.levels[b]:.3f}" if b < len(page.levels) else ""
        parts.append(f'<div class="band">band {b}{near}</div>')
        parts.extend(_example_html(e, top) for e in bands[b])
    return "".join(parts)


class FeatureParts(NamedTuple):
    """The HTML pieces of one feature's dashboard that do not name it (the blind comparison shows only these)."""

    stats: str
    density: str
    examples: str
    bands: str


def feature_parts(page: FeaturePage) -> FeatureParts:
    """Stats cards, activation histogram, top activations and range samples of a feature, as HTML."""
    s = page.stats
    top = float(s["max_act"] or 0.0)
    if s["n_fired"]:
        density = histogram_svg(list(s["histogram"]), float(s["min_act"]), top)
        examples = "".join(_example_html(e, top) for e in page.top())
    else:
        density = examples = f'<p class="muted">never fired on the {page.n_tokens:,} mined tokens</p>'
    return FeatureParts(_stats_html(page), density, examples, _bands_html(page, top))


def render_feature(page: FeaturePage, link: Link | None = None, subtitle: str = "") -> str:
    """A self-contained HTML page for one feature."""
    title = f"Layer {page.layer} · Feature {page.feature}"
    parts = feature_parts(page)
    body = (
        f'<h1>{title}</h1><p class="sub">{html.escape(subtitle)}</p>{parts.stats}'
        f"<h2>Activation density (non-zero activations)</h2>{parts.density}"
        f"<h2>Top activations</h2>{parts.examples}"
        f"<h2>Samples across the activation range</h2>{parts.bands}"
        f"<h2>Input-invariant views</h2>{_views_html(page, link)}"
    )
    return document(title, body)


def document(title: str, body: str) -> str:
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
        f"<body>{body}</body></html>\n"
    )


def write_html(text: str, path: str | Path) -> Path:
    """Write a page atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def feature_page_name(layer: int, feature: int) -> str:
    return f"layer{layer}-feature{feature}.html"
