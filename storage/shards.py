"""Activation shards on disk: per layer, safetensors files of (mlp_in, mlp_out) pairs, each written
atomically, described by the stage manifest, and read back memory-mapped as shuffled batches.

Layout of an activations stage directory:
    layer=<L>/pairs-<i>.safetensors   tensors `mlp_in` [n, d_in] and `mlp_out` [n, d_out] of shard i
    manifest.json                     written last (see `manifest_fields`)
Shards are written in the safetensors format as batches arrive (header first, space reserved) and
read back with the safetensors library.
Shard i holds the same token rows at every layer; token t of a layer is row t // tokens_per_row,
position t % tokens_per_row (+1 when BOS is dropped).
"""

from __future__ import annotations

import bisect
import errno
import json
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from torch import Tensor

from storage import layout

if TYPE_CHECKING:  # annotations only: writers take any (mlp_in, mlp_out) pair of tensors
    from core.activations import MlpPairs

FORMAT = "circuitflow-activations-1"
"""Format tag in the manifest; bump when the layout changes."""
IN_KEY, OUT_KEY = "mlp_in", "mlp_out"
"""Tensor names inside a shard file."""
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""Storage dtypes by config name."""
_SAFETENSORS_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


class ShardWriteError(layout.StoreError):
    """A shard could not be written (disk full, permissions); finished shards are kept for a rerun."""


@dataclass(frozen=True)
class ShardSpec:
    """Which token rows (and so which tokens of every layer) one shard holds."""

    index: int
    row_start: int
    row_stop: int
    token_start: int
    token_stop: int

    @property
    def n_tokens(self) -> int:
        return self.token_stop - self.token_start


def plan_shards(n_rows: int, tokens_per_row: int, shard_tokens: int) -> list[ShardSpec]:
    """Split token rows into shards of whole rows with at most `shard_tokens` tokens (at least one row)."""
    rows_per_shard = max(1, shard_tokens // tokens_per_row)
    return [
        ShardSpec(i, start, stop, start * tokens_per_row, stop * tokens_per_row)
        for i, (start, stop) in enumerate(
            (s, min(s + rows_per_shard, n_rows)) for s in range(0, n_rows, rows_per_shard)
        )
    ]


def shard_path(root: str | Path, layer: int, index: int) -> Path:
    """Path of shard `index` of `layer` under a stage (or scratch) directory."""
    return Path(root) / f"layer={layer}" / f"pairs-{index:05d}.safetensors"


# ---------------------------------------------------------------- writing


def shard_header(n_tokens: int, d_in: int, d_out: int, dtype: str) -> bytes:
    """The safetensors prefix of a shard: 8-byte little-endian length, then the JSON header padded
    with spaces to a multiple of 8 (so the tensors that follow are aligned)."""
    size = DTYPES[dtype].itemsize
    a, b = n_tokens * d_in * size, n_tokens * d_out * size
    tensors = {
        IN_KEY: {"dtype": _SAFETENSORS_DTYPE[dtype], "shape": [n_tokens, d_in], "data_offsets": [0, a]},
        OUT_KEY: {"dtype": _SAFETENSORS_DTYPE[dtype], "shape": [n_tokens, d_out], "data_offsets": [a, a + b]},
    }
    header = json.dumps(tensors, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header


class ShardFile:
    """One shard file being written: disk space reserved and header written up front (a full disk
    fails here, before any compute), rows written at their offsets as batches arrive (from any
    thread), renamed into place by `commit`. Until then it is a hidden temp file; `abort` removes it."""

    def __init__(self, path: Path, n_tokens: int, d_in: int, d_out: int, dtype: str) -> None:
        header = shard_header(n_tokens, d_in, d_out, dtype)
        size = DTYPES[dtype].itemsize
        self.path, self.row_in, self.row_out = path, d_in * size, d_out * size
        self.base_in, self.base_out = len(header), len(header) + n_tokens * d_in * size
        self.tmp = layout.temp_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _reserve(self.fd, self.base_out + n_tokens * self.row_out)
            _write_at(self.fd, header, 0)
        except OSError as err:
            self.abort()
            raise write_error(path, err) from err

    def write(self, start: int, pair: MlpPairs) -> None:
        """Write the pairs of tokens [start, start + len(pair)) of this shard."""
        try:
            _write_at(self.fd, _raw(pair.mlp_in), self.base_in + start * self.row_in)
            _write_at(self.fd, _raw(pair.mlp_out), self.base_out + start * self.row_out)
        except OSError as err:
            raise write_error(self.path, err) from err

    def commit(self) -> None:
        os.close(self.fd)
        self.fd = -1
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.tmp.unlink(missing_ok=True)


class ShardWriter:
    """The files of one shard at every layer, written together: all are committed or none is."""

    def __init__(self, root: Path, layers: list[int], spec: ShardSpec, d_in: int, d_out: int, dtype: str) -> None:
        self.files: dict[int, ShardFile] = {}
        try:
            for layer in layers:
                path = shard_path(root, layer, spec.index)
                self.files[layer] = ShardFile(path, spec.n_tokens, d_in, d_out, dtype)
        except BaseException:
            self.abort()
            raise

    def write(self, start: int, pairs: dict[int, MlpPairs]) -> None:
        """Write tokens [start, start + n) of the shard at every layer."""
        for layer, pair in pairs.items():
            self.files[layer].write(start, pair)

    def commit(self) -> None:
        try:
            for file in self.files.values():
                file.commit()
        except OSError as err:
            raise write_error(file.path, err) from err
        finally:
            self.abort()  # whatever was not committed

    def abort(self) -> None:
        for file in self.files.values():
            file.abort()


def write_shard(path: Path, pair: MlpPairs) -> None:
    """Write one whole shard file atomically; raise ShardWriteError on an I/O failure."""
    n_tokens, d_in = pair.mlp_in.shape
    dtype = next(name for name, dt in DTYPES.items() if dt == pair.mlp_in.dtype)
    file = ShardFile(path, n_tokens, d_in, pair.mlp_out.shape[1], dtype)
    try:
        file.write(0, pair)
        file.commit()
    finally:
        file.abort()


def write_error(path: Path, err: OSError) -> ShardWriteError:
    """The one-line error for a failed shard write."""
    return ShardWriteError(
        f"could not write activation shard {path} ({err.strerror or err}); free disk space or fix the store, "
        "then rerun: finished shards are kept and caching resumes after them"
    )


def _reserve(fd: int, size: int) -> None:
    """Allocate the file's blocks now (ENOSPC here, not mid-shard); plain resize where unsupported."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)


