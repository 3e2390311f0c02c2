"""The mine stage's index page: every live feature per layer, most frequent first, read through SQL from the
mined tables and rendered with the feature pages' HTML pieces (storage.dashboard)."""

from __future__ import annotations

import html
from typing import Any

import duckdb

from storage.dashboard import Link, chips, document, feature_ref, query_rows


def load_index(con: duckdb.DuckDBPyConnection, examples: int = 3) -> list[dict[str, Any]]:
    """Every feature that fired, most frequent first within each layer, with the tokens of its
    strongest `examples` examples (a list, strongest first)."""
    return query_rows(
        con,
        f"""
        with tops as (
            select e.layer, e.feature, list(v.text order by e.rank) as top_tokens
            from top_examples e join tokens t on t.row = e.row join vocab v on v.token = t.tokens[e.pos + 1]
            where e.band = -1 and e.rank < {int(examples)}
            group by e.layer, e.feature
        )
        select s.layer, s.feature, s.n_fired, s.freq, s.mean_act, s.max_act, tops.top_tokens
        from feature_stats s left join tops using (layer, feature)
        where s.n_fired > 0
        order by s.layer, s.freq desc, s.feature
        """,
    )


def layer_summaries(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """Per layer: features, alive and dead counts, L0 (mean active features per token)."""
    return query_rows(
        con,
        "select layer, count(*) as features, count(*) filter (where n_fired > 0) as alive, "
        "count(*) filter (where n_fired = 0) as dead, sum(freq) as l0 from feature_stats group by layer order by layer",
    )


def render_index(
    rows: list[dict[str, Any]], summaries: list[dict[str, Any]], link: Link | None, subtitle: str = ""
) -> str:
    """The index page: per layer a summary line and a table of live features sorted by frequency."""
    parts = [f'<h1>Feature dashboards</h1><p class="sub">{html.escape(subtitle)}</p>']
    for s in summaries:
        layer = s["layer"]
        parts.append(
            f"<h2>Layer {layer}</h2><p>{s['features']:,} features: {s['alive']:,} fired, {s['dead']:,} never fired; "
            f"L0 {s['l0']:.1f} active features per token. Pages not linked here: "
            f"<code>circuitflow feature {layer} FEATURE --html FILE</code>.</p>"
        )
        body = "".join(
            f'<tr><td>{feature_ref(layer, r["feature"], link)}</td><td class="num">{r["freq"]:.3g}</td>'
            f'<td class="num">{r["mean_act"]:.3f}</td><td class="num">{r["max_act"]:.3f}</td>'
            f'<td class="ctx">{chips(r["top_tokens"] or [])}</td></tr>'
            for r in rows
            if r["layer"] == layer
        )
        parts.append(
            "<table><tr><th>feature</th><th>freq</th><th>mean act</th><th>max act</th><th>top tokens</th></tr>"
            f"{body}</table>"
        )
    return document("Feature dashboards", "".join(parts))
