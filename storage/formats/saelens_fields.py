"""Which SAELens cfg.json fields circuitflow reads, which it may ignore, and the one it folds into the weights
(`rescale_acts_by_decoder_norm`); every other field is refused by name, so no setting that changes the
computation is silently dropped."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from storage.formats.base import CheckpointError

READ = {
    "architecture", "d_in", "d_sae", "d_out", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
    "reshape_activations", "metadata", "k", "rescale_acts_by_decoder_norm", "activation_fn_kwargs",
    "activation_fn_str", "model_name", "hook_name", "hook_name_out", "hook_layer", "hook_point", "hook_head_index",
    "hook_head_index_out", "hook_point_layer", "hook_point_head_index",
}  # fmt: skip
"""Fields load_folder reads or checks (v6 and the flat pre-6 layout)."""
INERT = {
    "use_sparse_activations", "context_size", "dataset_path", "dataset_trust_remote_code", "prepend_bos",
    "sae_lens_version", "sae_lens_training_version", "neuronpedia_id", "model_from_pretrained_kwargs",
    "seqpos_slice", "exclude_special_tokens", "model_class_name", "jumprelu_init_threshold", "jumprelu_bandwidth",
    "finetuning_scaling_factor",
}  # fmt: skip
"""Fields that describe training or provenance and do not change what the dictionary computes
(`finetuning_scaling_factor` is checked below: only false/absent is inert)."""
ACTIVATIONS = {"relu": "relu", "topk": "topk", "jumprelu": "jumprelu"}


def check_fields(cfg_file: Path, cfg: Mapping[str, Any], arch: str) -> None:
    """Refuse every field that is neither read nor inert, and inert-looking fields set to a value that matters."""
    unknown = sorted(set(cfg) - READ - INERT)
    if unknown:
        raise CheckpointError(
            f"{cfg_file}: unknown field {unknown[0]!r}{' (and more)' if len(unknown) > 1 else ''}; circuitflow does "
            "not know what it changes, so it refuses the file (remove the field if it is inert)"
        )
    if cfg.get("finetuning_scaling_factor"):
        raise CheckpointError(f"{cfg_file}: finetuning_scaling_factor is set; fold the scaling into W_dec first")
    fn = cfg.get("activation_fn_str")
    wanted = "topk" if arch.startswith("topk") else "jumprelu" if arch.startswith("jumprelu") else "relu"
    if fn is not None and ACTIVATIONS.get(fn) != wanted:
        raise CheckpointError(f"{cfg_file}: activation_fn_str {fn!r} does not match architecture {arch!r}")
    if cfg.get("rescale_acts_by_decoder_norm") and not arch.startswith("topk"):
        raise CheckpointError(
            f"{cfg_file}: rescale_acts_by_decoder_norm is only defined for top-k architectures, not {arch!r}"
        )


def fold_decoder_norm(cfg_file: Path, ours: dict[str, Tensor]) -> dict[str, Tensor]:
    """SAELens' rescale_acts_by_decoder_norm (top-k): pre-activations times each decoder row's norm n, top-k, then
    activations / n before the decoder. Scaling W_enc's columns and b_enc by n and W_dec's rows by 1/n computes the
    same features and outputs with a plain top-k."""
    norm = ours["W_dec"].norm(dim=-1)
    if not bool((norm > 0).all()):
        raise CheckpointError(
            f"{cfg_file}: rescale_acts_by_decoder_norm with {int((norm == 0).sum())} zero decoder rows; "
            "SAELens divides by those norms, so the file computes NaN"
        )
    folded = dict(ours)
    folded["W_enc"] = ours["W_enc"] * norm
    folded["b_enc"] = ours["b_enc"] * norm
    folded["W_dec"] = ours["W_dec"] / norm[:, None]
    return folded
