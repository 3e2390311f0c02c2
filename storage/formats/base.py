"""What every transcoder format module shares: the error type, tensor checks, layer names, atomic folder writes.

The format modules (`saelens`, `circuit_tracer`, `original_pt`) each read (and write) one on-disk layout;
`storage.checkpoints` detects which one a path holds and keeps the public load/save names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from core.errors import UserError
from core.transcoder import Transcoder, TranscoderConfig
from storage.layout import StoreWriteError, atomic_file, store_write_error, temp_path

BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


class CheckpointError(UserError, ValueError):
    """A transcoder file that cannot be read, written or used, described in one line."""


def layer_of(layer: Any, *hooks: str | None) -> int:
    """The layer a file states, else the L of a `blocks.L.*` hook name, else -1."""
    if layer is not None and int(layer) >= 0:
        return int(layer)
    for hook in hooks:
        match = BLOCK.match(hook or "")
        if match:
            return int(match.group(1))
    return -1


def known_layer(tc: Transcoder, why: str) -> int:
    """The transcoder's layer (stated, or from its hook names); CheckpointError saying `why` it is needed."""
    layer = layer_of(tc.cfg.layer, tc.cfg.hook_in, tc.cfg.hook_out)
    if layer < 0:
        raise CheckpointError(f"transcoder {label(tc)}: its layer is unknown; {why}")
    return layer


def layer_from_filename(path: Path) -> int:
    match = re.fullmatch(r"layer_(\d+)\.safetensors", path.name)
    return int(match.group(1)) if match else -1


def read_safetensors(file: Path) -> dict[str, Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; a transcoder folder needs its weights file")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{file}: not a readable safetensors file ({first_line(exc)})") from None


def expect(file: Path, tensors: Mapping[str, Tensor], key: str, shape: tuple[int, ...], dims: str) -> Tensor:
    """tensors[key] with the expected shape, or one line naming the file, the key and both shapes."""
    if key not in tensors:
        raise CheckpointError(f"{file}: missing tensor {key!r} (found {', '.join(sorted(tensors)) or 'none'})")
    found = tuple(tensors[key].shape)
    if found != shape:
        raise CheckpointError(f"{file}: tensor {key!r} has shape {list(found)}, expected {list(shape)} = [{dims}]")
    return tensors[key]


def expect_encoder_decoder(file: Path, tensors: Mapping[str, Tensor], dims: tuple[int, int, int]) -> dict[str, Tensor]:
    """W_enc [d_in, d_sae], b_enc [d_sae] and W_dec [d_sae, d_out], the weights every format shares, checked."""
    d_in, d_sae, d_out = dims
    return {
        "W_enc": expect(file, tensors, "W_enc", (d_in, d_sae), "d_in, d_sae"),
        "b_enc": expect(file, tensors, "b_enc", (d_sae,), "d_sae"),
        "W_dec": expect(file, tensors, "W_dec", (d_sae, d_out), "d_sae, d_out"),
    }


def refuse_extra(file: Path, tensors: Mapping[str, Tensor], allowed: Iterable[str]) -> None:
    extra = sorted(set(tensors) - set(allowed))
    if extra:
        raise CheckpointError(f"{file}: unexpected tensors {extra}; this layout has only {sorted(set(allowed))}")


def build(cfg: TranscoderConfig, tensors: Mapping[str, Tensor], source: Path | str = "") -> Transcoder:
    """A Transcoder holding `tensors` (our names and layout; a missing input pre-bias `b_dec` is zero). Refuses a
    top-k `k` outside 1..d_sae and weights that are not finite (`source` names the file in the message)."""
    where = source or f"transcoder {label_of(cfg)}"
    if cfg.activation == "topk" and not 1 <= cfg.k <= cfg.d_sae:
        raise CheckpointError(f"{where}: k={cfg.k} is outside 1..d_sae (d_sae={cfg.d_sae}); the checkpoint is corrupt")
    for name, tensor in tensors.items():
        bad = int((~torch.isfinite(tensor)).sum()) if tensor.is_floating_point() else 0
        if bad:
            raise CheckpointError(f"{where}: tensor {name!r} holds {bad} non-finite values (NaN or inf); refused")
    dtype = tensors["W_enc"].dtype
    tc = Transcoder(cfg, dtype=dtype)
    with torch.no_grad():
        for name, param in tc.named_parameters():
            if name in tensors:
                param.copy_(tensors[name].to(dtype))
    return tc


def folded_b_enc(tc: Transcoder) -> Float[Tensor, " d_sae"]:
    """b_enc - W_enc^T b_dec: the encoder bias that gives the same pre-activations without an input pre-bias
    (computed in float64, then stored in the transcoder's dtype)."""
    w_enc = tc.W_enc.detach().double()  # [d_in, d_sae]
    return (tc.b_enc.detach().double() - tc.b_dec.detach().double() @ w_enc).to(tc.dtype)


def save_tensors(tensors: Mapping[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors bytes written through open(): the file gets the usual permissions, and nothing but `path` is
    written (save_file writes through a temp file of its own, mode 0600, that a killed writer leaves behind)."""
    path.write_bytes(safetensors_bytes(dict(tensors), metadata=metadata))


def cpu(t: Tensor) -> Tensor:
    return t.detach().to("cpu").contiguous()


def read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: not readable JSON ({first_line(exc)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, found {type(data).__name__}")
    return data


def label(tc: Transcoder) -> str:
    return label_of(tc.cfg)


def label_of(cfg: TranscoderConfig) -> str:
    return f"{cfg.hook_in or '?'} -> {cfg.hook_out or '?'} (layer {cfg.layer})"


def write_folder(folder: Path, writers: Mapping[str, Callable[[Path], None]]) -> None:
    """Write files into `folder`: a new folder is built beside it and renamed into place; in an existing folder each
    file is written to a temp name and renamed, in order (so the config, written last, names complete weights)."""
    if folder.is_dir():
        for name, write in writers.items():
            with atomic_file(folder / name) as tmp:
                write(tmp)
        return
    if folder.exists():
        raise CheckpointError(f"{folder}: exists and is not a folder; choose another destination")
    tmp = temp_path(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        for name, write in writers.items():
            write(tmp / name)
        os.replace(tmp, folder)
    except StoreWriteError:
        raise
    except OSError as err:  # a full disk or no permission: one line, nothing partial kept
        raise store_write_error(folder, err) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(exc).__name__


def describe_value(value: Any) -> str:
    if isinstance(value, dict):
        return f"a dict with keys {sorted(map(str, value))[:8]}"
    if isinstance(value, Tensor):
        return f"a tensor of shape {list(value.shape)}"
    return f"a {type(value).__name__}"
