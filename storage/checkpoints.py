"""Transcoder files: read the native/SAELens, circuit-tracer and original-release layouts, write native and
circuit-tracer (ALGORITHMS.md section 7). `load_transcoder` detects the layout; every write is atomic.

Layout facts come from the formats' own sources, cited where they are used below.
"""

from __future__ import annotations

import glob
import json
import os
import pickle
import re
import shutil
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml
from jaxtyping import Float
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from core.errors import UserError
from core.transcoder import Transcoder, TranscoderConfig
from storage.layout import StoreWriteError, atomic_file, store_write_error, temp_path

FORMATS = ("native", "saelens", "circuit-tracer")

# SAELens file names: sae_lens/constants.py (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME).
SAE_CFG = "cfg.json"
SAE_WEIGHTS = "sae_weights.safetensors"
SAE_SPARSITY = "sparsity.safetensors"
# SAELens only treats a cfg.json as v6 (metadata nested under "metadata") when metadata.sae_lens_version >= 6.0.0;
# older ones go through handle_pre_6_0_config (sae_lens/loading/pretrained_sae_loaders.py), which drops it.
SAELENS_LAYOUT_VERSION = "6.0.0"
# circuit-tracer per-layer set: circuit_tracer/utils/hf_utils.py (config.yaml keys, layer_{i}.safetensors).
CT_CONFIG = "config.yaml"
CT_LAYER = "layer_{}.safetensors"
CT_THRESHOLD = "activation_function.threshold"
CT_EXTRA = "circuitflow"
"""config.yaml block circuit-tracer ignores: per-layer activation info it has no field for (top-k)."""
# The original release (Dunefsky et al.; jacobdunefsky/transcoder_circuits, sae_training/sparse_autoencoder.py
# save_model/load_from_pretrained): torch.save({"cfg": LanguageModelSAERunnerConfig, "state_dict": ...}).
SPARSITY_SUFFIX = "_log_feature_sparsity.pt"
LAYER_DIR = "layer_{}"
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_GLOB_CHARS = re.compile(r"[*?\[]")


class CheckpointError(UserError, ValueError):
    """A transcoder file that cannot be read, written or used, described in one line."""


# ---------------------------------------------------------------------------------------------- public API


def load_transcoder(path: str | Path, device: str = "cpu", layer: int | None = None) -> Transcoder:
    """Load one transcoder, detecting the layout: native/SAELens folder, circuit-tracer set (pick `layer`),
    original-release `.pt`, or an `hf://owner/repo/path` on the Hugging Face hub."""
    path = _local(path)
    if path.is_file() and path.suffix == ".pt":
        tc = _load_release(path)
    elif path.is_file() and path.name in (SAE_CFG, SAE_WEIGHTS, CT_CONFIG):
        return load_transcoder(path.parent, device, layer)
    elif path.is_file() and path.suffix == ".safetensors":
        tc = _load_ct_file(path, _ct_config(path.parent, required=False), _layer_from_filename(path))
    elif (path / SAE_CFG).is_file():
        tc = _load_saelens(path)
    elif (path / CT_CONFIG).is_file():
        tc = _load_ct_set(path, layer)
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
    local = _fetch_hub(text) if text.startswith("hf://") else text
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
        return _save_ct_set({_layer_for_ct(tc): tc}, path)
    _write_folder(path, _saelens_writers(tc))
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
        return [_save_ct_set({_layer_for_ct(tc): tc for tc in items}, path)]
    if len(items) == 1:
        return [save_transcoder(items[0], path, format)]
    return [save_transcoder(tc, path / LAYER_DIR.format(_layer_for_dir(tc)), format) for tc in items]


