"""The data sections: which model runs, on which text, tokenised how, and which activations are cached."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from core.config_base import ConfigError, _Section


@dataclass(frozen=True)
class ModelConfig(_Section):
    name: str = "bundled:smollm2-135m"
    """Model spec: a TransformerLens name (hub), a local Hugging Face folder, `bundled:smollm2-135m`,
    or `tiny:<preset>` for tests."""
    device: str = "auto"
    """`auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`. Not part of any content key."""
    dtype: Literal["float32", "float16", "bfloat16", "float64"] = "float32"
    """Dtype the model runs in."""


@dataclass(frozen=True)
class CorpusConfig(_Section):
    source: str = "bundled:docstrings"
    """A folder of .txt files, a .jsonl/.parquet file with a text column, an HF dataset id
    (`hf:owner/name`, needs network) or `bundled:docstrings`."""
    text_column: str = "text"
    """Column holding the text in JSONL/Parquet/HF sources."""
    min_chars: int = 200
    """Documents shorter than this many characters are skipped."""
    max_docs: int | None = 4000
    """Read at most this many documents (after the length filter, before the train/held-out split); None for all."""
    split: str = "train"
    """Split of an HF dataset."""


@dataclass(frozen=True)
class TokensConfig(_Section):
    context_size: int = 128
    """Tokens per packed row, BOS included."""
    train_rows: int = 2048
    """Rows of training tokens."""
    mine_rows: int = 512
    """Rows of held-out tokens for feature mining."""
    holdout_fraction: float = 0.1
    """Fraction of documents held out from training for mining (when mining uses the same corpus)."""
    seed: int = 0
    """Seed for the document shuffle."""


@dataclass(frozen=True)
class ActivationsConfig(_Section):
    layers: tuple[int, ...] = (0, 1, 2, 3)
    """Layers whose MLP (input, output) pairs are cached and get a transcoder."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Storage dtype of cached activations."""
    drop_bos: bool = True
    """Drop BOS positions (outliers that dominate training)."""
    batch_rows: int = 8
    """Token rows per forward pass. Not part of the content key."""
    shard_tokens: int = 65536
    """Maximum tokens per shard file (a shard always holds whole token rows, at least one)."""
    hook_in: str = "blocks.{layer}.ln2.hook_normalized"
    """Hook of the transcoder input, `{layer}` replaced by the layer (default: the MLP's input)."""
    hook_out: str = "blocks.{layer}.hook_mlp_out"
    """Hook of the transcoder target, `{layer}` replaced by the layer (default: the MLP's output)."""

    def __post_init__(self) -> None:
        for name in ("hook_in", "hook_out"):
            template = getattr(self, name)
            rest = template.replace("{layer}", "")
            if "{layer}" not in template or "{" in rest or "}" in rest:
                raise ConfigError(
                    f"activations.{name}: {template!r} must name the layer as {{layer}} and nothing else in braces, "
                    f"e.g. 'blocks.{{layer}}.hook_mlp_out'"
                )
