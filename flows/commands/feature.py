"""`circuitflow feature L F`: a feature's stats, top examples and views in the terminal, or its
self-contained HTML dashboard with --html FILE, read from the store's latest run."""

from __future__ import annotations

import argparse

from storage import catalog, dashboard, dashboard_text


def main(args: argparse.Namespace) -> int:
    from core.mining import band_levels  # here: the CLI's other commands need no torch

    con = catalog.connect(args.store)
    try:
        page = dashboard.load_feature(con, args.layer, args.feature, band_levels=band_levels)
    finally:
        con.close()
    if args.html:
        path = dashboard.write_html(dashboard.render_feature(page, subtitle=f"store {args.store}"), args.html)
        print(f"wrote {path}")
    else:
        print(dashboard_text.render_text(page))
    return 0
