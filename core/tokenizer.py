"""Tokenizers built in process, with no hub: a byte-level one for the tiny test models and a BPE
one rebuilt from a GGUF file's metadata (the bundled SmolLM2). Both are `PreTrainedTokenizerFast`,
so corpus packing and `HookedTransformer.to_tokens` treat them like any Hugging Face tokenizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

BYTE_BOS = "<|bos|>"
"""The one special token of the byte-level tokenizer (id 256, after the 256 byte tokens)."""

GGUF_CONTROL = 3
"""`tokenizer.ggml.token_type` value of a control (special) token in llama.cpp's vocabularies."""

# A vocabulary's pre-tokenizer, by llama.cpp's `tokenizer.ggml.pre` name. "smollm" (SmolLM/SmolLM2,
# StarCoder's vocabulary) isolates every digit, then applies GPT-2's byte-level split.
SPLIT_DIGITS_PRE = frozenset({"smollm", "starcoder", "refact"})
PLAIN_BYTE_LEVEL_PRE = frozenset({"gpt2"})


@cache
def byte_alphabet() -> tuple[str, ...]:
    """GPT-2's printable spelling of each byte value: `byte_alphabet()[b]` is the character for byte b.

    Printable Latin-1 bytes spell themselves; the rest (controls, space, ...) are moved to code
    points from 256 upward, in byte order, so that every byte is one visible character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    keep = set(printable)
    spelled: list[str] = []
    shifted = 0
    for byte in range(256):
        if byte in keep:
            spelled.append(chr(byte))
        else:
            spelled.append(chr(256 + shifted))
            shifted += 1
    return tuple(spelled)


def _wrap(
    backend: Tokenizer, *, name: str, bos: str | None, eos: str | None, unk: str | None, pad: str | None
) -> PreTrainedTokenizerFast:
    """A transformers tokenizer around `backend` that does not add BOS by itself."""
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        name_or_path=name,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad if pad is not None else eos,
        add_bos_token=False,
    )


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """Token id = byte value (0-255) of the UTF-8 text, plus BOS = 256: vocabulary size 257.

    Used by the `tiny:` models; decoding round-trips any text.
    """
    alphabet = byte_alphabet()
    vocab = {char: byte for byte, char in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(BYTE_BOS, special=True, normalized=False)])
    return _wrap(backend, name="byte-level", bos=BYTE_BOS, eos=BYTE_BOS, unk=None, pad=BYTE_BOS)


def _gguf_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The byte-level pre-tokenizer of llama.cpp's pre-tokenizer type `pre`."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in SPLIT_DIGITS_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in PLAIN_BYTE_LEVEL_PRE:
        return byte_level
    raise ValueError(
        f"GGUF pre-tokenizer {pre!r} is not supported; supported: {sorted(SPLIT_DIGITS_PRE | PLAIN_BYTE_LEVEL_PRE)}"
    )


def _gguf_bpe(tokens: list[str], merges: list[str]) -> Tokenizer:
    """A byte-level BPE model from GGUF's token list (index = id) and "left right" merge strings."""
    vocab = {token: index for index, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    return Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))


def gguf_tokenizer(metadata: Mapping[str, Any]) -> PreTrainedTokenizerFast:
    """Rebuild the tokenizer a GGUF file describes (only llama.cpp's byte-level "gpt2" model).

    `metadata` maps GGUF keys to plain values (`tokenizer.ggml.tokens`, `.merges`, `.token_type`,
    `.pre`, `.bos_token_id`, `.eos_token_id`, optional `.unknown_token_id` / `.padding_token_id`).
    Tokens typed as control become special tokens, so they stay whole in text and are skipped when
    decoding with `skip_special_tokens`. BOS is not added automatically (as llama.cpp's
    `add_bos_token=False`); see `with_bos` for a copy that prepends it.
    """
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported; expected 'gpt2' (byte-level BPE)")
    tokens = list(metadata["tokenizer.ggml.tokens"])
    backend = _gguf_bpe(tokens, list(metadata["tokenizer.ggml.merges"]))
    backend.pre_tokenizer = _gguf_pre_tokenizer(metadata.get("tokenizer.ggml.pre", "(none)"))
    backend.decoder = decoders.ByteLevel()
    types = metadata.get("tokenizer.ggml.token_type") or []
    control = [token for token, token_type in zip(tokens, types, strict=False) if token_type == GGUF_CONTROL]
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in control])

    def named(key: str) -> str | None:
        index = metadata.get(f"tokenizer.ggml.{key}")
        return None if index is None else tokens[int(index)]

    return _wrap(
        backend,
        name=f"gguf:{metadata.get('general.basename', 'model')}",
        bos=named("bos_token_id"),
        eos=named("eos_token_id"),
        unk=named("unknown_token_id"),
        pad=named("padding_token_id"),
    )


def with_bos(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """A copy of `tokenizer` whose `encode` / `__call__` prepend BOS (what HookedTransformer expects).

    TransformerLens re-downloads a tokenizer by name to turn BOS on; ours have no name on the hub,
    so the copy is made here and handed to the model instead.
    """
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer,
        name_or_path=tokenizer.name_or_path,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        unk_token=tokenizer.unk_token,
        pad_token=tokenizer.pad_token,
        add_bos_token=True,
    )


__all__ = ["BYTE_BOS", "byte_alphabet", "byte_level_tokenizer", "gguf_tokenizer", "with_bos"]