def _write_at(fd: int, data: bytes | memoryview, offset: int) -> None:
    """pwrite all of `data` at `offset` (pwrite may write less than asked)."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _raw(tensor: Tensor) -> memoryview:
    """The bytes of a CPU tensor, without a copy when it is contiguous."""
    return memoryview(tensor.contiguous().view(torch.uint8).numpy())


def shard_is_complete(path: Path, n_tokens: int, d_in: int, d_out: int, dtype: str) -> bool:
    """True when `path` is a whole shard of the expected shapes and dtype (checks header and size)."""
    try:
        with open(path, "rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(header_len))
    except (OSError, ValueError, struct.error):
        return False
    want = {IN_KEY: [n_tokens, d_in], OUT_KEY: [n_tokens, d_out]}
    for name, shape in want.items():
        entry = header.get(name, {})
        if entry.get("dtype") != _SAFETENSORS_DTYPE[dtype] or entry.get("shape") != shape:
            return False
    data = n_tokens * (d_in + d_out) * DTYPES[dtype].itemsize
    return path.stat().st_size == 8 + header_len + data


def pending_shards(
    root: Path, layers: list[int], shards: list[ShardSpec], d_in: int, d_out: int, dtype: str
) -> list[ShardSpec]:
    """Shards not yet complete at every layer (a shard is redone whole, so resumes are byte-identical)."""
    return [
        spec
        for spec in shards
        if not all(
            shard_is_complete(shard_path(root, layer, spec.index), spec.n_tokens, d_in, d_out, dtype)
            for layer in layers
        )
    ]


def remove_temp_files(root: Path) -> None:
    """Delete temp files an interrupted writer left behind (hidden files under the layer folders)."""
    for path in root.glob("layer=*/.*"):
        if path.is_file():
            path.unlink()


def manifest_fields(
    layers: list[int],
    shards: list[ShardSpec],
    hooks: dict[int, tuple[str, str]],
    d_in: int,
    d_out: int,
    dtype: str,
    tokens_per_row: int,
    drop_bos: bool,
) -> dict[str, Any]:
    """The shard-describing part of the manifest (the task adds provenance: keys, model, timing)."""
    n_tokens = shards[-1].token_stop if shards else 0
    return {
        "format": FORMAT,
        "layers": list(layers),
        "dtype": dtype,
        "d_in": d_in,
        "d_out": d_out,
        "n_tokens": n_tokens,
        "n_rows": shards[-1].row_stop if shards else 0,
        "tokens_per_row": tokens_per_row,
        "drop_bos": drop_bos,
        "hooks": {str(layer): {"in": hooks[layer][0], "out": hooks[layer][1]} for layer in layers},
        "shards": [
            {**asdict(spec), "file": shard_path("", 0, spec.index).name, "n_tokens": spec.n_tokens} for spec in shards
        ],
        "bytes_per_token_per_layer": (d_in + d_out) * DTYPES[dtype].itemsize,
    }


# ---------------------------------------------------------------- reading


class ActivationCache:
    """A complete activations stage directory: one PairSource per cached layer."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest = layout.read_manifest(self.path)
        if self.manifest.get("format") != FORMAT:
            raise layout.StoreError(f"{self.path}: not an activations cache of format {FORMAT}; rerun the stage")
        self.layers: tuple[int, ...] = tuple(self.manifest["layers"])

    def layer(self, layer: int) -> PairSource:
        """The (mlp_in, mlp_out) pairs of one cached layer."""
        if layer not in self.layers:
            raise layout.StoreError(f"{self.path}: layer {layer} is not cached; cached layers are {list(self.layers)}")
        return PairSource(self.path, self.manifest, layer)


