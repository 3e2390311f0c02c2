"""Activation shards: atomic writes, completeness checks, and the memory-mapped reader (contiguous
reads across shards, every pair exactly once per shuffled epoch, storage dtypes)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import storage.shards as shards
from core.activations import MlpPairs
from core.batches import ShuffledPairs
from storage import layout
from storage.shards import (
    ActivationCache,
    ShardWriteError,
    ShardWriter,
    manifest_fields,
    pending_shards,
    plan_shards,
    remove_temp_files,
    shard_is_complete,
    shard_path,
    write_shard,
)

D_IN, D_OUT = 6, 4
LAYERS = [1, 3]


def known_pairs(n_tokens: int, layer: int) -> MlpPairs:
    """Pairs whose values name their token and layer: mlp_in[t] = t + 1000 * layer (column 0)."""
    t = torch.arange(n_tokens, dtype=torch.float32)[:, None]
    mlp_in = torch.cat([t + 1000 * layer, torch.randn(n_tokens, D_IN - 1)], dim=1)  # [token, d_in]
    mlp_out = torch.cat([-t, torch.randn(n_tokens, D_OUT - 1)], dim=1)  # [token, d_out]
    return MlpPairs(mlp_in, mlp_out)


def make_cache(root: Path, n_rows: int = 9, per_row: int = 5, shard_tokens: int = 12, dtype: str = "float32") -> dict:
    """A complete cache dir written through the shard writer; returns the full pairs per layer."""
    specs = plan_shards(n_rows, per_row, shard_tokens)
    full = {layer: known_pairs(n_rows * per_row, layer) for layer in LAYERS}
    for spec in specs:
        for layer in LAYERS:
            part = MlpPairs(*(x[spec.token_start : spec.token_stop].to(shards.DTYPES[dtype]) for x in full[layer]))
            write_shard(shard_path(root, layer, spec.index), part)
    hooks = {layer: (f"in{layer}", f"out{layer}") for layer in LAYERS}
    layout.write_json_atomic(
        root / layout.MANIFEST, manifest_fields(LAYERS, specs, hooks, D_IN, D_OUT, dtype, per_row, True)
    )
    return full


def test_plan_shards_holds_whole_rows() -> None:
    specs = plan_shards(n_rows=10, tokens_per_row=7, shard_tokens=30)  # 4 rows (28 tokens) per shard
    assert [(s.row_start, s.row_stop) for s in specs] == [(0, 4), (4, 8), (8, 10)]
    assert [(s.token_start, s.token_stop) for s in specs] == [(0, 28), (28, 56), (56, 70)]
    assert [(s.row_start, s.row_stop) for s in plan_shards(3, 7, 5)] == [(0, 1), (1, 2), (2, 3)]  # >= 1 row
    assert plan_shards(0, 7, 30) == []


def test_write_shard_is_safetensors_and_checkable(tmp_path: Path) -> None:
    pair = known_pairs(5, 0)
    path = shard_path(tmp_path, 0, 3)
    write_shard(path, MlpPairs(pair.mlp_in.to(torch.bfloat16), pair.mlp_out.to(torch.bfloat16)))
    assert path == tmp_path / "layer=0" / "pairs-00003.safetensors"
    loaded = load_file(path)
    torch.testing.assert_close(loaded["mlp_in"], pair.mlp_in.to(torch.bfloat16), rtol=0, atol=0)
    assert shard_is_complete(path, 5, D_IN, D_OUT, "bfloat16")
    assert not shard_is_complete(path, 5, D_IN, D_OUT, "float16")  # wrong dtype
    assert not shard_is_complete(path, 6, D_IN, D_OUT, "bfloat16")  # wrong shape
    # 8-byte length + JSON header + data: the header is the only overhead
    header = int.from_bytes(path.read_bytes()[:8], "little")
    assert path.stat().st_size == 8 + header + 5 * (D_IN + D_OUT) * 2 and header < 200
    path.write_bytes(path.read_bytes()[:-4])  # truncated (e.g. a crash without fsync)
    assert not shard_is_complete(path, 5, D_IN, D_OUT, "bfloat16")


@pytest.mark.parametrize("where", ["_reserve", "_write_at"])
def test_write_failure_is_clear_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """A full disk while reserving space (the usual case) or while writing rows: one-line error, no file."""

    def disk_full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards, where, disk_full)
    path = shard_path(tmp_path, 2, 0)
    with pytest.raises(ShardWriteError, match="No space left on device") as err:
        write_shard(path, known_pairs(4, 2))
    assert "\n" not in str(err.value) and "rerun" in str(err.value)
    assert list(path.parent.iterdir()) == []  # neither the shard nor its temp file is visible


def test_shard_files_commit_together(tmp_path: Path) -> None:
    """Rows written in any order land at their offsets; nothing is visible before commit."""
    spec = plan_shards(3, 4, 12)[0]  # 12 tokens
    writer = ShardWriter(tmp_path, LAYERS, spec, D_IN, D_OUT, "float16")
    pairs = {layer: known_pairs(12, layer) for layer in LAYERS}
    for start in (8, 0, 4):
        writer.write(start, {layer: MlpPairs(*(x[start : start + 4].half() for x in p)) for layer, p in pairs.items()})
    assert list(tmp_path.rglob("pairs-*")) == []
    writer.commit()
    for layer in LAYERS:
        loaded = load_file(shard_path(tmp_path, layer, 0))
        torch.testing.assert_close(loaded["mlp_in"], pairs[layer].mlp_in.half(), rtol=0, atol=0)
        torch.testing.assert_close(loaded["mlp_out"], pairs[layer].mlp_out.half(), rtol=0, atol=0)
    assert [p.name for p in tmp_path.rglob(".*")] == []


def test_shards_are_byte_identical_to_safetensors_save_file(tmp_path: Path) -> None:
    pair = known_pairs(9, 1)
    write_shard(tmp_path / "ours.safetensors", pair)
    save_file({"mlp_in": pair.mlp_in, "mlp_out": pair.mlp_out}, tmp_path / "library.safetensors")
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "library.safetensors").read_bytes()


def test_pending_shards_and_temp_cleanup(tmp_path: Path) -> None:
    specs = plan_shards(6, 4, 8)  # 3 shards of 2 rows
    for layer in LAYERS:
        write_shard(shard_path(tmp_path, layer, 0), known_pairs(8, layer))
    write_shard(shard_path(tmp_path, LAYERS[0], 1), known_pairs(8, 0))  # shard 1 only at one layer
    stray = tmp_path / f"layer={LAYERS[0]}" / ".pairs-00002.safetensors.tmp-1234"
    stray.write_bytes(b"x")
    todo = pending_shards(tmp_path, LAYERS, specs, D_IN, D_OUT, "float32")
    assert [s.index for s in todo] == [1, 2]
    remove_temp_files(tmp_path)
    assert not stray.exists() and shard_path(tmp_path, LAYERS[0], 1).exists()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_reader_reads_across_shards(tmp_path: Path, dtype: str) -> None:
    full = make_cache(tmp_path, dtype=dtype)
    cache = ActivationCache(tmp_path)
    assert cache.layers == tuple(LAYERS)
    source = cache.layer(3)
    assert (source.n_tokens, source.d_in, source.d_out, source.tokens_per_row) == (45, D_IN, D_OUT, 5)
    assert (source.hook_in, source.hook_out) == ("in3", "out3")
    want = [x.to(shards.DTYPES[dtype]).float() for x in full[3]]  # what storage keeps, back in float32
    for start, stop in [(0, 45), (7, 33), (10, 10), (44, 45), (10, 20)]:  # shards hold 10 tokens each
        x_in, x_out = source.read(start, stop)
        assert x_in.dtype == torch.float32 and x_in.shape == (stop - start, D_IN)
        torch.testing.assert_close(x_in, want[0][start:stop], rtol=0, atol=0)
        torch.testing.assert_close(x_out, want[1][start:stop], rtol=0, atol=0)
    with pytest.raises(ValueError):
        source.read(40, 46)


def test_reader_epoch_visits_every_pair_once(tmp_path: Path) -> None:
    make_cache(tmp_path, n_rows=40, per_row=5, shard_tokens=30)  # 200 tokens in 7 shards
    # windows of 2 blocks of 8 tokens: the shuffle spans shards with about 16 tokens in memory
    source = ShuffledPairs(ActivationCache(tmp_path).layer(1), block_tokens=8, buffer_bytes=16 * 4 * (D_IN + D_OUT))
    assert source.window_tokens() == 16
    for epoch in (0, 1):
        batches = list(source.batches(24, seed=9, epoch=epoch))
        assert len(batches) == source.num_batches(24) == 9 and batches[-1][0].shape[0] == 200 - 8 * 24
        ids = torch.cat([b[0][:, 0] for b in batches]) - 1000
        assert sorted(ids.long().tolist()) == list(range(200))
        torch.testing.assert_close(torch.cat([b[1][:, 0] for b in batches]), -ids, rtol=0, atol=0)  # pairs intact
    first = torch.cat([b[0][:, 0] for b in source.batches(24, seed=9, epoch=0)])
    again = torch.cat([b[0][:, 0] for b in ShuffledPairs(ActivationCache(tmp_path).layer(1), 8, 640).batches(24, 9, 0)])
    torch.testing.assert_close(first, again, rtol=0, atol=0)  # deterministic across reader instances
    resumed = torch.cat([b[0][:, 0] for b in source.batches(24, seed=9, epoch=0, start_batch=5)])
    torch.testing.assert_close(resumed, first[5 * 24 :], rtol=0, atol=0)
    held_out = torch.cat([b[0][:, 0] for b in source.batches(24, seed=9, epoch=0, stop_token=150)]) - 1000
    assert sorted(held_out.long().tolist()) == list(range(150))


def test_reader_refuses_incomplete_or_unknown(tmp_path: Path) -> None:
    with pytest.raises(layout.StoreError, match="did not finish"):
        ActivationCache(tmp_path)
    make_cache(tmp_path)
    with pytest.raises(layout.StoreError, match="layer 2 is not cached"):
        ActivationCache(tmp_path).layer(2)
