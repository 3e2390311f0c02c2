"""A feature's page as plain text for the terminal (`circuitflow feature L F`)."""

from __future__ import annotations

from typing import Any

from storage.dashboard import FeaturePage


def render_text(page: FeaturePage, max_examples: int = 10) -> str:
    """A terminal summary of a feature: stats, top examples (the token in «»), views."""
    s = page.stats
    lines = [
        f"layer {page.layer} feature {page.feature}: fired on {s['n_fired']:,} of {page.n_tokens:,} tokens "
        f"(freq {s['freq']:.3g}), mean {_num(s['mean_act'])}, max {_num(s['max_act'])}"
    ]
    if page.top():
        lines.append("top activations:")
        for e in page.top()[:max_examples]:
            text = "".join(f"«{t}»" if i == e.center else t for i, t in enumerate(e.texts))
            lines.append(f"  {e.act:8.3f}  {text!r}")
    for view, rows in sorted(page.views.items()):
        items = ", ".join(_view_item(r) for r in rows[:8])
        lines.append(f"{view}: {items}")
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _view_item(r: dict[str, Any]) -> str:
    if r["view"] == "pullback":
        return f"L{r['src_layer']}F{r['src_feature']} {r['value']:+.2f}"
    if r["view"] == "ov_norm":
        return f"head {r['src_layer']}.{r['src_head']} {r['value']:.2f}"
    text = r["text"] if r["text"] is not None else str(r["token"])
    return f"{text!r} {r['value']:+.2f}"
