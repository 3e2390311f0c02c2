"""The transcoder: a sparse, interpretable replacement of an MLP sublayer (docs/method.md section 1).

    z = act(W_enc^T (u - b_dec) + b_enc)        # [.., d_sae]
    y = W_dec^T z + b_dec_out (+ u @ W_skip)     # [.., d_out]

An SAE is the special case whose input and output hooks are the same activation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor, nn

Activation = Literal["relu", "topk", "jumprelu"]


@dataclass(frozen=True)
class TranscoderConfig:
    d_in: int
    """Width of the input activation (the MLP input)."""
    d_sae: int
    """Number of features."""
    d_out: int
    """Width of the output activation (the MLP output)."""
    activation: Activation = "relu"
    """Feature activation function."""
    k: int = 32
    """Active features per token (topk only)."""
    skip: bool = False
    """Add a linear skip connection u @ W_skip."""
    hook_in: str = ""
    """TransformerLens hook the input is read from, e.g. blocks.3.ln2.hook_normalized."""
    hook_out: str = ""
    """TransformerLens hook the output replaces, e.g. blocks.3.hook_mlp_out."""
    layer: int = -1
    """Layer of the MLP this replaces (-1 when unknown)."""
    model_name: str = ""
    """Model spec the transcoder was trained on."""

    def with_(self, **changes: object) -> TranscoderConfig:
        return replace(self, **changes)


class TranscoderOutput(NamedTuple):
    out: Float[Tensor, "... d_out"]
    """Reconstruction of the MLP output."""
    feature_acts: Float[Tensor, "... d_sae"]
    """Feature activations z."""
    pre_acts: Float[Tensor, "... d_sae"]
    """Pre-activations W_enc^T (u - b_dec) + b_enc."""


class Transcoder(nn.Module):
    """A transcoder in the SAELens transcoder weight layout plus an input pre-bias `b_dec`."""

    def __init__(self, cfg: TranscoderConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        super().__init__()
        self.cfg = cfg
        kw = {"dtype": dtype, "device": device}
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae, **kw))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, **kw))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_out, **kw))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, **kw))
        self.b_dec_out = nn.Parameter(torch.zeros(cfg.d_out, **kw))
        if cfg.activation == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(cfg.d_sae, **kw))
        else:
            self.threshold = None
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_out, **kw))
        else:
            self.W_skip = None

    # ------------------------------------------------------------------ math

    def pre_acts(self, u: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """W_enc^T (u - b_dec) + b_enc."""
        return (u - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        """Apply the activation function to pre-activations."""
        if self.cfg.activation == "relu":
            return torch.relu(pre)
        if self.cfg.activation == "topk":
            return topk_relu(pre, self.cfg.k)
        assert self.threshold is not None
        return pre * (pre > self.threshold)

    def encode(self, u: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Feature activations z of inputs u."""
        return self.activate(self.pre_acts(u))

    def decode(
        self, z: Float[Tensor, "... d_sae"], u: Float[Tensor, "... d_in"] | None = None
    ) -> Float[Tensor, "... d_out"]:
        """Reconstruct the output; `u` is needed only for a skip connection."""
        out = z @ self.W_dec + self.b_dec_out
        if self.W_skip is not None:
            if u is None:
                raise ValueError("decode: this transcoder has a skip connection; pass the input u as well")
            out = out + u @ self.W_skip
        return out

    def forward(self, u: Float[Tensor, "... d_in"]) -> TranscoderOutput:
        """Reconstruction, feature activations and pre-activations of inputs u."""
        pre = self.pre_acts(u)
        z = self.activate(pre)
        return TranscoderOutput(self.decode(z, u), z, pre)

    # ------------------------------------------------------------------ helpers

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit length."""
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    def parameter_dict(self) -> dict[str, Tensor]:
        """Named weights in the native layout (input pre-bias as `b_dec`)."""
        return {name: p.detach() for name, p in self.named_parameters()}


def topk_relu(pre: Float[Tensor, "... d_sae"], k: int) -> Float[Tensor, "... d_sae"]:
    """Keep the k largest pre-activations per token (ReLU on those), zero the rest."""
    k = min(k, pre.shape[-1])
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))


def init_transcoder(cfg: TranscoderConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> Transcoder:
    """Kaiming-uniform encoder and decoder, unit-norm decoder rows, zero biases (docs/method.md section 2)."""
    gen = torch.Generator().manual_seed(seed)
    tc = Transcoder(cfg, dtype=dtype)
    with torch.no_grad():
        bound_enc = (6 / cfg.d_in) ** 0.5  # kaiming-uniform with fan_in = d_in, gain sqrt(2)
        tc.W_enc.copy_(torch.rand(cfg.d_in, cfg.d_sae, generator=gen, dtype=dtype) * 2 * bound_enc - bound_enc)
        bound_dec = (6 / cfg.d_sae) ** 0.5
        tc.W_dec.copy_(torch.rand(cfg.d_sae, cfg.d_out, generator=gen, dtype=dtype) * 2 * bound_dec - bound_dec)
        tc.normalize_decoder()
    return tc
