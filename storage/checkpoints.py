"""Transcoder files: read the native/SAELens, circuit-tracer and original-release layouts, write native and
circuit-tracer (docs/formats.md). `load_transcoder` detects the layout and hands the path to the module that reads
it; every write is atomic.

One module per layout, under storage/formats/: `saelens` (SAELens v6 folders, also the native layout),
`circuit_tracer` (per-layer sets), `original_pt` (the original release's `.pt` files), `hub` (`hf://` specs),
`base` (the error type, tensor checks and atomic folder writes they share). This module keeps the public names.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from core.transcoder import Transcoder
from storage.formats import circuit_tracer, original_pt, saelens
from storage.formats.base import (
    BLOCK,
    CheckpointError,
    describe_value,
    known_layer,
    layer_from_filename,
    write_folder,
)
from storage.formats.base import label as _label
from storage.formats.circuit_tracer import CT_CONFIG
from storage.formats.hub import fetch_hub
from storage.formats.original_pt import SPARSITY_SUFFIX
from storage.formats.saelens import SAE_CFG, SAE_SPARSITY, SAE_WEIGHTS, save_sparsity

__all__ = [
    "FORMATS",
    "SAE_SPARSITY",
    "CheckpointError",
    "ModelWidths",
    "check_fits",
    "key_by_layer",
    "load_log_feature_sparsity",
    "load_transcoder",
    "load_transcoders",
    "read_transcoders",
    "save_transcoder",
    "save_sparsity",
    "save_transcoders",
]

FORMATS = ("native", "saelens", "circuit-tracer")
LAYER_DIR = "layer_{}"
_GLOB_CHARS = re.compile(r"[*?\[]")


# ---------------------------------------------------------------------------------------------- public API


def load_transcoder(path: str | Path, device: str = "cpu", layer: int | None = None) -> Transcoder:
    """Load one transcoder, detecting the layout: native/SAELens folder, circuit-tracer set (pick `layer`),
    original-release `.pt`, or an `hf://owner/repo/path` on the Hugging Face hub."""
    path = _local(path)
    if path.is_file() and path.suffix == ".pt":
        tc = original_pt.load_release(path)
    elif path.is_file() and path.name in (SAE_CFG, SAE_WEIGHTS, CT_CONFIG):
        return load_transcoder(path.parent, device, layer)
    elif path.is_file() and path.suffix == ".safetensors":
        tc = circuit_tracer.load_file(
            path, circuit_tracer.read_config(path.parent, required=False), layer_from_filename(path)
        )
    elif (path / SAE_CFG).is_file():
        tc = saelens.load_folder(path)
    elif (path / CT_CONFIG).is_file():
        tc = circuit_tracer.load_set(path, layer)
    elif path.is_dir():
        return _pick_layer(path, _load_children(path, device), layer)
    else:
        raise CheckpointError(
            f"{path}: not a transcoder file or folder (.pt release, {SAE_CFG} folder or {CT_CONFIG} set)"
        )
    return _with_layer(tc, layer, path).to(_device(device))


def load_transcoders(spec: str | Path, device: str = "cpu") -> dict[int, Transcoder]:
    """Every transcoder a path, folder, glob or `hf://` spec names, keyed by layer (the `transcoders:` config key)."""
    return key_by_layer(read_transcoders(spec, device), spec)


def key_by_layer(tcs: Iterable[Transcoder], source: str | Path = "transcoders") -> dict[int, Transcoder]:
    """{layer: transcoder}, refusing an unknown layer or two transcoders for one layer."""
    by_layer: dict[int, Transcoder] = {}
    for tc in tcs:
        layer = tc.cfg.layer
        if layer < 0:
            raise CheckpointError(
                f"{source}: a transcoder reading {tc.cfg.hook_in or '?'} has no layer; name it blocks.L.* or convert it with a layer"
            )
        if layer in by_layer:
            raise CheckpointError(f"{source}: two transcoders for layer {layer}; keep one file per layer")
        by_layer[layer] = tc
    return dict(sorted(by_layer.items()))


def read_transcoders(spec: str | Path, device: str = "cpu") -> list[Transcoder]:
    """Every transcoder a path, folder, glob or `hf://` spec names, in file order (layers may be unknown)."""
    text = str(spec)
    local = fetch_hub(text) if text.startswith("hf://") else text
    if _GLOB_CHARS.search(local):
        paths = [Path(p) for p in sorted(glob.glob(local)) if not p.endswith(SPARSITY_SUFFIX)]
        if not paths:
            raise CheckpointError(f"{spec}: the pattern matches no transcoder files")
        return [tc for p in paths for tc in _load_path(p, device)]
    return _load_path(Path(local), device)


def save_transcoder(tc: Transcoder, path: str | Path, format: str = "native") -> Path:
    """Write one transcoder: "native"/"saelens" = a SAELens v6 transcoder folder, "circuit-tracer" = a per-layer set
    folder (added to an existing set there). Atomic: a temp folder renamed into place, or temp files renamed."""
    _check_format(format)
    path = Path(path)
    if format == "circuit-tracer":
        return circuit_tracer.save_set({circuit_tracer.set_layer(tc): tc}, path)
    write_folder(path, saelens.writers(tc))
    return path


def save_transcoders(
    tcs: Mapping[int, Transcoder] | Iterable[Transcoder], path: str | Path, format: str = "native"
) -> list[Path]:
    """Write several transcoders: one circuit-tracer set folder, or one native folder per layer (`path/layer_L`);
    a single native transcoder goes to `path` itself. Returns what was written."""
    _check_format(format)
    items = list(tcs.values()) if isinstance(tcs, Mapping) else list(tcs)
    path = Path(path)
    if format == "circuit-tracer":
        return [circuit_tracer.save_set({circuit_tracer.set_layer(tc): tc for tc in items}, path)]
    if len(items) == 1:
        return [save_transcoder(items[0], path, format)]
    return [save_transcoder(tc, path / LAYER_DIR.format(_layer_for_dir(tc)), format) for tc in items]


def load_log_feature_sparsity(path: str | Path) -> Float[Tensor, " d_sae"]:
    """log10 firing frequency per feature: the release's `*_log_feature_sparsity.pt` (or the one beside a release
    `.pt`), or a SAELens folder's `sparsity.safetensors`."""
    path = _local(path)
    if path.is_dir():
        return saelens.load_sparsity(path)
    if not path.name.endswith(SPARSITY_SUFFIX):
        path = path.with_name(path.name.removesuffix(".pt") + SPARSITY_SUFFIX)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: no log-feature-sparsity file here; the release names it <transcoder>{SPARSITY_SUFFIX}"
        )
    value = original_pt.restricted_torch_load(path)
    if not isinstance(value, Tensor) or value.dim() != 1:
        raise CheckpointError(
            f"{path}: expected a 1-d tensor of log10 feature frequencies, found {describe_value(value)}"
        )
    return value.float()


