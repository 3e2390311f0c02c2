"""Evaluation: the splice identities (a perfect transcoder gives the clean loss, a zero one gives
zero-ablation), CE and KL against independent computations, and the held-out pair metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from core.metrics import clean_log_probs, density_histogram, evaluate_pairs, splice_eval
from core.model import load_model
from core.transcoder import Transcoder, TranscoderConfig, TranscoderOutput
from tests.core.test_train import MemoryPairs

LAYERS = (0, 1)


@pytest.fixture(scope="module", params=["tiny:ln", "tiny:rms"])
def model(request):
    return load_model(request.param, device="cpu")


@pytest.fixture(scope="module")
def tokens(model) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 256, (6, 24), generator=gen)  # [row, pos]
    rows[:, 0] = 256  # BOS
    return rows


def hooks(layer: int) -> dict[str, str]:
    return {"hook_in": f"blocks.{layer}.ln2.hook_normalized", "hook_out": f"blocks.{layer}.hook_mlp_out"}


class TrueMlp(nn.Module):
    """A 'transcoder' whose output is forced to the real MLP's output on its input."""

    def __init__(self, model, layer: int) -> None:
        super().__init__()
        d = model.cfg.d_model
        self.cfg = TranscoderConfig(d_in=d, d_sae=1, d_out=d, layer=layer, **hooks(layer))
        self.mlp = model.blocks[layer].mlp

    def forward(self, u: torch.Tensor) -> TranscoderOutput:
        out = self.mlp(u)
        return TranscoderOutput(out, out[..., :1], out[..., :1])


def zero_transcoder(model, layer: int) -> Transcoder:
    d = model.cfg.d_model
    return Transcoder(TranscoderConfig(d_in=d, d_sae=4 * d, d_out=d, layer=layer, **hooks(layer)))  # all weights 0


def reference_ce(model, tokens: torch.Tensor, first_pos: int, zero_layers=()) -> float:
    """Next-token CE through TransformerLens' own loss, with the listed MLP outputs zeroed at pos >= first_pos."""

    def zero(act, hook):
        act = act.clone()
        act[:, first_pos:] = 0
        return act

    fwd = [(f"blocks.{layer}.hook_mlp_out", zero) for layer in zero_layers]
    with torch.no_grad(), model.hooks(fwd_hooks=fwd):
        per_token = model(tokens, return_type="loss", loss_per_token=True)  # [row, pos - 1]
    return float(per_token[:, first_pos:].double().mean())


@pytest.mark.parametrize("first_pos", [0, 1])
def test_perfect_transcoder_reproduces_the_clean_loss_exactly(model, tokens, first_pos: int) -> None:
    for layers in ((0,), LAYERS):  # one layer, then every layer at once
        result = splice_eval(model, tokens, {layer: TrueMlp(model, layer) for layer in layers}, 4, first_pos)
        assert result.ce_spliced == result.ce_clean
        assert result.kl == 0.0
        assert result.ce_recovered == 1.0
        assert result.ce_clean == pytest.approx(reference_ce(model, tokens, first_pos), rel=1e-6)
        assert result.n_tokens == tokens.shape[0] * (tokens.shape[1] - 1 - first_pos)


@pytest.mark.parametrize("first_pos", [0, 1])
def test_zero_transcoder_reproduces_zero_ablation(model, tokens, first_pos: int) -> None:
    for layers in ((1,), LAYERS):
        result = splice_eval(model, tokens, {layer: zero_transcoder(model, layer) for layer in layers}, 4, first_pos)
        assert result.ce_spliced == result.ce_zero
        assert result.ce_recovered == 0.0
        assert result.ce_zero == pytest.approx(reference_ce(model, tokens, first_pos, layers), rel=1e-6)
        assert result.ce_zero != pytest.approx(result.ce_clean, rel=1e-3)  # the ablation did something


