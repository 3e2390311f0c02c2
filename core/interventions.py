"""Circuit experiments: run a model with its transcoders spliced in and intervene on features, heads, MLPs.

`Spliced(model, transcoders, tokens)` runs the prompt once (the clean run) and then `run(interventions,
frozen=...)`: set / scale / add to a feature's activation, zero-ablate a feature, a layer's features, a
head or an MLP, add a steering vector; attention patterns and norm scales recomputed (the real effect)
or frozen with the transcoder errors (the linearised effect the attribution graph predicts exactly).
The splice and the hooks are described in core.intervention_hooks. `generate` samples tokens with the
interventions applied at every step.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from core.intervention_hooks import (
    Clean,
    FeatureEdit,
    HeadAblation,
    Intervention,
    InterventionError,
    MlpAblation,
    Record,
    Shapes,
    Steering,
    ablate_feature,
    ablate_layer,
    build_hooks,
    check,
    from_spec,
    mlp_out_hook,
)
from core.transcoder import Transcoder

__all__ = [
    "FeatureChange",
    "FeatureEdit",
    "HeadAblation",
    "Intervention",
    "InterventionError",
    "InterventionResult",
    "MlpAblation",
    "Shapes",
    "Spliced",
    "Steering",
    "TokenChange",
    "ablate_feature",
    "ablate_layer",
    "check",
    "from_spec",
    "generate",
    "model_shapes",
]


class FeatureChange(NamedTuple):
    layer: int
    feature: int
    pos: int
    before: float
    """Clean activation."""
    after: float
    """Activation with the interventions (the value set, for a feature set directly)."""


class TokenChange(NamedTuple):
    token: int
    before: float
    """Clean probability."""
    after: float
    """Probability with the interventions."""


@dataclass(frozen=True)
class InterventionResult:
    """Logits and spliced features of one run, next to the clean run's."""

    logits: Float[Tensor, "pos vocab"] | None
    """None when the run stopped after `max_layer` (then logprob, kl and top_changes are unavailable)."""
    clean_logits: Float[Tensor, "pos vocab"] | None
    pre: dict[int, Float[Tensor, "pos d_sae"]]
    """Pre-activations of every spliced transcoder's features with the interventions."""
    acts: dict[int, Float[Tensor, "pos d_sae"]]
    """Activations with the interventions (edited features hold their edited values)."""
    clean_pre: dict[int, Float[Tensor, "pos d_sae"]]
    clean_acts: dict[int, Float[Tensor, "pos d_sae"]]
    frozen: bool

    def logprob(self, token: int, pos: int = -1, clean: bool = False) -> float:
        """log p(token) at `pos`, with the interventions (or in the clean run)."""
        logits = (self.clean_logits if clean else self.logits)[pos].double()
        return float(torch.log_softmax(logits, -1)[token])

    def kl(self, pos: int = -1) -> float:
        """KL(clean || intervened) of the next-token distributions at `pos`, in nats."""
        p = torch.log_softmax(self.clean_logits[pos].double(), -1)
        q = torch.log_softmax(self.logits[pos].double(), -1)
        return float((p.exp() * (p - q)).sum())

    def top_changes(self, k: int = 10, pos: int = -1) -> list[TokenChange]:
        """The k tokens whose probability at `pos` moved most (largest |after - before|), largest first."""
        before = torch.softmax(self.clean_logits[pos].double(), -1)
        after = torch.softmax(self.logits[pos].double(), -1)
        top = torch.topk((after - before).abs(), min(k, before.numel())).indices.tolist()
        return [TokenChange(t, float(before[t]), float(after[t])) for t in top]

    def feature_changes(self, limit: int | None = 100, min_change: float = 0.0) -> list[FeatureChange]:
        """Feature activations that moved by more than `min_change`, largest |change| first (at most `limit`)."""
        layers = sorted(self.acts)
        if not layers:
            return []
        deltas = torch.cat([(self.acts[layer] - self.clean_acts[layer]).abs().flatten() for layer in layers])
        moved = int((deltas > min_change).sum())
        top = torch.topk(deltas, min(moved, deltas.numel() if limit is None else limit)).indices.tolist()
        sizes = [self.acts[layer].numel() for layer in layers]
        out = []
        for flat in top:
            i = 0
            while flat >= sizes[i]:
                flat, i = flat - sizes[i], i + 1
            layer = layers[i]
            pos, feature = divmod(flat, self.acts[layer].shape[1])
            before, after = self.clean_acts[layer][pos, feature], self.acts[layer][pos, feature]
            out.append(FeatureChange(layer, feature, pos, float(before), float(after)))
        return out


def model_shapes(model: torch.nn.Module, transcoders: Mapping[int, Transcoder], n_pos: int) -> Shapes:
    """The sizes `check` needs, read from a loaded model."""
    d_sae = {layer: tc.cfg.d_sae for layer, tc in transcoders.items()}
    return Shapes(model.cfg.n_layers, model.cfg.n_heads, d_sae, n_pos)


def _placed(model: torch.nn.Module, transcoders: Mapping[int, Transcoder]) -> dict[int, Transcoder]:
    """The transcoders on the model's device and in its dtype (copies when they differ), hooks checked."""
    device, dtype = torch.device(model.cfg.device), model.cfg.dtype
    out = {}
    for layer, tc in sorted(transcoders.items()):
        hook_out = tc.cfg.hook_out or mlp_out_hook(layer)
        if hook_out != mlp_out_hook(layer) or not tc.cfg.hook_in:
            raise InterventionError(
                f"transcoder for layer {layer} maps {tc.cfg.hook_in or '?'} -> {hook_out}; interventions need one that "
                f"reads the MLP's input hook and replaces {mlp_out_hook(layer)}"
            )
        if tc.W_enc.device != device or tc.dtype != dtype:
            tc = copy.deepcopy(tc).to(device=device, dtype=dtype)
        out[layer] = tc
    return out