class ModelWidths(NamedTuple):
    """The widths check_fits needs when no core.model.ModelInfo is at hand."""

    d_model: int
    d_mlp: int | None = None
    n_layers: int | None = None


def check_fits(tc: Transcoder, model: Any, layer: int | None = None, hooks: tuple[str, str] | None = None) -> None:
    """Raise CheckpointError (one line) unless `tc` fits the model: its layer, its hook names (when `hooks`,
    the (input, output) hooks the pipeline uses, are given) and its widths. `model` is a ModelInfo or d_model."""
    info = ModelWidths(int(model)) if isinstance(model, int) else model
    label = _label(tc)
    where = _fit_layer(tc, info, layer, label)
    expected_in, expected_out = hooks if hooks is not None else ("", "")
    _fit_hook(label, "input", tc.cfg.hook_in, expected_in.format(layer=where), where)
    _fit_hook(label, "output", tc.cfg.hook_out, expected_out.format(layer=where), where)
    _fit_width(label, "d_in", tc.cfg.d_in, tc.cfg.hook_in or expected_in, info)
    _fit_width(label, "d_out", tc.cfg.d_out, tc.cfg.hook_out or expected_out, info)


# ---------------------------------------------------------------------------------------------- detection


def _local(path: str | Path) -> Path:
    """A local path; `hf://owner/repo/path` is fetched (or found in the hub cache) first."""
    text = str(path)
    return Path(fetch_hub(text)) if text.startswith("hf://") else Path(path)


