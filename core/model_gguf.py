"""GGUF (llama.cpp) weights to TransformerLens: dequantize every tensor, rename it to Hugging Face's Llama
names, undo llama.cpp's rotary row order, and convert with TransformerLens' own Llama converter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformer_lens import HookedTransformerConfig


def _llama_config(meta: dict[str, Any]) -> Any:
    """A transformers LlamaConfig from llama.cpp's `llama.*` metadata keys."""
    from transformers import LlamaConfig

    if meta.get("general.architecture") != "llama":
        raise ValueError(f"GGUF architecture {meta.get('general.architecture')!r} is not supported; expected llama")
    n_heads = int(meta["llama.attention.head_count"])
    d_model = int(meta["llama.embedding_length"])
    return LlamaConfig(
        vocab_size=len(meta["tokenizer.ggml.tokens"]),
        hidden_size=d_model,
        intermediate_size=int(meta["llama.feed_forward_length"]),
        num_hidden_layers=int(meta["llama.block_count"]),
        num_attention_heads=n_heads,
        num_key_value_heads=int(meta.get("llama.attention.head_count_kv", n_heads)),
        head_dim=int(meta.get("llama.rope.dimension_count", d_model // n_heads)),
        max_position_embeddings=int(meta["llama.context_length"]),
        rms_norm_eps=float(meta["llama.attention.layer_norm_rms_epsilon"]),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        hidden_act="silu",
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        architectures=["LlamaForCausalLM"],
    )


def _tl_state_dict(gguf_path: Path, meta: dict[str, Any], cfg: HookedTransformerConfig) -> dict[str, Tensor]:
    """Dequantize the GGUF into a Hugging Face Llama (weights only) and convert it with TL's converter."""
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights
    from transformers import LlamaForCausalLM

    config = _llama_config(meta)
    hf_weights = _hf_state_dict(gguf_path, config)
    hf_weights.setdefault("lm_head.weight", hf_weights["model.embed_tokens.weight"])  # tied embeddings
    with torch.device("meta"):
        hf_model = LlamaForCausalLM(config)
    hf_model.load_state_dict(hf_weights, strict=True, assign=True)
    return convert_llama_weights(hf_model, cfg)


GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
"""llama.cpp tensor names (per block after `blk.N.`) -> Hugging Face Llama names."""


def _hf_state_dict(gguf_path: Path, config: Any) -> dict[str, Tensor]:
    """Every GGUF tensor dequantized to float32 under its Hugging Face name, Q/K rows un-permuted."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    state_dict = {}
    for tensor in GGUFReader(gguf_path).tensors:
        block, local = _split_block(tensor.name)
        if local not in GGUF_TO_HF:
            raise ValueError(f"unexpected GGUF tensor {tensor.name!r}")
        weight = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if local == "attn_q.weight":
            weight = unpermute_rotary_rows(weight, config.num_attention_heads)
        elif local == "attn_k.weight":
            weight = unpermute_rotary_rows(weight, config.num_key_value_heads)
        prefix = "" if block is None else f"model.layers.{block}."
        state_dict[prefix + GGUF_TO_HF[local]] = torch.from_numpy(np.array(weight, copy=True))
    return state_dict


def _split_block(name: str) -> tuple[int | None, str]:
    """`blk.3.attn_q.weight` -> (3, "attn_q.weight"); a global tensor -> (None, name)."""
    if not name.startswith("blk."):
        return None, name
    _, block, local = name.split(".", 2)
    return int(block), local


def unpermute_rotary_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order: per head it interleaves the two rotary halves.

    Hugging Face rotates dimension i with i + d_head/2 (halves); GGUF stores rows so that the pair
    sits side by side (2i, 2i+1). Rows per head go from (d_head/2, 2) back to (2, d_head/2).
    """
    half = weight.shape[0] // n_heads // 2
    per_head = weight.reshape(n_heads, half, 2, *weight.shape[1:])  # (head, i, pair, d_model)
    return per_head.swapaxes(1, 2).reshape(weight.shape)  # (head, pair, i, d_model) -> rows
