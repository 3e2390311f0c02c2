"""SAEs spliced at the right place: an MLP-output SAE replaces `hook_mlp_out` with its reconstruction,
an MLP-input SAE replaces `ln2.hook_normalized` so the MLP runs on the reconstruction. Checked with
hand-built SAEs (identity, zero, scaling) against references computed by independent hooks."""

from __future__ import annotations

import pytest
import torch

from core.config import TrainConfig
from core.metrics import splice_eval
from core.model import load_model
from core.train import transcoder_config
from core.transcoder import Transcoder

LAYER = 1
HOOKS = {"sae_mlp_out": f"blocks.{LAYER}.hook_mlp_out", "sae_mlp_in": f"blocks.{LAYER}.ln2.hook_normalized"}


@pytest.fixture(scope="module", params=["tiny:ln", "tiny:rms"])
def model(request):
    return load_model(request.param, device="cpu")


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    rows = torch.randint(0, 256, (6, 20), generator=gen)  # [row, pos]
    rows[:, 0] = 256  # BOS
    return rows


def sae(model, kind: str, scale: float = 1.0) -> Transcoder:
    """A ReLU SAE of `kind` whose output is `scale * input` exactly: z = [relu(u), relu(-u)], out = scale (z+ - z-).

    Built through core.train.transcoder_config, i.e. with the hooks and widths training gives an SAE."""
    d = model.cfg.d_model
    cfg = transcoder_config(TrainConfig(kind=kind, expansion_factor=2), d, d, HOOKS["sae_mlp_in"],
                            HOOKS["sae_mlp_out"], LAYER)  # fmt: skip
    assert cfg.hook_in == cfg.hook_out == HOOKS[kind] and cfg.d_sae == 2 * d
    tc = Transcoder(cfg)
    eye = torch.eye(d)
    with torch.no_grad():
        tc.W_enc.copy_(torch.cat([eye, -eye], dim=1))  # [d, 2d]
        tc.W_dec.copy_(scale * torch.cat([eye, -eye], dim=0))  # [2d, d]
    return tc


def reference_ce(model, tokens: torch.Tensor, first_pos: int, mlp_out) -> float:
    """TransformerLens' own next-token loss with layer LAYER's MLP output replaced, at positions >=
    first_pos, by mlp_out(u, act): u is the MLP's input recorded at ln2.hook_normalized, act the real output."""
    seen: dict[str, torch.Tensor] = {}

    def record(act, hook):
        seen["u"] = act

    def replace(act, hook):
        new = act.clone()
        new[:, first_pos:] = mlp_out(seen["u"], act)[:, first_pos:]
        return new

    hooks = [(HOOKS["sae_mlp_in"], record), (HOOKS["sae_mlp_out"], replace)]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        per_token = model(tokens, return_type="loss", loss_per_token=True)  # [row, pos - 1]
    return float(per_token[:, first_pos:].double().mean())


KINDS = ["sae_mlp_out", "sae_mlp_in"]


@pytest.mark.parametrize("first_pos", [0, 1])
@pytest.mark.parametrize("kind", KINDS)
def test_identity_sae_reproduces_the_clean_loss(model, tokens, kind: str, first_pos: int) -> None:
    result = splice_eval(model, tokens, {LAYER: sae(model, kind)}, 4, first_pos)
    assert result.ce_spliced == pytest.approx(result.ce_clean, rel=1e-12, abs=0)
    assert abs(result.kl) < 1e-12
    assert result.ce_clean == pytest.approx(reference_ce(model, tokens, first_pos, lambda u, act: act), rel=1e-6)


@pytest.mark.parametrize("first_pos", [0, 1])
@pytest.mark.parametrize("kind", KINDS)
def test_zero_sae_reproduces_its_ablation(model, tokens, kind: str, first_pos: int) -> None:
    """A zero SAE is its own ablation: MLP output zeroed (mlp_out) or the MLP run on zeros (mlp_in)."""
    mlp = model.blocks[LAYER].mlp
    zero = {"sae_mlp_out": lambda u, act: torch.zeros_like(act), "sae_mlp_in": lambda u, act: mlp(torch.zeros_like(u))}
    result = splice_eval(model, tokens, {LAYER: sae(model, kind, scale=0.0)}, 4, first_pos)
    assert result.ce_spliced == result.ce_zero
    assert result.ce_zero == pytest.approx(reference_ce(model, tokens, first_pos, zero[kind]), abs=1e-6)
    assert result.ce_zero != pytest.approx(result.ce_clean, rel=1e-3)  # the ablation did something


@pytest.mark.parametrize("kind", KINDS)
def test_scaling_sae_is_spliced_at_its_own_hook(model, tokens, kind: str) -> None:
    """out = 3u: the MLP output tripled (mlp_out) differs from the MLP run on thrice its input (mlp_in).

    The splice matches its own reference to float32 rounding (~2e-8 nats seen) and misses the other
    kind's by over 1e-2 nats (seen), so the 1e-6 / 1e-3 tolerances tell the two hooks apart."""
    mlp = model.blocks[LAYER].mlp
    expected = {"sae_mlp_out": lambda u, act: 3.0 * act, "sae_mlp_in": lambda u, act: mlp(3.0 * u)}
    result = splice_eval(model, tokens, {LAYER: sae(model, kind, scale=3.0)}, 4, 1)
    assert result.ce_spliced == pytest.approx(reference_ce(model, tokens, 1, expected[kind]), abs=1e-6)
    other = expected[KINDS[1 - KINDS.index(kind)]]
    assert abs(result.ce_spliced - reference_ce(model, tokens, 1, other)) > 1e-3


def test_mlp_in_ablation_differs_from_mlp_out_ablation(tokens) -> None:
    """On tiny:ln (b_in != 0) the MLP of a zero input is not zero: the two SAE kinds have distinct
    baselines (3.3e-3 nats apart here, against ~2e-8 of rounding)."""
    model = load_model("tiny:ln", device="cpu")
    out = splice_eval(model, tokens, {LAYER: sae(model, "sae_mlp_out", 0.0)}, 4, 1)
    inp = splice_eval(model, tokens, {LAYER: sae(model, "sae_mlp_in", 0.0)}, 4, 1)
    assert out.ce_clean == inp.ce_clean
    assert abs(out.ce_zero - inp.ce_zero) > 1e-3