def _load_path(path: Path, device: str) -> list[Transcoder]:
    if path.is_dir() and (path / CT_CONFIG).is_file() and not (path / SAE_CFG).is_file():
        config = circuit_tracer.read_config(path)
        return [
            circuit_tracer.load_file(file, config, i).to(_device(device))
            for i, file in circuit_tracer.layer_files(path, config).items()
        ]
    if path.is_dir() and not (path / SAE_CFG).is_file():
        return _load_children(path, device)
    return [load_transcoder(path, device)]


def _load_children(folder: Path, device: str) -> list[Transcoder]:
    """A folder of transcoders: native sub-folders, circuit-tracer sets and release `.pt` files."""
    children = [
        child
        for child in sorted(folder.iterdir())
        if (child.is_dir() and ((child / SAE_CFG).is_file() or (child / CT_CONFIG).is_file()))
        or (child.suffix == ".pt" and not child.name.endswith(SPARSITY_SUFFIX))
    ]
    if not children:
        raise CheckpointError(
            f"{folder}: holds no transcoders (no {SAE_CFG}, {CT_CONFIG}, sub-folders with them, or .pt files)"
        )
    return [tc for child in children for tc in _load_path(child, device)]


def _pick_layer(folder: Path, tcs: list[Transcoder], layer: int | None) -> Transcoder:
    if layer is None and len(tcs) == 1:
        return tcs[0]
    found = sorted(tc.cfg.layer for tc in tcs)
    if layer is None:
        raise CheckpointError(f"{folder}: holds transcoders for layers {found}; pass layer= (or use load_transcoders)")
    for tc in tcs:
        if tc.cfg.layer == layer:
            return tc
    raise CheckpointError(f"{folder}: no transcoder for layer {layer}; it holds layers {found}")


def _with_layer(tc: Transcoder, layer: int | None, path: Path) -> Transcoder:
    """Fill an unknown layer from the caller; refuse a contradiction."""
    if layer is None or tc.cfg.layer == layer:
        return tc
    if tc.cfg.layer >= 0:
        raise CheckpointError(f"{path}: this transcoder is for layer {tc.cfg.layer}, not layer {layer}")
    tc.cfg = tc.cfg.with_(layer=layer)
    return tc


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise CheckpointError(f"unknown transcoder format {format!r}; use one of {', '.join(FORMATS)}")


def _layer_for_dir(tc: Transcoder) -> int:
    return known_layer(tc, "several transcoders are written as layer_<L> folders")


# ---------------------------------------------------------------------------------------------- fitting checks


def _fit_layer(tc: Transcoder, info: Any, layer: int | None, label: str) -> int:
    where = layer if layer is not None else tc.cfg.layer
    if layer is not None and tc.cfg.layer >= 0 and tc.cfg.layer != layer:
        raise CheckpointError(f"transcoder {label} was trained for layer {tc.cfg.layer}, not layer {layer}")
    n_layers = getattr(info, "n_layers", None)
    if n_layers is not None and where >= 0 and not where < n_layers:
        raise CheckpointError(
            f"transcoder {label}: layer {where} does not exist; the model has layers 0..{n_layers - 1}"
        )
    return where


def _fit_hook(label: str, what: str, found: str, expected: str, layer: int) -> None:
    match = BLOCK.match(found or "")
    if match and layer >= 0 and int(match.group(1)) != layer:
        raise CheckpointError(f"transcoder {label}: its {what} hook {found} is not in layer {layer}")
    if found and expected and found != expected:
        raise CheckpointError(
            f"transcoder {label}: its {what} hook is {found} but the pipeline uses {expected}; use a transcoder trained on {expected}"
        )


_MLP_HIDDEN = re.compile(r"\.mlp\.hook_(pre|post|pre_linear)$")


def _fit_width(label: str, what: str, width: int, hook: str, info: Any) -> None:
    """A hook inside the MLP (mlp.hook_pre/post) is d_mlp wide; every other hook is d_model wide."""
    hidden = bool(_MLP_HIDDEN.search(hook or ""))
    expected = getattr(info, "d_mlp", None) if hidden else getattr(info, "d_model", None)
    if expected is not None and width != int(expected):
        name = "d_mlp" if hidden else "d_model"
        raise CheckpointError(
            f"transcoder {label}: {what} is {width} but the model's {name} is {expected}; it was trained on another model"
        )
