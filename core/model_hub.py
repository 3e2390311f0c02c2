"""Models and tokenizers from the Hugging Face hub (TransformerLens names) and from local Hugging Face folders,
with one-line errors when the hub is unreachable or a folder cannot be read."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import PreTrainedTokenizerBase

from core.model_tl import PROCESSING, SPEC_FORMS, ModelSpecError, ModelUnavailableError, _build


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


def hf_tokenizer(spec: str, folder: Path | None = None) -> PreTrainedTokenizerBase:
    """What `AutoTokenizer` gives for a local `folder` (when given) or the hub name `spec`; BOS falls back to EOS."""
    from transformers import AutoTokenizer

    if folder is not None:
        with _folder_errors(folder):
            tokenizer = AutoTokenizer.from_pretrained(folder)
    else:
        with _hub_errors(spec):
            tokenizer = AutoTokenizer.from_pretrained(_pretrained_config(spec).tokenizer_name or spec)
    if tokenizer.bos_token is None:
        tokenizer.bos_token = tokenizer.eos_token
    return tokenizer


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
        tokenizer = hf_tokenizer(str(folder), folder)
    cfg.model_name = folder.name
    return _build(cfg, state_dict, tokenizer)
