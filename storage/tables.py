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
