"""What the stages that run the attribution share (trace, feature_inputs, and the intervene command): the
prompt as tokens, one-line checks of a root, the transcoders to trace with, the strongest feature at a token.
Its own module so that a stage reusing these does not take the trace stage's code into its key."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from core.config import Config
from core.errors import UserError
from core.transcoder import Transcoder

if TYPE_CHECKING:
    from core.attribution import PromptState


class TraceInputError(UserError, ValueError):
    """A root that cannot be traced (feature, layer, prompt or position), in one line."""


class Prompt(NamedTuple):
    text: str
    tokens: torch.Tensor
    """Token ids, BOS first."""
    texts: list[str]
    """Each token's text."""


def encode_prompt(cfg: Config, text: str) -> Prompt:
    """BOS + the prompt's tokens; refuses a prompt longer than the model's context."""
    from core.model import load_tokenizer, model_info

    tokenizer = load_tokenizer(cfg.model.name)
    ids = [tokenizer.bos_token_id] + list(tokenizer(text, add_special_tokens=False)["input_ids"])
    n_ctx = model_info(cfg.model.name).n_ctx
    if len(ids) > n_ctx:
        raise TraceInputError(
            f"--prompt is {len(ids)} tokens long (BOS included); the model's context is {n_ctx}: shorten it"
        )
    texts = [tokenizer.decode([i]) for i in ids]
    return Prompt(text, torch.tensor(ids, dtype=torch.long), texts)


def check_root(transcoders: dict[int, Transcoder], layer: int, feature: int | None, pos: int, n_tokens: int) -> None:
    """One-line errors for a root that cannot be traced, before the model is loaded (feature None:
    chosen at trace time, see `strongest_feature`)."""
    if layer not in transcoders:
        have = ", ".join(map(str, sorted(transcoders))) or "none"
        raise TraceInputError(f"--layer {layer}: no transcoder for this layer; layers with one: {have}")
    d_sae = transcoders[layer].cfg.d_sae
    if feature is not None and not 0 <= feature < d_sae:
        raise TraceInputError(
            f"--feature {feature}: out of range; layer {layer}'s transcoder has features 0..{d_sae - 1}"
        )
    check_pos(pos, n_tokens)


def check_pos(pos: int, n_tokens: int) -> None:
    """A one-line error for a root position outside the prompt."""
    if not -n_tokens <= pos < n_tokens:
        raise TraceInputError(
            f"--pos {pos}: out of range; the prompt has {n_tokens} tokens (0..{n_tokens - 1}, or -1 for the last)"
        )


def load_transcoders(cfg: Config, plan: dict[str, Any]) -> dict[int, Transcoder]:
    """Every configured layer's transcoder (train stage or `transcoders:`), on the CPU."""
    from tasks.transcoders import load_layer_transcoders

    transcoders = load_layer_transcoders(cfg, plan, torch.device("cpu"))
    for layer, tc in transcoders.items():
        if not tc.cfg.hook_in:
            tc.cfg = tc.cfg.with_(hook_in=cfg.activations.hook_in.format(layer=layer))
        if not tc.cfg.hook_out:
            tc.cfg = tc.cfg.with_(hook_out=cfg.activations.hook_out.format(layer=layer))
    return transcoders


def strongest_feature(state: PromptState, layer: int, pos: int) -> int:
    """The root feature when none is given: the feature of `layer`'s transcoder with the largest
    activation at token `pos` (the largest pre-activation when no feature fires there)."""
    t = pos % len(state.tokens)
    z = state.z[layer][t]  # [d_sae]
    scores = z if bool((z > 0).any()) else state.pre[layer][t]
    return int(torch.argmax(scores))
