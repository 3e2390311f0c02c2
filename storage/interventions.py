"""The `interventions` artifact: one Parquet row per experiment of a config's `experiments` section.

`<store>/interventions/<key>/interventions.parquet`, written atomically inside its stage directory;
`<store>/interventions/latest.json` names the one the `interventions` SQL view shows (the last run of
the experiments flow). Columns: name, prompt, n_tokens, frozen, interventions (list of specs), target,
target_text, clean_logprob, patched_logprob, kl, the root's layer/feature/pos/change/linearised change
and ratio (null without a root), generated_clean, generated (null without generation), top_changes
(list of token, text, before, after) and feature_changes (list of layer, feature, pos, token, before,
after): unnest them in SQL.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from storage import layout
from storage.tables import write_table

STAGE = "interventions"
TABLE = "interventions.parquet"
LATEST = Path(STAGE) / "latest.json"
"""Under the store: names the experiments run the `interventions` view shows."""

_TOKEN = pa.struct([("token", pa.int64()), ("text", pa.string()), ("before", pa.float64()), ("after", pa.float64())])
_FEATURE = pa.struct(
    [("layer", pa.int32()), ("feature", pa.int64()), ("pos", pa.int32()), ("token", pa.string()),
     ("before", pa.float64()), ("after", pa.float64())]
)  # fmt: skip
SCHEMA = pa.schema(
    [("name", pa.string()), ("prompt", pa.string()), ("n_tokens", pa.int32()), ("frozen", pa.bool_()),
     ("interventions", pa.list_(pa.string())), ("target", pa.int64()), ("target_text", pa.string()),
     ("clean_logprob", pa.float64()), ("patched_logprob", pa.float64()), ("kl", pa.float64()),
     ("root_layer", pa.int32()), ("root_feature", pa.int64()), ("root_pos", pa.int32()),
     ("root_change", pa.float64()), ("root_linearised_change", pa.float64()), ("root_ratio", pa.float64()),
     ("generated_clean", pa.string()), ("generated", pa.string()),
     ("top_changes", pa.list_(_TOKEN)), ("feature_changes", pa.list_(_FEATURE))]
)  # fmt: skip


def _row(report: dict[str, Any]) -> dict[str, Any]:
    """A report of tasks.intervene.run_experiment as a table row."""
    row = {name: report.get(name) for name in SCHEMA.names}
    root, gen = report.get("root") or {}, report.get("generation") or {}
    row.update(root_layer=root.get("layer"), root_feature=root.get("feature"), root_pos=root.get("pos"))
    row.update(root_change=root.get("change"), root_linearised_change=root.get("linearised_change"))
    row.update(root_ratio=root.get("ratio"), generated_clean=gen.get("clean"), generated=gen.get("intervened"))
    row["feature_changes"] = [{k: c[k] for k in _FEATURE.names} for c in report["feature_changes"]]
    return row


def interventions_table(reports: list[dict[str, Any]]) -> pa.Table:
    """Reports -> the typed table."""
    return pa.Table.from_pylist([_row(r) for r in reports], schema=SCHEMA)


def write_interventions(reports: list[dict[str, Any]], folder: Path) -> Path:
    """Write the table into a stage directory being built (atomically: temp file + rename)."""
    return write_table(interventions_table(reports), Path(folder) / TABLE)


def mark_latest(root: str | Path, key: str) -> None:
    """Make `key` the experiments run the `interventions` view shows."""
    layout.write_json_atomic(Path(root) / LATEST, {"key": key, "path": str(layout.stage_dir(root, STAGE, key))})


def interventions_views(root: str | Path) -> dict[str, str]:
    """`interventions`: the table of the latest experiments run (none before the first)."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return {}
    folder = layout.stage_dir(root, STAGE, str(json.loads(pointer.read_text()).get("key")))
    if not layout.is_complete(folder) or not (folder / TABLE).is_file():
        return {}
    path = str((folder / TABLE).resolve()).replace("'", "''")
    return {"interventions": f"select * from read_parquet('{path}')"}