def _forward(
    model: torch.nn.Module, tokens: Tensor, transcoders: dict[int, Transcoder], ivs: Sequence[Intervention],
    clean: Clean | None, n_layers: int | None = None,
) -> tuple[Tensor | None, Record]:  # fmt: skip
    """Logits [batch pos vocab] of one hooked forward pass (None when it stops after `n_layers` layers)
    and the spliced features it recorded."""
    record: Record = {}
    full = n_layers is None or n_layers == model.cfg.n_layers
    hooks = build_hooks(transcoders, n_layers or model.cfg.n_layers, ivs, record, clean)
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        out = model(tokens, stop_at_layer=None if full else n_layers)
    return out if full else None, record


class Spliced:
    """A prompt's clean run with the transcoders spliced in, ready for interventions.

    `max_layer`: run only layers 0..max_layer (faster when only features up to there matter); results
    then have no logits and interventions above it are refused.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        transcoders: Mapping[int, Transcoder],
        tokens: Int[Tensor, " pos"],
        max_layer: int | None = None,
    ):
        self.model = model
        self.n_layers = model.cfg.n_layers if max_layer is None else max_layer + 1
        if not 0 < self.n_layers <= model.cfg.n_layers:
            raise InterventionError(f"max_layer {max_layer} is out of range; the model has 0..{model.cfg.n_layers - 1}")
        self.transcoders = _placed(model, {k: v for k, v in transcoders.items() if k < self.n_layers})
        self.tokens = tokens.reshape(-1).to(torch.long).to(model.cfg.device)
        self.clean = self._clean_run()
        logits, record = _forward(model, self.tokens[None], self.transcoders, [], None, self.n_layers)
        self.clean_logits = None if logits is None else logits[0]
        self.clean_pre = {layer: pre[0] for layer, (pre, _) in record.items()}
        self.clean_acts = {layer: z[0] for layer, (_, z) in record.items()}

    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def shapes(self) -> Shapes:
        return model_shapes(self.model, self.transcoders, self.n_pos)._replace(n_layers=self.n_layers)

    @torch.no_grad()
    def _clean_run(self) -> Clean:
        """Patterns, scales, MLP outputs and transcoder inputs of the unhooked model, and its features."""
        inputs = {tc.cfg.hook_in for tc in self.transcoders.values()}

        def wanted(name: str) -> bool:
            return name in inputs or name.endswith(("hook_pattern", "hook_scale", "hook_mlp_out"))

        stop = None if self.n_layers == self.model.cfg.n_layers else self.n_layers
        _, cache = self.model.run_with_cache(self.tokens[None], names_filter=wanted, stop_at_layer=stop)
        cache = {name: value.detach() for name, value in cache.items()}
        pre = {layer: tc.pre_acts(cache[tc.cfg.hook_in]) for layer, tc in self.transcoders.items()}
        z = {layer: self.transcoders[layer].activate(p) for layer, p in pre.items()}
        return Clean(cache, pre, z)

    def run(self, interventions: Sequence[Intervention] = (), frozen: bool = False) -> InterventionResult:
        """One run with `interventions` (checked: InterventionError); `frozen` holds patterns, norm
        scales, transcoder errors and the features' active sets at their clean values."""
        ivs = check(interventions, self.shapes)
        clean = self.clean if frozen else None
        logits, record = _forward(self.model, self.tokens[None], self.transcoders, ivs, clean, self.n_layers)
        return InterventionResult(
            logits=None if logits is None else logits[0],
            clean_logits=self.clean_logits,
            pre={layer: pre[0] for layer, (pre, _) in record.items()},
            acts={layer: z[0] for layer, (_, z) in record.items()},
            clean_pre=self.clean_pre,
            clean_acts=self.clean_acts,
            frozen=frozen,
        )


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    transcoders: Mapping[int, Transcoder],
    tokens: Int[Tensor, " pos"],
    interventions: Sequence[Intervention] = (),
    n_tokens: int = 20,
    temperature: float = 0.0,
    seed: int = 0,
) -> Int[Tensor, " pos"]:
    """The prompt followed by `n_tokens` generated with the interventions applied at every step.

    Greedy when `temperature` is 0, else sampled from softmax(logits / temperature) with a generator
    seeded by `seed`. Positions of the interventions refer to the prompt; one without a position applies
    to every token, the generated ones included. Attention is always recomputed (the real effect).
    """
    if n_tokens < 0 or temperature < 0:
        raise InterventionError(f"generate: n_tokens ({n_tokens}) and temperature ({temperature}) must be >= 0")
    placed = _placed(model, transcoders)
    seq = tokens.reshape(-1).to(torch.long).to(model.cfg.device)
    ivs = check(interventions, model_shapes(model, placed, int(seq.shape[0])))
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for _ in range(n_tokens):
        logits = _forward(model, seq[None], placed, ivs, None)[0][0, -1].double().cpu()  # type: ignore[index]
        if temperature == 0:
            nxt = int(torch.argmax(logits))
        else:
            nxt = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator))
        seq = torch.cat([seq, torch.tensor([nxt], device=seq.device)])
    return seq.cpu()
