"""Dataset-level attribution: the mean input-times-gradient a feature receives over many contexts.

For a transcoder feature (the root) and every context where it fires, the root's pre-activation
splits exactly (core.attribution.children) into what each upstream transcoder feature, attention
head (summed over its source tokens, BOS included), the embedding, each layer's transcoder error and
the bias terms contribute. Averaging these over the contexts gives, per source, the mean
attribution and mean |attribution|; `count` is the number of contexts where the source's
attribution is non-zero (for a feature: where it is active). The original research code's
`get_mean_ixg` is the feature part of this.

A context is a (token row, position): causal attention makes the row's prefix up to the position
the whole context, so one forward pass per row serves every position of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from core.attribution import PromptState, prepare
from core.transcoder import Transcoder

SourceGroup = tuple[str, int]
"""(source kind, source layer): kind is feature, head, embed, error or bias; embed and bias have layer -1."""


def context_inputs(
    state: PromptState, layer: int, feature: int, positions: Sequence[int]
) -> dict[SourceGroup, Float[Tensor, "ctx source"]]:
    """Per source group, the attribution of each source to feature `feature` of `layer`'s
    pre-activation at each of `positions` (batched over positions): [len(positions), sources]. The
    groups sum exactly to the pre-activation: `bias` holds the root's own constant and the b_O and
    b_dec_out terms (the pre-activation minus every other source)."""
    t = torch.as_tensor(list(positions), dtype=torch.long)
    tc = state.transcoders[layer]
    v = state.mlp_in[layer].pull(tc.W_enc[:, feature], t)  # [ctx d_model]
    at = state.mlp_read_site(layer)
    out: dict[SourceGroup, Tensor] = {}
    for lo in state.mlp_layers(at):
        if lo in state.transcoders:
            out[("feature", lo)] = state.z[lo][t] * (v @ state.transcoders[lo].W_dec.T)
        out[("error", lo)] = (state.error[lo, t] * v).sum(-1, keepdim=True)
    for la in state.attn_layers(at):
        reads = torch.einsum("hsd,cd->chs", state.head_out[la], v)  # [ctx head src]
        out[("head", la)] = (state.pattern[la][:, t].transpose(0, 1) * reads).sum(-1)  # [ctx head]
    out[("embed", -1)] = (state.resid[0, t] * v).sum(-1, keepdim=True)
    explained = sum(x.sum(-1) for x in out.values())
    out[("bias", -1)] = (state.pre[layer][t, feature] - explained)[:, None]  # own constant, b_O, b_dec_out terms
    return out


@dataclass
class InputStats:
    """Running sums of per-context attributions for one root feature."""

    contexts: int = 0
    sums: dict[SourceGroup, Tensor] = field(default_factory=dict)
    abs_sums: dict[SourceGroup, Tensor] = field(default_factory=dict)
    counts: dict[SourceGroup, Tensor] = field(default_factory=dict)

    def add(self, groups: Mapping[SourceGroup, Float[Tensor, "ctx source"]]) -> None:
        """Add the attributions of a batch of contexts (every group has the same ctx length)."""
        for key, x in groups.items():
            x64 = x.to(torch.float64)
            self.sums[key] = self.sums.get(key, 0) + x64.sum(0)
            self.abs_sums[key] = self.abs_sums.get(key, 0) + x64.abs().sum(0)
            self.counts[key] = self.counts.get(key, 0) + (x != 0).sum(0)
        self.contexts += int(next(iter(groups.values())).shape[0]) if groups else 0

    def rows(self) -> list[InputRow]:
        """One row per source that is non-zero in some context: kind, layer, index, mean and mean |.|
        over the contexts, count."""
        n = max(self.contexts, 1)
        out = []
        for (kind, src_layer), total in sorted(self.sums.items()):
            means, abs_means, counts = total / n, self.abs_sums[(kind, src_layer)] / n, self.counts[(kind, src_layer)]
            for i in torch.nonzero(counts).flatten().tolist():
                index = -1 if kind in ("embed", "error", "bias") else i
                out.append(InputRow(kind, src_layer, index, float(means[i]), float(abs_means[i]), int(counts[i])))
        return out


class InputRow(NamedTuple):
    source_kind: str
    source_layer: int
    source_index: int
    """Feature index, head index, or -1 (embedding, error)."""
    mean: float
    mean_abs: float
    count: int


Context = tuple[int, int]
"""(token row, position)."""


def dataset_inputs(
    model: torch.nn.Module,
    transcoders: Mapping[int, Transcoder],
    rows: Int[Tensor, "row ctx"],
    contexts: Mapping[tuple[int, int], Iterable[Context]],
    dtype: torch.dtype | None = None,
) -> dict[tuple[int, int], InputStats]:
    """Mean inputs of every root (layer, feature) over its contexts: one forward pass per token row
    that holds a context of any root, cut after the row's last such position."""
    by_row: dict[int, dict[tuple[int, int], list[int]]] = {}
    for root, ctxs in contexts.items():
        for row, pos in ctxs:
            by_row.setdefault(int(row), {}).setdefault(root, []).append(int(pos))
    stats = {root: InputStats() for root in contexts}
    max_layer = max((layer for layer, _ in contexts), default=0)
    for row in sorted(by_row):
        wanted = by_row[row]
        last = max(p for ps in wanted.values() for p in ps)
        state = prepare(model, transcoders, rows[row, : last + 1], max_layer=max_layer, dtype=dtype)
        for (layer, feature), positions in wanted.items():
            stats[(layer, feature)].add(context_inputs(state, layer, feature, positions))
    return stats