class PairSource:
    """One layer's pairs read from its shards, memory-mapped: only what is asked for is in RAM.

    `read` returns contiguous tokens as float32; core.batches.ShuffledPairs turns it into shuffled batches.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], layer: int) -> None:
        self.layer = layer
        self.n_tokens, self.d_in, self.d_out = manifest["n_tokens"], manifest["d_in"], manifest["d_out"]
        self.tokens_per_row = manifest["tokens_per_row"]
        self.hook_in, self.hook_out = manifest["hooks"][str(layer)]["in"], manifest["hooks"][str(layer)]["out"]
        self._starts = [s["token_start"] for s in manifest["shards"]]
        self._stops = [s["token_stop"] for s in manifest["shards"]]
        self._files = [path / f"layer={layer}" / s["file"] for s in manifest["shards"]]
        self._open: dict[int, Any] = {}

    def read(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """Pairs of tokens [start, stop) as float32 tensors ([n, d_in], [n, d_out])."""
        if not 0 <= start <= stop <= self.n_tokens:
            raise ValueError(f"read({start}, {stop}) is outside 0..{self.n_tokens}")
        parts_in, parts_out = [], []
        shard = bisect.bisect_right(self._starts, start) - 1
        while start < stop:
            end = min(stop, self._stops[shard])
            a, b = start - self._starts[shard], end - self._starts[shard]
            handle = self._handle(shard)
            parts_in.append(handle.get_slice(IN_KEY)[a:b].to(torch.float32))
            parts_out.append(handle.get_slice(OUT_KEY)[a:b].to(torch.float32))
            start, shard = end, shard + 1
        if len(parts_in) == 1:
            return parts_in[0], parts_out[0]
        return (
            torch.cat(parts_in) if parts_in else torch.empty(0, self.d_in),
            torch.cat(parts_out) if parts_out else torch.empty(0, self.d_out),
        )

    def nonfinite_files(self, block_tokens: int = 8192) -> list[str]:
        """`layer=L/pairs-i.safetensors (mlp_in)` for every shard tensor of this layer holding NaN or an
        infinity (reads the whole layer, a block at a time: for error messages)."""
        found = []
        for shard, file in enumerate(self._files):
            n = self._stops[shard] - self._starts[shard]
            for key in (IN_KEY, OUT_KEY):
                tensor = self._handle(shard).get_slice(key)
                if any(not bool(torch.isfinite(tensor[a : a + block_tokens]).all()) for a in range(0, n, block_tokens)):
                    found.append(f"{file.parent.name}/{file.name} ({key})")
        return found

    def _handle(self, shard: int) -> Any:
        if shard not in self._open:
            self._open[shard] = safe_open(self._files[shard], framework="pt")
        return self._open[shard]
