"""`circuitflow sql`: one read-only query over the store, printed as a table, CSV or JSON.

Refused statements and SQL errors are one line (storage.catalog.QueryError), exit code 2.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from typing import TextIO

from storage.catalog import query


def main(args: argparse.Namespace) -> int:
    limits = {"timeout": args.timeout, "memory_limit": args.memory_limit, "max_rows": args.max_rows}
    names, rows = query(args.store, args.query, **{k: v for k, v in limits.items() if v is not None})
    write(names, rows, args.format)
    return 0


def write(names: list[str], rows: list[tuple], fmt: str, out: TextIO | None = None) -> None:
    """Print query results as `table` (aligned columns), `csv` or `json` (a list of objects)."""
    out = sys.stdout if out is None else out
    if fmt == "csv":
        writer = csv.writer(out)
        writer.writerow(names)
        writer.writerows(["" if v is None else v for v in row] for row in rows)
    elif fmt == "json":
        json.dump([dict(zip(names, row, strict=True)) for row in rows], out, default=str, indent=1)
        out.write("\n")
    else:
        cells = [[_cell(v) for v in row] for row in rows]
        widths = [max([len(n)] + [len(r[i]) for r in cells]) for i, n in enumerate(names)]
        out.write("  ".join(n.ljust(w) for n, w in zip(names, widths, strict=True)).rstrip() + "\n")
        out.write("  ".join("-" * w for w in widths) + "\n")
        for r in cells:
            out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")
        out.write(f"({len(rows)} row{'s' if len(rows) != 1 else ''})\n")


def _cell(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value).replace("\n", "\\n")
    return text if len(text) <= 80 else text[:77] + "..."
