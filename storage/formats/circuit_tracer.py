"""circuit-tracer's per-layer transcoder set: `config.yaml` + `layer_<i>.safetensors`. Reads a set (or one layer
file of it) and writes or extends one. The math of the layout is in docs/formats.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml
from torch import Tensor

from core.transcoder import Transcoder, TranscoderConfig
from storage.formats import base
from storage.formats.base import (
    BLOCK,
    CheckpointError,
    build,
    cpu,
    expect,
    first_line,
    folded_b_enc,
    known_layer,
    label,
    layer_from_filename,
    read_safetensors,
    refuse_extra,
    write_folder,
)

# circuit-tracer per-layer set: circuit_tracer/utils/hf_utils.py (config.yaml keys, layer_{i}.safetensors).
CT_CONFIG = "config.yaml"
CT_LAYER = "layer_{}.safetensors"
CT_THRESHOLD = "activation_function.threshold"
CT_EXTRA = "circuitflow"
"""config.yaml block circuit-tracer ignores: per-layer activation info it has no field for (top-k)."""

# Source: circuit-tracer circuit_tracer/transcoder/single_layer_transcoder.py (decoderesearch/circuit-tracer, formerly
# safety-research/circuit-tracer): SingleLayerTranscoder.encode = F.linear(x, W_enc, b_enc) with W_enc [d_transcoder,
# d_model], decode = acts @ W_dec + b_dec with W_dec [d_transcoder, d_model], b_dec [d_model] the OUTPUT bias (no input
# pre-bias), skip = x @ W_skip.T with W_skip [d_model, d_model]; to_safetensors writes W_enc, W_dec, b_enc, b_dec and
# optionally "activation_function.threshold" and W_skip; load_relu_transcoder picks JumpReLU when that threshold exists
# (activation_functions.py: x * (x > threshold), the same as ours) and ReLU otherwise. config.yaml (utils/hf_utils.py):
# model_name, model_kind: transcoder_set, feature_input_hook / feature_output_hook relative to blocks.{layer}
# (replacement_model: f"blocks.{layer}.{feature_input_hook}"), layer files layer_{i}.safetensors or a `transcoders` list.


def read_config(folder: Path, required: bool = True) -> dict[str, Any]:
    file = folder / CT_CONFIG
    if not file.is_file():
        if required:
            raise CheckpointError(f"{folder}: no {CT_CONFIG}; a circuit-tracer set needs one")
        return {}
    try:
        config = yaml.safe_load(file.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise CheckpointError(f"{file}: not readable YAML ({first_line(exc)})") from None
    kind = config.get("model_kind", "transcoder_set")
    if kind != "transcoder_set":
        raise CheckpointError(f"{file}: model_kind {kind!r} is not supported; only per-layer sets (transcoder_set) are")
    return config


def layer_files(folder: Path, config: Mapping[str, Any]) -> dict[int, Path]:
    if config.get("transcoders"):
        files = {}
        for i, name in enumerate(config["transcoders"]):
            if str(name).startswith("hf://"):
                raise CheckpointError(
                    f"{folder / CT_CONFIG}: layer {i} is {name}; download the set (hf://...) and point at the folder"
                )
            files[i] = Path(name) if Path(name).is_absolute() else folder / name
        return files
    files = {layer_from_filename(p): p for p in folder.glob("layer_*.safetensors")}
    files.pop(-1, None)
    if not files:
        raise CheckpointError(f"{folder}: {CT_CONFIG} but no layer_<i>.safetensors files")
    return dict(sorted(files.items()))


def load_set(folder: Path, layer: int | None) -> Transcoder:
    config = read_config(folder)
    files = layer_files(folder, config)
    if layer is None:
        if len(files) != 1:
            raise CheckpointError(
                f"{folder}: a circuit-tracer set with layers {sorted(files)}; pass layer= (or use load_transcoders)"
            )
        layer = next(iter(files))
    if layer not in files:
        raise CheckpointError(f"{folder}: no transcoder for layer {layer}; the set holds layers {sorted(files)}")
    return load_file(files[layer], config, layer)


def load_file(file: Path, config: Mapping[str, Any], layer: int) -> Transcoder:
    tensors = read_safetensors(file)
    d_sae = _expect_1d(file, tensors, "b_enc", "d_sae")
    d_model = _expect_1d(file, tensors, "b_dec", "d_model")
    ours = {
        "W_enc": expect(file, tensors, "W_enc", (d_sae, d_model), "d_sae, d_model").T,  # ours is [d_in, d_sae]
        "b_enc": tensors["b_enc"],
        "W_dec": _ct_decoder(file, tensors, d_sae, d_model),
        "b_dec_out": tensors["b_dec"],
    }
    threshold_key = next((k for k in (CT_THRESHOLD, "threshold") if k in tensors), None)
    if threshold_key is not None:
        ours["threshold"] = _ct_threshold(file, tensors[threshold_key], threshold_key, d_sae)
    if "W_skip" in tensors:
        ours["W_skip"] = expect(file, tensors, "W_skip", (d_model, d_model), "d_model, d_model").T
    refuse_extra(file, tensors, {"W_enc", "b_enc", "W_dec", "b_dec", "W_skip", threshold_key or CT_THRESHOLD})
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
    return build(cfg, ours, file)


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
    return expect(file, tensors, "W_dec", (d_sae, d_model), "d_sae, d_model")


def _ct_threshold(file: Path, threshold: Tensor, key: str, d_sae: int) -> Tensor:
    if threshold.dim() == 0:
        return threshold.expand(d_sae)
    return expect(file, {key: threshold}, key, (d_sae,), "d_sae")


def _ct_extra(config: Mapping[str, Any], layer: int) -> dict[str, Any]:
    layers = (config.get(CT_EXTRA) or {}).get("layers") or {}
    return dict(layers.get(layer) or layers.get(str(layer)) or {})


def _ct_hook(config: Mapping[str, Any], key: str, layer: int) -> str:
    suffix = config.get(key) or ""
    return f"blocks.{layer}.{suffix}" if suffix else ""


def _ct_suffix(tc: Transcoder, hook: str, layer: int, what: str) -> str:
    match = BLOCK.match(hook)
    if not match or int(match.group(1)) != layer:
        raise CheckpointError(
            f"transcoder {label(tc)}: {what} hook {hook!r} is not blocks.{layer}.*; circuit-tracer stores hooks relative to the layer"
        )
    return match.group(2)


def _ct_tensors(tc: Transcoder) -> dict[str, Tensor]:
    if tc.cfg.d_in != tc.cfg.d_out:
        raise CheckpointError(
            f"transcoder {label(tc)}: d_in {tc.cfg.d_in} != d_out {tc.cfg.d_out}; circuit-tracer needs both = d_model"
        )
    tensors = {
        "W_enc": cpu(tc.W_enc.T),  # [d_sae, d_model]
        "W_dec": cpu(tc.W_dec),  # [d_sae, d_model]
        "b_enc": cpu(folded_b_enc(tc)),  # [d_sae], input pre-bias folded in
        "b_dec": cpu(tc.b_dec_out),  # [d_model], output bias
    }
    if tc.threshold is not None:
        tensors[CT_THRESHOLD] = cpu(tc.threshold)  # [d_sae]
    if tc.W_skip is not None:
        tensors["W_skip"] = cpu(tc.W_skip.T)  # [d_out, d_in]
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


def save_set(tcs: Mapping[int, Transcoder], folder: Path) -> Path:
    topk = sorted(layer for layer, tc in tcs.items() if tc.cfg.activation == "topk")
    if topk:  # its loader applies ReLU (or JumpReLU) per feature: no file makes it compute a per-token top-k
        raise CheckpointError(
            f"layer {topk[0]}: a top-k transcoder cannot be written for circuit-tracer exactly (its loader reads only "
            "ReLU and JumpReLU); convert --to saelens (a TopKSAE, exact) or train with train.activation: batchtopk or jumprelu"
        )
    config = _ct_set_config(tcs)
    if (folder / CT_CONFIG).is_file():
        config = _merged_ct_config(read_config(folder), config)
    writers: dict[str, Callable[[Path], None]] = {}
    for layer, tc in tcs.items():
        tensors = _ct_tensors(tc)
        writers[CT_LAYER.format(layer)] = lambda p, t=tensors: base.save_tensors(t, p)
    writers[CT_CONFIG] = lambda p: p.write_text(yaml.safe_dump(config, sort_keys=False))
    write_folder(folder, writers)
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


def set_layer(tc: Transcoder) -> int:
    return known_layer(tc, "circuit-tracer files are per layer, so set cfg.layer")