def test_kl_and_recovered_match_an_independent_computation(model, tokens) -> None:
    tc = zero_transcoder(model, 0)
    with torch.no_grad():
        tc.b_dec_out.normal_(generator=torch.Generator().manual_seed(3))  # a constant, wrong output
    result = splice_eval(model, tokens, {0: tc}, 2, 1)

    def replace(act, hook):
        act = act.clone()
        act[:, 1:] = tc.b_dec_out
        return act

    with torch.no_grad():
        clean = torch.log_softmax(model(tokens)[:, 1:-1].double(), -1)
        with model.hooks(fwd_hooks=[("blocks.0.hook_mlp_out", replace)]):
            spliced = torch.log_softmax(model(tokens)[:, 1:-1].double(), -1)
    kl = torch.nn.functional.kl_div(spliced, clean, reduction="none", log_target=True).sum(-1).mean()
    assert result.kl == pytest.approx(float(kl), rel=1e-9)
    ce_spliced = reference_ce_from(spliced, tokens)
    assert result.ce_spliced == pytest.approx(ce_spliced, rel=1e-9)
    expected = (result.ce_zero - ce_spliced) / (result.ce_zero - result.ce_clean)
    assert result.ce_recovered == pytest.approx(expected, rel=1e-9)


def test_a_given_clean_reference_gives_the_same_result_as_computing_it(model, tokens) -> None:
    tc = zero_transcoder(model, 1)
    with torch.no_grad():
        tc.b_dec_out.normal_(generator=torch.Generator().manual_seed(4))
    clean = clean_log_probs(model, tokens, 4, 1)  # 6 rows: batches of 4 and 2
    assert [c.shape[0] for c in clean] == [4, 2]
    assert splice_eval(model, tokens, {1: tc}, 4, 1, clean) == splice_eval(model, tokens, {1: tc}, 4, 1)
    with pytest.raises(ValueError, match="2 clean batches for 6 rows of 2"):
        splice_eval(model, tokens, {1: tc}, 2, 1, clean)


def reference_ce_from(log_probs: torch.Tensor, tokens: torch.Tensor) -> float:
    return float(-log_probs.gather(-1, tokens[:, 2:, None]).mean())


def test_splice_feeds_the_transcoder_the_real_mlp_input(model, tokens) -> None:
    """The input hook is the MLP's input, so a transcoder sees exactly what the MLP sees."""
    seen = {}

    class Spy(TrueMlp):
        def forward(self, u):
            seen["u"] = u
            return super().forward(u)

    splice_eval(model, tokens[:1], {1: Spy(model, 1)}, 1, 0)
    _, cache = model.run_with_cache(tokens[:1], names_filter="blocks.1.ln2.hook_normalized")
    torch.testing.assert_close(seen["u"], cache["blocks.1.ln2.hook_normalized"], rtol=0, atol=0)


# ---------------------------------------------------------------- held-out pairs


def test_evaluate_pairs_against_numpy() -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 5, generator=gen), torch.randn(300, 3, generator=gen) * 2 + 1
    tc = Transcoder(TranscoderConfig(d_in=5, d_sae=6, d_out=3))
    with torch.no_grad():
        for p in (tc.W_enc, tc.W_dec, tc.b_enc, tc.b_dec_out):
            p.normal_(generator=gen)
        tc.b_enc[0] = -100.0  # never fires
        tc.b_enc[1] = 100.0  # always fires
    source = MemoryPairs(x, y)
    result = evaluate_pairs(tc, source, 100, 300, batch_size=64)

    xs, ys = x[100:].double().numpy(), y[100:].double().numpy()
    with torch.no_grad():
        out = tc(x[100:])
    z, pred = out.feature_acts.double().numpy(), out.out.double().numpy()
    assert result.n_tokens == 200
    assert result.fvu == pytest.approx(((pred - ys) ** 2).sum() / ((ys - ys.mean(0)) ** 2).sum(), rel=1e-9)
    assert result.mse == pytest.approx(((pred - ys) ** 2).mean(), rel=1e-9)
    assert result.l0 == pytest.approx((z != 0).sum(1).mean(), rel=1e-12)
    freq = (z != 0).mean(0)
    np.testing.assert_allclose(result.density.numpy(), freq, rtol=0, atol=1e-12)
    assert result.dead_fraction == pytest.approx((freq == 0).mean())
    assert result.dense_fraction == pytest.approx((freq > 0.1).mean())
    assert result.dead_fraction >= 1 / 6 and result.dense_fraction >= 1 / 6
    assert xs.shape == (200, 5)


def test_density_histogram_counts_every_feature_and_floors_dead_ones() -> None:
    density = torch.tensor([0.0, 1e-5, 1e-3, 0.5, 1.0], dtype=torch.float64)
    counts, edges = density_histogram(density)
    assert counts.sum() == 5
    assert counts[0] == 1  # log10(0 + 1e-10) = -10 falls in the first bin
    assert edges[0] == -10.0 and edges[-1] == 0.0
