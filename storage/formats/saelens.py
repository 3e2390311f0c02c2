"""The SAELens v6 transcoder folder, which is also circuitflow's native layout: `cfg.json` + `sae_weights.safetensors`
(+ `sparsity.safetensors`). Reads every SAELens transcoder/SAE architecture listed below; writes the v6 layout.
The math of the layout is in docs/formats.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.transcoder import Transcoder, TranscoderConfig
from storage.formats import base
from storage.formats.base import (
    CheckpointError,
    build,
    cpu,
    expect,
    expect_encoder_decoder,
    folded_b_enc,
    label,
    layer_of,
    read_json,
    read_safetensors,
    refuse_extra,
    save_tensors,
)
from storage.formats.saelens_fields import check_fields, fold_decoder_norm
from storage.layout import atomic_file

# SAELens file names: sae_lens/constants.py (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME).
SAE_CFG = "cfg.json"
SAE_WEIGHTS = "sae_weights.safetensors"
SAE_SPARSITY = "sparsity.safetensors"
# SAELens only treats a cfg.json as v6 (metadata nested under "metadata") when metadata.sae_lens_version >= 6.0.0;
# older ones go through handle_pre_6_0_config (sae_lens/loading/pretrained_sae_loaders.py), which drops it.
SAELENS_LAYOUT_VERSION = "6.0.0"

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
    if cfg.activation == "topk" and not cfg.skip and cfg.d_in == cfg.d_out:
        return "topk"  # SAELens' TopKSAE: with apply_b_dec_to_input false it computes this transcoder exactly
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
            "hook_layer": layer_of(cfg.layer, cfg.hook_in, cfg.hook_out),
            "sae_lens_version": SAELENS_LAYOUT_VERSION,
            "sae_lens_training_version": SAELENS_LAYOUT_VERSION,
        },
    }
    out["k"] = cfg.k  # TopKSAEConfig.k (sae_lens/saes/topk_sae.py); other architectures ignore it
    if cfg.activation == "topk":
        out["rescale_acts_by_decoder_norm"] = False
    return out


def _saelens_tensors(tc: Transcoder) -> dict[str, Tensor]:
    tensors = {
        "W_enc": cpu(tc.W_enc),  # [d_in, d_sae]
        "b_enc": cpu(folded_b_enc(tc)),  # [d_sae], input pre-bias folded in
        "W_dec": cpu(tc.W_dec),  # [d_sae, d_out]
        "b_dec": cpu(tc.b_dec_out),  # [d_out], SAELens' b_dec is the output bias
    }
    if tc.threshold is not None:
        negative = int((tc.threshold < 0).sum())
        if negative:
            raise CheckpointError(
                f"transcoder {label(tc)}: {negative} JumpReLU thresholds are negative; SAELens applies ReLU before the "
                "threshold, so a native/SAELens file cannot reproduce them: save as circuit-tracer, or clamp them to 0"
            )
        tensors["threshold"] = cpu(tc.threshold)  # [d_sae]
    if tc.W_skip is not None:
        tensors["W_skip"] = cpu(tc.W_skip.T)  # [d_out, d_in]
    return tensors


def writers(tc: Transcoder) -> dict[str, Callable[[Path], None]]:
    tensors, cfg = _saelens_tensors(tc), _saelens_cfg(tc)
    return {
        SAE_WEIGHTS: lambda p: base.save_tensors(tensors, p),
        SAE_CFG: lambda p: p.write_text(json.dumps(cfg, indent=2)),  # last: a cfg.json names complete weights
    }


def load_folder(folder: Path) -> Transcoder:
    cfg_file = folder / SAE_CFG
    cfg = read_json(cfg_file)
    arch = cfg.get("architecture", "standard")
    if arch not in _SAELENS_ARCH:
        raise CheckpointError(
            f"{cfg_file}: architecture {arch!r} is not supported; expected one of {sorted(_SAELENS_ARCH)}"
        )
    _check_saelens_options(cfg_file, cfg)
    check_fields(cfg_file, cfg, arch)
    activation, skip, is_transcoder = _SAELENS_ARCH[arch]
    d_in, d_sae = _cfg_int(cfg_file, cfg, "d_in"), _cfg_int(cfg_file, cfg, "d_sae")
    d_out = int(cfg.get("d_out") or d_in)
    file = folder / SAE_WEIGHTS
    tensors = _drop_unit_scaling(file, read_safetensors(file))
    ours = _saelens_to_ours(file, tensors, activation, skip, (d_in, d_sae, d_out))
    if cfg.get("rescale_acts_by_decoder_norm"):
        ours = fold_decoder_norm(cfg_file, ours)
    if not is_transcoder and cfg.get("apply_b_dec_to_input", True):
        ours["b_dec"] = ours["b_dec_out"]  # a plain SAE's b_dec is both the pre-bias and the output bias
    meta = _saelens_metadata(cfg)
    hook_in = meta.get("hook_name") or ""
    hook_out = meta.get("hook_name_out") or (hook_in if not is_transcoder else "")
    k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k", 32))
    if isinstance(k, bool) or not isinstance(k, int):
        raise CheckpointError(f"{cfg_file}: k is {k!r}, expected an integer")
    layer = layer_of(meta.get("hook_layer"), hook_in, hook_out)
    tc_cfg = TranscoderConfig(
        d_in, d_sae, d_out, activation, k, skip, hook_in, hook_out, layer, meta.get("model_name") or ""
    )
    return build(tc_cfg, ours, cfg_file)


def _saelens_to_ours(
    file: Path, tensors: Mapping[str, Tensor], activation: str, skip: bool, dims: tuple[int, int, int]
) -> dict[str, Tensor]:
    d_in, d_sae, d_out = dims
    ours = {
        **expect_encoder_decoder(file, tensors, dims),
        "b_dec_out": expect(file, tensors, "b_dec", (d_out,), "d_out"),
    }
    allowed = {"W_enc", "b_enc", "W_dec", "b_dec"}
    if activation == "jumprelu":
        # relu(pre) * (pre > t) == pre * (pre > max(t, 0)): clamping makes our JumpReLU match SAELens' exactly
        ours["threshold"] = expect(file, tensors, "threshold", (d_sae,), "d_sae").clamp_min(0)
        allowed.add("threshold")
    if skip:
        ours["W_skip"] = expect(file, tensors, "W_skip", (d_out, d_in), "d_out, d_in").T  # ours is [d_in, d_out]
        allowed.add("W_skip")
    refuse_extra(file, tensors, allowed)
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


def load_sparsity(folder: Path) -> Tensor:
    file = folder / SAE_SPARSITY
    if not file.is_file():
        raise CheckpointError(f"{folder}: no {SAE_SPARSITY}; this folder stores no feature sparsity")
    tensors = read_safetensors(file)
    if "sparsity" not in tensors or tensors["sparsity"].dim() != 1:
        raise CheckpointError(f"{file}: expected a 1-d tensor 'sparsity' (log10 feature frequencies)")
    return tensors["sparsity"].float()


def save_sparsity(folder: Path, log_density: Tensor) -> Path:
    """Write `sparsity.safetensors` (log10 firing frequency per feature) into a transcoder folder, atomically and
    with the usual file permissions."""
    file = Path(folder) / SAE_SPARSITY
    with atomic_file(file) as tmp:
        save_tensors({"sparsity": cpu(log_density.float())}, tmp)
    return file


def _cfg_int(file: Path, cfg: Mapping[str, Any], key: str) -> int:
    if not isinstance(cfg.get(key), int):
        raise CheckpointError(f"{file}: missing integer {key!r}; a SAELens cfg.json states d_in and d_sae")
    return int(cfg[key])
