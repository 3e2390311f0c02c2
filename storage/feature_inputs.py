"""The `feature_inputs` table: per analysed feature, the mean attribution each upstream source gives it
over the held-out contexts where it fires (dataset-level attribution), and its SQL view."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow as pa

from storage.tables import write_table

FILE = "feature_inputs.parquet"
SCHEMA = pa.schema(
    [
        ("layer", pa.int32()),
        ("feature", pa.int32()),
        ("source_kind", pa.string()),
        ("source_layer", pa.int32()),
        ("source_index", pa.int32()),
        ("mean", pa.float64()),
        ("mean_abs", pa.float64()),
        ("count", pa.int64()),
        ("contexts", pa.int64()),
    ]
)
"""One row per (analysed feature, source that is non-zero in some context). source_kind: feature
(source_index = feature), head (source_index = head, summed over source tokens), embed, error (the
layer's transcoder error) or bias (the feature's own constant, b_O and b_dec_out terms); the last
three have source_index -1, embed and bias source_layer -1. mean and mean_abs average over the
`contexts` where the feature fires (0 where the source is silent), so a feature's means sum to its
mean pre-activation; count: contexts where the source's attribution is non-zero."""


def feature_inputs_table(layer: int, feature: int, contexts: int, rows: Iterable[Sequence]) -> pa.Table:
    """Rows (source_kind, source_layer, source_index, mean, mean_abs, count) of one feature -> table."""
    rows = list(rows)
    columns = list(zip(*rows, strict=True)) if rows else [[] for _ in range(6)]
    data = {"layer": [layer] * len(rows), "feature": [feature] * len(rows)}
    data.update({name: list(col) for name, col in zip(SCHEMA.names[2:8], columns, strict=True)})
    data["contexts"] = [contexts] * len(rows)
    return pa.Table.from_pydict(data, schema=SCHEMA)


def write_feature_inputs(tables: Sequence[pa.Table], folder: str | Path) -> Path:
    """Write every feature's rows as one Parquet file in `folder`, atomically."""
    table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    return write_table(table, Path(folder) / FILE)


def feature_inputs_views(stage_dir: str | Path) -> dict[str, str]:
    """The `feature_inputs` view over a complete stage directory (none when it has no table)."""
    path = Path(stage_dir).resolve() / FILE
    if not path.is_file():
        return {}
    quoted = "'" + str(path).replace("'", "''") + "'"
    return {"feature_inputs": f"select * from read_parquet({quoted})"}