def load_log_feature_sparsity(path: str | Path) -> Float[Tensor, " d_sae"]:
    """log10 firing frequency per feature: the release's `*_log_feature_sparsity.pt` (or the one beside a release
    `.pt`), or a SAELens folder's `sparsity.safetensors`."""
    path = _local(path)
    if path.is_dir():
        return _saelens_sparsity(path)
    if not path.name.endswith(SPARSITY_SUFFIX):
        path = path.with_name(path.name.removesuffix(".pt") + SPARSITY_SUFFIX)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: no log-feature-sparsity file here; the release names it <transcoder>{SPARSITY_SUFFIX}"
        )
    value = _restricted_torch_load(path)
    if not isinstance(value, Tensor) or value.dim() != 1:
        raise CheckpointError(
            f"{path}: expected a 1-d tensor of log10 feature frequencies, found {_describe_value(value)}"
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
    return Path(_fetch_hub(text)) if text.startswith("hf://") else Path(path)


def _load_path(path: Path, device: str) -> list[Transcoder]:
    if path.is_dir() and (path / CT_CONFIG).is_file() and not (path / SAE_CFG).is_file():
        config = _ct_config(path)
        return [_load_ct_file(file, config, i).to(_device(device)) for i, file in _ct_layer_files(path, config).items()]
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


def _layer_of(layer: Any, *hooks: str | None) -> int:
    """The layer a file states, else the L of a `blocks.L.*` hook name, else -1."""
    if layer is not None and int(layer) >= 0:
        return int(layer)
    for hook in hooks:
        match = _BLOCK.match(hook or "")
        if match:
            return int(match.group(1))
    return -1


def _layer_from_filename(path: Path) -> int:
    match = re.fullmatch(r"layer_(\d+)\.safetensors", path.name)
    return int(match.group(1)) if match else -1


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise CheckpointError(f"unknown transcoder format {format!r}; use one of {', '.join(FORMATS)}")


# ---------------------------------------------------------------------------------------------- tensors


def _read_safetensors(file: Path) -> dict[str, Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; a transcoder folder needs its weights file")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{file}: not a readable safetensors file ({_first_line(exc)})") from None


def _expect(file: Path, tensors: Mapping[str, Tensor], key: str, shape: tuple[int, ...], dims: str) -> Tensor:
    """tensors[key] with the expected shape, or one line naming the file, the key and both shapes."""
    if key not in tensors:
        raise CheckpointError(f"{file}: missing tensor {key!r} (found {', '.join(sorted(tensors)) or 'none'})")
    found = tuple(tensors[key].shape)
    if found != shape:
        raise CheckpointError(f"{file}: tensor {key!r} has shape {list(found)}, expected {list(shape)} = [{dims}]")
    return tensors[key]


def _refuse_extra(file: Path, tensors: Mapping[str, Tensor], allowed: Iterable[str]) -> None:
    extra = sorted(set(tensors) - set(allowed))
    if extra:
        raise CheckpointError(f"{file}: unexpected tensors {extra}; this layout has only {sorted(set(allowed))}")


def _build(cfg: TranscoderConfig, tensors: Mapping[str, Tensor]) -> Transcoder:
    """A Transcoder holding `tensors` (our names and layout; a missing input pre-bias `b_dec` is zero)."""
    dtype = tensors["W_enc"].dtype
    tc = Transcoder(cfg, dtype=dtype)
    with torch.no_grad():
        for name, param in tc.named_parameters():
            if name in tensors:
                param.copy_(tensors[name].to(dtype))
    return tc


def _folded_b_enc(tc: Transcoder) -> Float[Tensor, " d_sae"]:
    """b_enc - W_enc^T b_dec: the encoder bias that gives the same pre-activations without an input pre-bias
    (computed in float64, then stored in the transcoder's dtype)."""
    w_enc = tc.W_enc.detach().double()  # [d_in, d_sae]
    return (tc.b_enc.detach().double() - tc.b_dec.detach().double() @ w_enc).to(tc.dtype)


def _save_tensors(tensors: Mapping[str, Tensor], path: Path) -> None:
    """safetensors bytes written through open(), so the file gets the usual permissions (save_file makes 0600)."""
    path.write_bytes(safetensors_bytes(dict(tensors)))


def _cpu(t: Tensor) -> Tensor:
    return t.detach().to("cpu").contiguous()


# ---------------------------------------------------------------------------------------------- SAELens / native
# Source: SAELens sae_lens/saes/transcoder.py (decoderesearch/SAELens; jbloomAus/SAELens before the move) and
# sae_lens/saes/sae.py. A SAELens transcoder computes  z = act(x @ W_enc + b_enc),  y = z @ W_dec + b_dec (+ x @ W_skip.T):
# W_enc [d_in, d_sae], W_dec [d_sae, d_out], b_dec [d_out] is the OUTPUT bias, there is no input pre-bias
# (TranscoderConfig refuses apply_b_dec_to_input=True), W_skip is [d_out, d_in], JumpReLU is relu(pre) * (pre > threshold).
# SAE.load_from_disk loads the weights strictly, so the file holds exactly these tensors.
# cfg.json = SAEConfig.to_dict(): d_in, d_sae, dtype, device, apply_b_dec_to_input, normalize_activations,
# reshape_activations, metadata{...}, architecture, + d_out (transcoders) or k (TopKSAEConfig).

_SAELENS_ARCH: dict[str, tuple[str, bool, bool]] = {
    # architecture: (activation, skip, is_transcoder)
    "transcoder": ("relu", False, True),
    "skip_transcoder": ("relu", True, True),
    "jumprelu_transcoder": ("jumprelu", False, True),
    "jumprelu_skip_transcoder": ("jumprelu", True, True),
    # SAELens has no top-k transcoder: these two names are ours, so SAELens refuses them instead of running ReLU.
    "topk_transcoder": ("topk", False, True),
    "topk_skip_transcoder": ("topk", True, True),
    # plain SAEs (input hook = output hook) load as transcoders too
    "standard": ("relu", False, False),
    "jumprelu": ("jumprelu", False, False),
    "topk": ("topk", False, False),
}


def _saelens_arch(cfg: TranscoderConfig) -> str:
    prefix = {"relu": "", "jumprelu": "jumprelu_", "topk": "topk_"}[cfg.activation]
    return f"{prefix}{'skip_' if cfg.skip else ''}transcoder"


def _saelens_cfg(tc: Transcoder) -> dict[str, Any]:
    cfg = tc.cfg
    out: dict[str, Any] = {
        "architecture": _saelens_arch(cfg),
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "d_out": cfg.d_out,
        "dtype": str(tc.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": cfg.model_name,
            "hook_name": cfg.hook_in,
            "hook_name_out": cfg.hook_out,
            "hook_head_index": None,
            "hook_head_index_out": None,
            "hook_layer": _layer_of(cfg.layer, cfg.hook_in, cfg.hook_out),
            "sae_lens_version": SAELENS_LAYOUT_VERSION,
            "sae_lens_training_version": SAELENS_LAYOUT_VERSION,
        },
    }
    out["k"] = cfg.k  # TopKSAEConfig.k (sae_lens/saes/topk_sae.py); other architectures ignore it
    return out


def _saelens_tensors(tc: Transcoder) -> dict[str, Tensor]:
    tensors = {
        "W_enc": _cpu(tc.W_enc),  # [d_in, d_sae]
        "b_enc": _cpu(_folded_b_enc(tc)),  # [d_sae], input pre-bias folded in
        "W_dec": _cpu(tc.W_dec),  # [d_sae, d_out]
        "b_dec": _cpu(tc.b_dec_out),  # [d_out], SAELens' b_dec is the output bias
    }
    if tc.threshold is not None:
        negative = int((tc.threshold < 0).sum())
        if negative:
            raise CheckpointError(
                f"transcoder {_label(tc)}: {negative} JumpReLU thresholds are negative; SAELens applies ReLU before the "
                "threshold, so a native/SAELens file cannot reproduce them: save as circuit-tracer, or clamp them to 0"
            )
        tensors["threshold"] = _cpu(tc.threshold)  # [d_sae]
    if tc.W_skip is not None:
        tensors["W_skip"] = _cpu(tc.W_skip.T)  # [d_out, d_in]
    return tensors


def _saelens_writers(tc: Transcoder) -> dict[str, Callable[[Path], None]]:
    tensors, cfg = _saelens_tensors(tc), _saelens_cfg(tc)
    return {
        SAE_WEIGHTS: lambda p: _save_tensors(tensors, p),
        SAE_CFG: lambda p: p.write_text(json.dumps(cfg, indent=2)),  # last: a cfg.json names complete weights
    }


def _load_saelens(folder: Path) -> Transcoder:
    cfg_file = folder / SAE_CFG
    cfg = _read_json(cfg_file)
    arch = cfg.get("architecture", "standard")
    if arch not in _SAELENS_ARCH:
        raise CheckpointError(
            f"{cfg_file}: architecture {arch!r} is not supported; expected one of {sorted(_SAELENS_ARCH)}"
        )
    _check_saelens_options(cfg_file, cfg)
    activation, skip, is_transcoder = _SAELENS_ARCH[arch]
    d_in, d_sae = _cfg_int(cfg_file, cfg, "d_in"), _cfg_int(cfg_file, cfg, "d_sae")
    d_out = int(cfg.get("d_out") or d_in)
    file = folder / SAE_WEIGHTS
    tensors = _drop_unit_scaling(file, _read_safetensors(file))
    ours = _saelens_to_ours(file, tensors, activation, skip, (d_in, d_sae, d_out))
    if not is_transcoder and cfg.get("apply_b_dec_to_input", True):
        ours["b_dec"] = ours["b_dec_out"]  # a plain SAE's b_dec is both the pre-bias and the output bias
    meta = _saelens_metadata(cfg)
    hook_in = meta.get("hook_name") or ""
    hook_out = meta.get("hook_name_out") or (hook_in if not is_transcoder else "")
    k = int(cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k") or 32)
    layer = _layer_of(meta.get("hook_layer"), hook_in, hook_out)
    tc_cfg = TranscoderConfig(
        d_in, d_sae, d_out, activation, k, skip, hook_in, hook_out, layer, meta.get("model_name") or ""
    )
    return _build(tc_cfg, ours)


def _saelens_to_ours(
    file: Path, tensors: Mapping[str, Tensor], activation: str, skip: bool, dims: tuple[int, int, int]
) -> dict[str, Tensor]:
    d_in, d_sae, d_out = dims
    ours = {
        "W_enc": _expect(file, tensors, "W_enc", (d_in, d_sae), "d_in, d_sae"),
        "b_enc": _expect(file, tensors, "b_enc", (d_sae,), "d_sae"),
        "W_dec": _expect(file, tensors, "W_dec", (d_sae, d_out), "d_sae, d_out"),
        "b_dec_out": _expect(file, tensors, "b_dec", (d_out,), "d_out"),
    }
    allowed = {"W_enc", "b_enc", "W_dec", "b_dec"}
    if activation == "jumprelu":
        # relu(pre) * (pre > t) == pre * (pre > max(t, 0)): clamping makes our JumpReLU match SAELens' exactly
        ours["threshold"] = _expect(file, tensors, "threshold", (d_sae,), "d_sae").clamp_min(0)
        allowed.add("threshold")
    if skip:
        ours["W_skip"] = _expect(file, tensors, "W_skip", (d_out, d_in), "d_out, d_in").T  # ours is [d_in, d_out]
        allowed.add("W_skip")
    _refuse_extra(file, tensors, allowed)
    return ours


def _saelens_metadata(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Hook names etc.: nested under "metadata" since SAELens 6, at the top level before (hook_point before 3.x)."""
    top = {k: cfg[k] for k in ("model_name", "hook_name", "hook_name_out", "hook_layer") if cfg.get(k) is not None}
    if "hook_name" not in top and cfg.get("hook_point"):
        top["hook_name"] = cfg["hook_point"]
    return {**top, **{k: v for k, v in (cfg.get("metadata") or {}).items() if v is not None}}


def _check_saelens_options(cfg_file: Path, cfg: Mapping[str, Any]) -> None:
    norm = cfg.get("normalize_activations") or "none"
    if norm not in ("none", False):
        raise CheckpointError(
            f"{cfg_file}: normalize_activations={norm!r} is not supported; fold the scaling into the weights first"
        )
    reshape = cfg.get("reshape_activations") or "none"
    if reshape != "none":
        raise CheckpointError(
            f"{cfg_file}: reshape_activations={reshape!r} (attention SAEs) is not supported; transcoders read MLP inputs"
        )


def _drop_unit_scaling(file: Path, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """SAELens drops an all-ones `scaling_factor` on load (read_sae_components_from_disk); anything else is refused."""
    scale = tensors.pop("scaling_factor", None)
    if scale is not None and not torch.allclose(scale, torch.ones_like(scale)):
        raise CheckpointError(
            f"{file}: a fine-tuning 'scaling_factor' is not supported; fold it into W_dec and b_dec first"
        )
    return tensors


def _saelens_sparsity(folder: Path) -> Tensor:
    file = folder / SAE_SPARSITY
    if not file.is_file():
        raise CheckpointError(f"{folder}: no {SAE_SPARSITY}; this folder stores no feature sparsity")
    tensors = _read_safetensors(file)
    if "sparsity" not in tensors or tensors["sparsity"].dim() != 1:
        raise CheckpointError(f"{file}: expected a 1-d tensor 'sparsity' (log10 feature frequencies)")
    return tensors["sparsity"].float()


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: not readable JSON ({_first_line(exc)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, found {type(data).__name__}")
    return data


def _cfg_int(file: Path, cfg: Mapping[str, Any], key: str) -> int:
    if not isinstance(cfg.get(key), int):
        raise CheckpointError(f"{file}: missing integer {key!r}; a SAELens cfg.json states d_in and d_sae")
    return int(cfg[key])


# ---------------------------------------------------------------------------------------------- circuit-tracer
# Source: circuit-tracer circuit_tracer/transcoder/single_layer_transcoder.py (decoderesearch/circuit-tracer, formerly
# safety-research/circuit-tracer): SingleLayerTranscoder.encode = F.linear(x, W_enc, b_enc) with W_enc [d_transcoder,
# d_model], decode = acts @ W_dec + b_dec with W_dec [d_transcoder, d_model], b_dec [d_model] the OUTPUT bias (no input
# pre-bias), skip = x @ W_skip.T with W_skip [d_model, d_model]; to_safetensors writes W_enc, W_dec, b_enc, b_dec and
# optionally "activation_function.threshold" and W_skip; load_relu_transcoder picks JumpReLU when that threshold exists
# (activation_functions.py: x * (x > threshold), the same as ours) and ReLU otherwise. config.yaml (utils/hf_utils.py):
# model_name, model_kind: transcoder_set, feature_input_hook / feature_output_hook relative to blocks.{layer}
# (replacement_model: f"blocks.{layer}.{feature_input_hook}"), layer files layer_{i}.safetensors or a `transcoders` list.


def _ct_config(folder: Path, required: bool = True) -> dict[str, Any]:
    file = folder / CT_CONFIG
    if not file.is_file():
        if required:
            raise CheckpointError(f"{folder}: no {CT_CONFIG}; a circuit-tracer set needs one")
        return {}
    try:
        config = yaml.safe_load(file.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise CheckpointError(f"{file}: not readable YAML ({_first_line(exc)})") from None
    kind = config.get("model_kind", "transcoder_set")
    if kind != "transcoder_set":
        raise CheckpointError(f"{file}: model_kind {kind!r} is not supported; only per-layer sets (transcoder_set) are")
    return config


def _ct_layer_files(folder: Path, config: Mapping[str, Any]) -> dict[int, Path]:
    if config.get("transcoders"):
        files = {}
        for i, name in enumerate(config["transcoders"]):
            if str(name).startswith("hf://"):
                raise CheckpointError(
                    f"{folder / CT_CONFIG}: layer {i} is {name}; download the set (hf://...) and point at the folder"
                )
            files[i] = Path(name) if Path(name).is_absolute() else folder / name
        return files
    files = {_layer_from_filename(p): p for p in folder.glob("layer_*.safetensors")}
    files.pop(-1, None)
    if not files:
        raise CheckpointError(f"{folder}: {CT_CONFIG} but no layer_<i>.safetensors files")
    return dict(sorted(files.items()))


def _load_ct_set(folder: Path, layer: int | None) -> Transcoder:
    config = _ct_config(folder)
    files = _ct_layer_files(folder, config)
    if layer is None:
        if len(files) != 1:
            raise CheckpointError(
                f"{folder}: a circuit-tracer set with layers {sorted(files)}; pass layer= (or use load_transcoders)"
            )
        layer = next(iter(files))
    if layer not in files:
        raise CheckpointError(f"{folder}: no transcoder for layer {layer}; the set holds layers {sorted(files)}")
    return _load_ct_file(files[layer], config, layer)


def _load_ct_file(file: Path, config: Mapping[str, Any], layer: int) -> Transcoder:
    tensors = _read_safetensors(file)
    d_sae = _expect_1d(file, tensors, "b_enc", "d_sae")
    d_model = _expect_1d(file, tensors, "b_dec", "d_model")
    ours = {
        "W_enc": _expect(file, tensors, "W_enc", (d_sae, d_model), "d_sae, d_model").T,  # ours is [d_in, d_sae]
        "b_enc": tensors["b_enc"],
        "W_dec": _ct_decoder(file, tensors, d_sae, d_model),
        "b_dec_out": tensors["b_dec"],
    }
    threshold_key = next((k for k in (CT_THRESHOLD, "threshold") if k in tensors), None)
    if threshold_key is not None:
        ours["threshold"] = _ct_threshold(file, tensors[threshold_key], threshold_key, d_sae)
    if "W_skip" in tensors:
        ours["W_skip"] = _expect(file, tensors, "W_skip", (d_model, d_model), "d_model, d_model").T
    _refuse_extra(file, tensors, {"W_enc", "b_enc", "W_dec", "b_dec", "W_skip", threshold_key or CT_THRESHOLD})
    extra = _ct_extra(config, layer)
    activation = "jumprelu" if threshold_key else ("topk" if extra.get("activation") == "topk" else "relu")
    hook_in, hook_out = _ct_hook(config, "feature_input_hook", layer), _ct_hook(config, "feature_output_hook", layer)
    cfg = TranscoderConfig(
        d_model,
        d_sae,
        d_model,
        activation,
        int(extra.get("k", 32)),
        "W_skip" in tensors,
        hook_in,
        hook_out,
        layer,
        config.get("model_name") or "",
    )
    return _build(cfg, ours)


def _expect_1d(file: Path, tensors: Mapping[str, Tensor], key: str, dim: str) -> int:
    if key not in tensors:
        raise CheckpointError(f"{file}: missing tensor {key!r} (found {', '.join(sorted(tensors)) or 'none'})")
    if tensors[key].dim() != 1:
        raise CheckpointError(f"{file}: tensor {key!r} has shape {list(tensors[key].shape)}, expected [{dim}]")
    return int(tensors[key].shape[0])


def _ct_decoder(file: Path, tensors: Mapping[str, Tensor], d_sae: int, d_model: int) -> Tensor:
    """W_dec [d_sae, d_model]; early circuit-tracer files stored [d_model, d_sae] (load_relu_transcoder transposed it)."""
    w_dec = tensors.get("W_dec")
    if w_dec is not None and d_sae != d_model and tuple(w_dec.shape) == (d_model, d_sae):
        return w_dec.T
    return _expect(file, tensors, "W_dec", (d_sae, d_model), "d_sae, d_model")


def _ct_threshold(file: Path, threshold: Tensor, key: str, d_sae: int) -> Tensor:
    if threshold.dim() == 0:
        return threshold.expand(d_sae)
    return _expect(file, {key: threshold}, key, (d_sae,), "d_sae")


def _ct_extra(config: Mapping[str, Any], layer: int) -> dict[str, Any]:
    layers = (config.get(CT_EXTRA) or {}).get("layers") or {}
    return dict(layers.get(layer) or layers.get(str(layer)) or {})


def _ct_hook(config: Mapping[str, Any], key: str, layer: int) -> str:
    suffix = config.get(key) or ""
    return f"blocks.{layer}.{suffix}" if suffix else ""


def _ct_suffix(tc: Transcoder, hook: str, layer: int, what: str) -> str:
    match = _BLOCK.match(hook)
    if not match or int(match.group(1)) != layer:
        raise CheckpointError(
            f"transcoder {_label(tc)}: {what} hook {hook!r} is not blocks.{layer}.*; circuit-tracer stores hooks relative to the layer"
        )
    return match.group(2)


def _ct_tensors(tc: Transcoder) -> dict[str, Tensor]:
    if tc.cfg.d_in != tc.cfg.d_out:
        raise CheckpointError(
            f"transcoder {_label(tc)}: d_in {tc.cfg.d_in} != d_out {tc.cfg.d_out}; circuit-tracer needs both = d_model"
        )
    tensors = {
        "W_enc": _cpu(tc.W_enc.T),  # [d_sae, d_model]
        "W_dec": _cpu(tc.W_dec),  # [d_sae, d_model]
        "b_enc": _cpu(_folded_b_enc(tc)),  # [d_sae], input pre-bias folded in
        "b_dec": _cpu(tc.b_dec_out),  # [d_model], output bias
    }
    if tc.threshold is not None:
        tensors[CT_THRESHOLD] = _cpu(tc.threshold)  # [d_sae]
    if tc.W_skip is not None:
        tensors["W_skip"] = _cpu(tc.W_skip.T)  # [d_out, d_in]
    return tensors


def _ct_set_config(tcs: Mapping[int, Transcoder]) -> dict[str, Any]:
    config: dict[str, Any] = {"model_kind": "transcoder_set", CT_EXTRA: {"layers": {}}}
    for layer, tc in sorted(tcs.items()):
        entry = {
            "model_name": tc.cfg.model_name,
            "feature_input_hook": _ct_suffix(tc, tc.cfg.hook_in, layer, "input"),
            "feature_output_hook": _ct_suffix(tc, tc.cfg.hook_out, layer, "output"),
        }
        _merge_ct_entry(config, entry, layer)
        config[CT_EXTRA]["layers"][layer] = {"activation": tc.cfg.activation, "k": tc.cfg.k}
        if tc.cfg.activation == "topk":
            warnings.warn(
                f"layer {layer}: circuit-tracer has no top-k loader and will apply ReLU; circuitflow reads the k back",
                stacklevel=3,
            )
    return config


def _merge_ct_entry(config: dict[str, Any], entry: Mapping[str, Any], layer: int) -> None:
    """One set has one model and one pair of hooks: refuse a layer that disagrees."""
    for key, value in entry.items():
        current = config.get(key)
        if not current:
            config[key] = value
        elif value and current != value:
            raise CheckpointError(
                f"layer {layer}: {key} is {value!r} but the set has {current!r}; a circuit-tracer set shares it"
            )


def _save_ct_set(tcs: Mapping[int, Transcoder], folder: Path) -> Path:
    config = _ct_set_config(tcs)
    if (folder / CT_CONFIG).is_file():
        config = _merged_ct_config(_ct_config(folder), config)
    writers: dict[str, Callable[[Path], None]] = {}
    for layer, tc in tcs.items():
        tensors = _ct_tensors(tc)
        writers[CT_LAYER.format(layer)] = lambda p, t=tensors: _save_tensors(t, p)
    writers[CT_CONFIG] = lambda p: p.write_text(yaml.safe_dump(config, sort_keys=False))
    _write_folder(folder, writers)
    return folder


def _merged_ct_config(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Add layers to an existing set: same model and hooks required; `transcoders` lists are not merged."""
    if old.get("transcoders"):
        raise CheckpointError(
            "the target set lists its files in `transcoders:`; write the new layers to a fresh folder"
        )
    merged = {k: v for k, v in old.items() if k != CT_EXTRA}
    shared = {k: new[k] for k in ("model_name", "feature_input_hook", "feature_output_hook") if k in new}
    _merge_ct_entry(merged, shared, min(new[CT_EXTRA]["layers"]))
    layers = {**((old.get(CT_EXTRA) or {}).get("layers") or {}), **new[CT_EXTRA]["layers"]}
    merged[CT_EXTRA] = {"layers": dict(sorted(layers.items(), key=lambda kv: int(kv[0])))}
    return merged


def _layer_for_ct(tc: Transcoder) -> int:
    layer = _layer_of(tc.cfg.layer, tc.cfg.hook_in, tc.cfg.hook_out)
    if layer < 0:
        raise CheckpointError(
            f"transcoder {_label(tc)}: its layer is unknown; circuit-tracer files are per layer, so set cfg.layer"
        )
    return layer


def _layer_for_dir(tc: Transcoder) -> int:
    layer = _layer_of(tc.cfg.layer, tc.cfg.hook_in, tc.cfg.hook_out)
    if layer < 0:
        raise CheckpointError(
            f"transcoder {_label(tc)}: its layer is unknown; several transcoders are written as layer_<L> folders"
        )
    return layer


# ---------------------------------------------------------------------------------------------- original release
# Source: jacobdunefsky/transcoder_circuits, sae_training/sparse_autoencoder.py: forward computes
# relu((x - b_dec) @ W_enc + b_enc) @ W_dec + b_dec_out, with W_enc [d_in, d_sae], W_dec [d_sae, d_out], b_dec [d_in],
# b_dec_out [d_out] (absent for a plain SAE, which adds b_dec); save_model torch.saves {"cfg": cfg, "state_dict": ...}
# where cfg is a sae_training/config.py LanguageModelSAERunnerConfig dataclass (hook_point, hook_point_layer,
# out_hook_point, is_transcoder, d_in, d_out, d_sae, model_name, plus a torch.device and a torch.dtype).
# The release is read with torch's weights-only unpickler (it never imports modules or calls arbitrary globals): the
# config class is mapped to an inert stand-in and every other non-tensor global is refused before unpickling starts.

_FOREIGN_CONFIG = re.compile(r"^(?:[A-Za-z_]\w*\.)*config\.LanguageModelSAERunnerConfig$")
_KNOWN_CONFIG_NAMES = (
    "sae_training.config.LanguageModelSAERunnerConfig",
    "transcoder_circuits.sae_training.config.LanguageModelSAERunnerConfig",
    "sae_lens.training.config.LanguageModelSAERunnerConfig",
)
_SAFE_GLOBALS_LOCK = threading.Lock()  # torch's safe_globals() edits a process-wide set


class ForeignConfig:
    """Inert stand-in for the release's config class: unpickling only fills its __dict__ with plain values."""


def _restricted_torch_load(file: Path) -> Any:
    """torch.load(weights_only=True) with the foreign config class mapped to ForeignConfig; anything else refused."""
    names = _foreign_config_globals(file)
    with _SAFE_GLOBALS_LOCK, torch.serialization.safe_globals([(ForeignConfig, name) for name in names]):
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"{file}: refused to unpickle: {_refusal_reason(exc)}; only tensors and the release's config are read"
            ) from None
        except Exception as exc:  # untrusted bytes can fail in any way; report one line
            raise CheckpointError(f"{file}: not a readable torch file ({_first_line(exc)})") from None


def _foreign_config_globals(file: Path) -> list[str]:
    """Scan the pickle (without running it) for globals torch does not allow by default: the release's config class
    is mapped, anything else is refused here with its name. A non-zip file gets the known names (torch still vets it)."""
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(file))
    except Exception:  # not a zip checkpoint, or unparsable: the weights-only load below decides
        return list(_KNOWN_CONFIG_NAMES)
    refused = sorted(name for name in unsafe if not _FOREIGN_CONFIG.match(name))
    if refused:
        raise CheckpointError(
            f"{file}: refused to unpickle: it references {', '.join(refused)}, which is neither tensor data nor the release's config class"
        )
    return sorted(unsafe)


def _refusal_reason(exc: Exception) -> str:
    text = str(exc)
    match = re.search(r"(?:unsupported )?GLOBAL ([\w.]+)", text, flags=re.IGNORECASE)
    if match:
        return f"it references {match.group(1)}, which is not allowed"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else type(exc).__name__


def _plain_config(file: Path, cfg: Any) -> dict[str, Any]:
    if isinstance(cfg, ForeignConfig):
        cfg = dict(vars(cfg))
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{file}: 'cfg' is {_describe_value(cfg)}, expected the release's config object")
    return {k: (str(v) if isinstance(v, torch.device | torch.dtype) else v) for k, v in cfg.items()}


def _load_release(file: Path) -> Transcoder:
    if file.name.endswith(SPARSITY_SUFFIX):
        raise CheckpointError(f"{file}: this is a feature-sparsity file; load it with load_log_feature_sparsity")
    obj = _restricted_torch_load(file)
    if not isinstance(obj, dict) or not {"cfg", "state_dict"} <= set(obj):
        raise CheckpointError(
            f"{file}: expected {{'cfg', 'state_dict'}} (the original release layout), found {_describe_value(obj)}"
        )
    cfg = _plain_config(file, obj["cfg"])
    state = {k: v for k, v in dict(obj["state_dict"]).items() if isinstance(v, Tensor)}
    is_transcoder = bool(cfg.get("is_transcoder", "b_dec_out" in state))
    d_in, d_sae = _release_int(file, cfg, "d_in"), _release_int(file, cfg, "d_sae")
    d_out = int(cfg.get("d_out") or d_in) if is_transcoder else d_in
    ours = _release_to_ours(file, state, is_transcoder, (d_in, d_sae, d_out))
    hook_in = _release_str(file, cfg, "hook_point")
    hook_out = _release_str(file, cfg, "out_hook_point") if is_transcoder else hook_in
    layer = _layer_of(cfg.get("hook_point_layer"), hook_in, hook_out)
    model_name = _release_str(file, cfg, "model_name")
    tc_cfg = TranscoderConfig(d_in, d_sae, d_out, "relu", 32, False, hook_in, hook_out, layer, model_name)
    return _build(tc_cfg, ours)


def _release_to_ours(
    file: Path, state: Mapping[str, Tensor], is_transcoder: bool, dims: tuple[int, int, int]
) -> dict[str, Tensor]:
    d_in, d_sae, d_out = dims
    ours = {
        "W_enc": _expect(file, state, "W_enc", (d_in, d_sae), "d_in, d_sae"),
        "b_enc": _expect(file, state, "b_enc", (d_sae,), "d_sae"),
        "W_dec": _expect(file, state, "W_dec", (d_sae, d_out), "d_sae, d_out"),
        "b_dec": _expect(file, state, "b_dec", (d_in,), "d_in"),
    }
    ours["b_dec_out"] = _expect(file, state, "b_dec_out", (d_out,), "d_out") if is_transcoder else ours["b_dec"]
    _refuse_extra(file, state, {"W_enc", "b_enc", "W_dec", "b_dec", "b_dec_out"})
    return ours


def _release_str(file: Path, cfg: Mapping[str, Any], key: str) -> str:
    value = cfg.get(key)
    if value is not None and not isinstance(value, str):
        raise CheckpointError(f"{file}: the config's {key!r} is {_describe_value(value)}, expected a string")
    return value or ""


def _release_int(file: Path, cfg: Mapping[str, Any], key: str) -> int:
    if not isinstance(cfg.get(key), int):
        raise CheckpointError(
            f"{file}: the config has no integer {key!r}; expected the release's LanguageModelSAERunnerConfig"
        )
    return int(cfg[key])


# ---------------------------------------------------------------------------------------------- hub


def _fetch_hub(spec: str) -> str:
    """`hf://owner/repo/path-or-glob` -> the local path (downloads only the matching files; the hub cache is reused)."""
    parts = spec.removeprefix("hf://").split("/", 2)
    if len(parts) < 2 or not all(parts[:2]):
        raise CheckpointError(f"{spec}: expected hf://owner/repo[/path or glob]")
    repo_id, inner = "/".join(parts[:2]), (parts[2] if len(parts) == 3 else "")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{spec}: reading from the hub needs huggingface_hub (pip install huggingface_hub)"
        ) from None
    patterns = [inner, f"{inner}/*", inner.removesuffix(".pt") + SPARSITY_SUFFIX] if inner else None
    try:
        local = snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as exc:  # network, auth or missing repo: one line either way
        raise CheckpointError(
            f"{spec}: could not fetch from the hub ({type(exc).__name__}: {_first_line(exc)})"
        ) from None
    return str(Path(local) / inner) if inner else local


# ---------------------------------------------------------------------------------------------- fitting checks


def _label(tc: Transcoder) -> str:
    cfg = tc.cfg
    return f"{cfg.hook_in or '?'} -> {cfg.hook_out or '?'} (layer {cfg.layer})"


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
    match = _BLOCK.match(found or "")
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


# ---------------------------------------------------------------------------------------------- atomic folders


def _write_folder(folder: Path, writers: Mapping[str, Callable[[Path], None]]) -> None:
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


# ---------------------------------------------------------------------------------------------- small helpers


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(exc).__name__


def _describe_value(value: Any) -> str:
    if isinstance(value, dict):
        return f"a dict with keys {sorted(map(str, value))[:8]}"
    if isinstance(value, Tensor):
        return f"a tensor of shape {list(value.shape)}"
    return f"a {type(value).__name__}"
