"""Parquet schemas and atomic writers for every tabular artifact (tokens, vocab, metrics, ...)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.layout import atomic_file

COMPRESSION = "zstd"

TOKENS_SCHEMA = pa.schema([("row", pa.int32()), ("tokens", pa.list_(pa.int32()))])
VOCAB_SCHEMA = pa.schema([("token", pa.int32()), ("text", pa.string())])


def write_table(table: pa.Table, path: str | Path, row_group_size: int | None = None) -> Path:
    """Write a Parquet file atomically (temp file, then rename), zstd-compressed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp, compression=COMPRESSION, row_group_size=row_group_size)
    return path


def tokens_table(rows: np.ndarray) -> pa.Table:
    """int32 [n_rows, context] -> table (row int32, tokens list<int32>)."""
    rows = np.ascontiguousarray(rows, dtype=np.int32)
    n, ctx = rows.shape
    offsets = pa.array(np.arange(0, n * ctx + 1, ctx, dtype=np.int32))
    tokens = pa.ListArray.from_arrays(offsets, pa.array(rows.reshape(-1)))
    return pa.Table.from_arrays([pa.array(np.arange(n, dtype=np.int32)), tokens], schema=TOKENS_SCHEMA)


def read_tokens(path: str | Path) -> np.ndarray:
    """tokens.parquet -> int32 [n_rows, context] in row order."""
    table = pq.read_table(path).sort_by("row")
    flat = table.column("tokens").combine_chunks().flatten().to_numpy()
    return flat.reshape(table.num_rows, -1).astype(np.int32)


def vocab_table(texts: list[str]) -> pa.Table:
    """Token id -> its text as the tokenizer decodes it alone."""
    return pa.Table.from_arrays(
        [pa.array(np.arange(len(texts), dtype=np.int32)), pa.array(texts, pa.string())], schema=VOCAB_SCHEMA
    )


# ---------------------------------------------------------------- mining artifacts

FEATURE_ACTS_SCHEMA = pa.schema(
    [("feature", pa.int32()), ("row", pa.int32()), ("pos", pa.int16()), ("act", pa.float32())]
)
"""One row per non-zero activation; files live in `feature_acts/layer=L/` (hive partitioning)."""
FEATURE_ACTS_ROW_GROUP = 1 << 16
"""Rows per row group of feature_acts: with files sorted by feature, one feature spans few groups."""

FEATURE_STATS_SCHEMA = pa.schema(
    [
        ("layer", pa.int32()),
        ("feature", pa.int32()),
        ("n_fired", pa.int64()),
        ("freq", pa.float64()),
        ("mean_act", pa.float32()),
        ("min_act", pa.float32()),
        ("max_act", pa.float32()),
        ("histogram", pa.list_(pa.int32())),
    ]
)
"""Per feature: tokens fired on, firing frequency, mean/min/max of the non-zero activations (null
when it never fired) and counts in equal bins over [min_act, max_act]."""

TOP_EXAMPLES_SCHEMA = pa.schema(
    [
        ("layer", pa.int32()),
        ("feature", pa.int32()),
        ("band", pa.int16()),
        ("rank", pa.int16()),
        ("row", pa.int32()),
        ("pos", pa.int16()),
        ("act", pa.float32()),
    ]
)
"""Per feature: the top-k examples (band -1, rank 0 = strongest) and the banded samples (band 0 =
the highest activation level)."""

FEATURE_VIEWS_SCHEMA = pa.schema(
    [
        ("layer", pa.int32()),
        ("feature", pa.int32()),
        ("view", pa.string()),
        ("rank", pa.int16()),
        ("token", pa.int32()),
        ("src_layer", pa.int32()),
        ("src_head", pa.int32()),
        ("src_feature", pa.int32()),
        ("value", pa.float32()),
    ]
)
"""Input-invariant views in long form (core.views); token/src_* are null where they do not apply."""


def feature_acts_path(stage_dir: str | Path, layer: int, part: int) -> Path:
    """`<stage>/feature_acts/layer=L/part-NNNNN.parquet`."""
    return Path(stage_dir) / "feature_acts" / f"layer={layer}" / f"part-{part:05d}.parquet"


def feature_acts_table(feature: np.ndarray, row: np.ndarray, pos: np.ndarray, act: np.ndarray) -> pa.Table:
    arrays = [
        pa.array(np.asarray(x, dtype=t.to_pandas_dtype()))
        for x, t in zip((feature, row, pos, act), FEATURE_ACTS_SCHEMA.types, strict=True)
    ]
    return pa.Table.from_arrays(arrays, schema=FEATURE_ACTS_SCHEMA)


def write_feature_acts(table: pa.Table, path: str | Path, row_group_size: int = FEATURE_ACTS_ROW_GROUP) -> Path:
    """Write one run of non-zeros (sorted by feature) compactly: dictionary-encoded feature column,
    delta-encoded row and position, byte-stream-split activations, all zstd; plain enough for any
    Parquet reader."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        pq.write_table(
            table,
            tmp,
            row_group_size=row_group_size,
            compression=COMPRESSION,
            use_dictionary=["feature"],
            column_encoding={"row": "DELTA_BINARY_PACKED", "pos": "DELTA_BINARY_PACKED", "act": "BYTE_STREAM_SPLIT"},
            write_statistics=True,
            sorting_columns=[pq.SortingColumn(0)],  # declared sorted by feature
        )
    return path


def read_rows(path: str | Path, start: int, stop: int, columns: list[str] | None = None) -> pa.Table:
    """Rows [start, stop) of a Parquet file, reading only the row groups that hold them."""
    pf = pq.ParquetFile(path)
    bounds = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
    groups = [i for i in range(pf.num_row_groups) if bounds[i] < stop and bounds[i + 1] > start]
    if not groups or stop <= start:
        return pf.schema_arrow.empty_table().select(columns) if columns else pf.schema_arrow.empty_table()
    table = pf.read_row_groups(groups, columns=columns)
    return table.slice(start - bounds[groups[0]], stop - start)


def feature_counts(path: str | Path, d_sae: int) -> np.ndarray:
    """int64 [d_sae]: rows per feature in one feature_acts file."""
    feature = pq.read_table(path, columns=["feature"]).column("feature").to_numpy()
    return np.bincount(feature, minlength=d_sae)


class TableSink:
    """Append tables to one Parquet file in row groups; the file appears atomically on close."""

    def __init__(self, path: str | Path, schema: pa.Schema, row_group_size: int = 1 << 16):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.row_group_size = row_group_size
        self._atomic = atomic_file(self.path)
        self._tmp = self._atomic.__enter__()
        self._writer = pq.ParquetWriter(self._tmp, schema, compression=COMPRESSION)
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        self._writer.write_table(table.cast(self.schema), row_group_size=self.row_group_size)
        self.rows += table.num_rows

    def __enter__(self) -> TableSink:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._writer.close()
        self._atomic.__exit__(exc_type, exc, tb)


def _nullable(values: np.ndarray, dtype: pa.DataType, null_below: float = 0) -> pa.Array:
    """An Arrow array with entries below `null_below` (the -1 / NaN markers) as nulls."""
    values = np.asarray(values)
    mask = np.isnan(values) if values.dtype.kind == "f" else values < null_below
    return pa.array(values.astype(dtype.to_pandas_dtype()), mask=mask, type=dtype)


def feature_stats_table(layer: int, stats, n_tokens: int) -> pa.Table:
    """core.mining.FeatureStats of one layer -> FEATURE_STATS_SCHEMA rows."""
    m, bins = stats.histogram.shape
    offsets = pa.array(np.arange(0, m * bins + 1, bins, dtype=np.int32))
    hist = pa.ListArray.from_arrays(offsets, pa.array(stats.histogram.reshape(-1).astype(np.int32)))
    columns = [
        pa.array(np.full(m, layer, np.int32)),
        pa.array(stats.feature.astype(np.int32)),
        pa.array(stats.n_fired.astype(np.int64)),
        pa.array(stats.n_fired / max(n_tokens, 1)),
        _nullable(stats.mean_act, pa.float32()),
        _nullable(stats.min_act, pa.float32()),
        _nullable(stats.max_act, pa.float32()),
        hist,
    ]
    return pa.Table.from_arrays(columns, schema=FEATURE_STATS_SCHEMA)


def top_examples_table(layer: int, examples) -> pa.Table:
    """core.mining.Examples of one layer -> TOP_EXAMPLES_SCHEMA rows."""
    n = len(examples.feature)
    columns = [
        np.full(n, layer),
        examples.feature,
        examples.band,
        examples.rank,
        examples.row,
        examples.pos,
        examples.act,
    ]
    return pa.Table.from_arrays(
        [
            pa.array(np.asarray(c, dtype=t.to_pandas_dtype()))
            for c, t in zip(columns, TOP_EXAMPLES_SCHEMA.types, strict=True)
        ],
        schema=TOP_EXAMPLES_SCHEMA,
    )


def feature_views_table(layer: int, rows) -> pa.Table:
    """core.views.ViewRows of one layer -> FEATURE_VIEWS_SCHEMA rows (-1 markers become nulls)."""
    n = int(rows.feature.shape[0])
    columns = [
        pa.array(np.full(n, layer, np.int32)),
        pa.array(rows.feature.numpy().astype(np.int32)),
        pa.array([rows.view] * n, pa.string()),
        pa.array(rows.rank.numpy().astype(np.int16)),
        _nullable(rows.token.numpy(), pa.int32()),
        _nullable(rows.src_layer.numpy(), pa.int32()),
        _nullable(rows.src_head.numpy(), pa.int32()),
        _nullable(rows.src_feature.numpy(), pa.int32()),
        pa.array(rows.value.numpy().astype(np.float32)),
    ]
    return pa.Table.from_arrays(columns, schema=FEATURE_VIEWS_SCHEMA)
