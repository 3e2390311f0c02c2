"""Transcoder training: activation functions by hand, the decoder constraint, dead-feature revival,
schedules, bias init, divergence, and resume == uninterrupted (bitwise on CPU)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from core.batches import PairBatches
from core.config import TrainConfig
from core.train import (
    TrainingDivergedError,
    compute_loss,
    fit,
    geometric_median,
    jumprelu_ste,
    lr_factor,
    new_state,
    new_transcoder,
    remove_parallel_grad,
    restore_state,
    select_pair,
    state_meta,
    state_tensors,
    step_ste,
    train_step,
    transcoder_config,
)
from core.transcoder import Transcoder, TranscoderConfig

D_IN, D_OUT = 8, 6


class MemoryPairs(PairBatches):
    """An in-memory pair source with the PairSource protocol (small shuffle blocks and windows)."""

    block_tokens = 32

    def __init__(self, x: torch.Tensor, y: torch.Tensor, window_tokens: int = 128) -> None:
        self.x, self.y = x, y
        self.n_tokens, self.d_in, self.d_out = x.shape[0], x.shape[1], y.shape[1]
        self.buffer_bytes = window_tokens * 4 * (self.d_in + self.d_out)

    def read(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[start:stop].clone(), self.y[start:stop].clone()


def sparse_pairs(n: int = 2048, n_latent: int = 16, seed: int = 0) -> MemoryPairs:
    """y is a sparse non-negative code of x mapped through a fixed dictionary: a transcoder can learn it."""
    gen = torch.Generator().manual_seed(seed)
    enc = torch.randn(D_IN, n_latent, generator=gen)
    dec = torch.randn(n_latent, D_OUT, generator=gen)
    x = torch.randn(n, D_IN, generator=gen) + 0.5  # [n, d_in]
    codes = torch.relu(x @ enc - 2.0)  # [n, n_latent], sparse
    return MemoryPairs(x, codes @ dec + 0.1)


def config(**changes: object) -> TrainConfig:
    base = TrainConfig(expansion_factor=4, batch_size=64, epochs=2, lr=3e-3, l1_coefficient=1e-3, warmup_steps=5,
                       init_tokens=512, resample_tokens=512, dead_window=20, resample_every=25)  # fmt: skip
    return dataclasses.replace(base, **changes)


def fresh(cfg: TrainConfig, source: MemoryPairs) -> Transcoder:
    return new_transcoder(cfg, transcoder_config(cfg, source.d_in, source.d_out, "in", "out"))


def hand_transcoder(activation: str, k: int = 2) -> Transcoder:
    """Identity encoder (pre = u + b_enc) and identity decoder, so outputs are checkable by hand."""
    tc = Transcoder(TranscoderConfig(d_in=4, d_sae=4, d_out=4, activation=activation, k=k))
    with torch.no_grad():
        tc.W_enc.copy_(torch.eye(4))
        tc.W_dec.copy_(torch.eye(4))
        tc.b_enc.copy_(torch.tensor([0.0, 0.0, 0.5, -1.0]))
        tc.b_dec_out.fill_(0.25)
        if tc.threshold is not None:
            tc.threshold.copy_(torch.tensor([0.5, 0.5, 1.0, 0.1]))
    return tc


# ---------------------------------------------------------------- activation functions


U = torch.tensor([[0.3, -0.2, 1.0, 1.5]])  # pre = [0.3, -0.2, 1.5, 0.5]


@pytest.mark.parametrize(
    ("activation", "expected"),
    [
        ("relu", [0.3, 0.0, 1.5, 0.5]),
        ("topk", [0.0, 0.0, 1.5, 0.5]),  # k = 2 largest: 1.5 and 0.5
        ("jumprelu", [0.0, 0.0, 1.5, 0.5]),  # thresholds 0.5, 0.5, 1.0, 0.1: 0.3 < 0.5 is cut
    ],
)
def test_activation_functions_by_hand(activation: str, expected: list[float]) -> None:
    tc = hand_transcoder(activation)
    out = tc(U)
    torch.testing.assert_close(out.pre_acts, torch.tensor([[0.3, -0.2, 1.5, 0.5]]), rtol=0, atol=1e-7)
    torch.testing.assert_close(out.feature_acts, torch.tensor([expected]), rtol=0, atol=1e-7)
    torch.testing.assert_close(out.out, torch.tensor([expected]) + 0.25, rtol=0, atol=1e-7)


def test_topk_never_keeps_negative_values() -> None:
    tc = hand_transcoder("topk", k=3)
    z = tc.encode(torch.tensor([[-1.0, -2.0, -0.4, 2.0]]))  # pre = [-1, -2, 0.1, 1]
    torch.testing.assert_close(z, torch.tensor([[0.0, 0.0, 0.1, 1.0]]), rtol=0, atol=1e-7)


def test_skip_connection_adds_linear_path() -> None:
    tc = Transcoder(TranscoderConfig(d_in=2, d_sae=2, d_out=2, skip=True))
    with torch.no_grad():
        tc.W_skip.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    torch.testing.assert_close(tc(torch.tensor([[1.0, 1.0]])).out, torch.tensor([[4.0, 6.0]]))


def test_jumprelu_straight_through_gradients_by_hand() -> None:
    # bandwidth 0.01: the window is |pre - threshold| < 0.005.
    pre = torch.tensor([[0.502, 0.7, 0.497]], requires_grad=True)
    threshold = torch.tensor([0.5, 0.5, 0.5], requires_grad=True)
    z = jumprelu_ste(pre, threshold, 0.01)
    torch.testing.assert_close(z.detach(), torch.tensor([[0.502, 0.7, 0.0]]))
    z.sum().backward()
    torch.testing.assert_close(pre.grad, torch.tensor([[1.0, 1.0, 0.0]]))
    # d/dtheta = -theta / bandwidth inside the window: -0.5 / 0.01 = -50.
    torch.testing.assert_close(threshold.grad, torch.tensor([-50.0, 0.0, -50.0]))

    threshold.grad = None
    step_ste(pre, threshold, 0.01).sum().backward()
    torch.testing.assert_close(threshold.grad, torch.tensor([-100.0, 0.0, -100.0]))  # -1 / bandwidth


def test_jumprelu_threshold_learns_under_l0_penalty() -> None:
    source = sparse_pairs()
    cfg = config(activation="jumprelu", l0_coefficient=0.05, jumprelu_bandwidth=0.05, jumprelu_init_threshold=0.05)
    tc = fresh(cfg, source)
    fit(tc, source, cfg)
    assert float(tc.threshold.detach().mean()) > 0.06  # the L0 gradient reached the thresholds and raised them


# ---------------------------------------------------------------- decoder constraint


def test_parallel_gradient_removed_and_norms_stay_one() -> None:
    source = sparse_pairs()
    cfg = config(lr=0.05)  # large steps: without the constraint norms would drift far from 1
    tc = fresh(cfg, source)
    state = new_state(tc, cfg)
    x, y = source.read(0, 256)
    loss = compute_loss(tc, x, y, cfg).loss
    loss.backward()
    assert (tc.W_dec.grad * tc.W_dec).sum(-1).abs().max() > 1e-4  # there was a parallel part to remove
    remove_parallel_grad(tc)
    assert (tc.W_dec.grad * tc.W_dec).sum(-1).abs().max() < 1e-6
    for _ in range(20):
        train_step(tc, state.optimizer, x, y, cfg, lr=cfg.lr)
    torch.testing.assert_close(tc.W_dec.norm(dim=-1), torch.ones(tc.cfg.d_sae), rtol=0, atol=1e-6)


def test_unconstrained_decoder_norms_drift() -> None:
    """The control for the test above: with normalize_decoder off, the same steps change norms."""
    source = sparse_pairs()
    cfg = config(lr=0.05, normalize_decoder=False)
    tc = fresh(cfg, source)
    state = new_state(tc, cfg)
    x, y = source.read(0, 256)
    for _ in range(20):
        train_step(tc, state.optimizer, x, y, cfg, lr=cfg.lr)
    assert (tc.W_dec.norm(dim=-1) - 1).abs().max() > 0.05


# ---------------------------------------------------------------- learning and dead features


def test_fit_learns_a_sparse_map() -> None:
    source = sparse_pairs()
    cfg = config(epochs=6, lr=1e-2)
    tc = fresh(cfg, source)
    state = fit(tc, source, cfg)
    first, last = state.history[0], state.history[-1]
    assert last["fvu"] < 0.2 < first["fvu"]
    assert last["step"] == state.step == 6 * source.num_batches(cfg.batch_size)
    assert last["tokens"] == 6 * source.n_tokens
    assert 0 < last["l0"] < tc.cfg.d_sae


def _kill(tc: Transcoder, n: int) -> torch.Tensor:
    """Make the first n features unable to fire (very negative encoder bias)."""
    with torch.no_grad():
        tc.b_enc[:n] = -1e3
    return torch.arange(n)


def _fires(tc: Transcoder, source: MemoryPairs) -> torch.Tensor:
    with torch.no_grad():
        return (tc.encode(source.x) > 0).any(0)


@pytest.mark.parametrize("revival", ["none", "resample"])
def test_resampling_revives_dead_features(revival: str) -> None:
    source = sparse_pairs()
    cfg = config(dead_revival=revival, epochs=2)
    tc = fresh(cfg, source)
    killed = _kill(tc, 8)
    state = new_state(tc, cfg)
    fit(tc, source, cfg, state=state)
    fires = _fires(tc, source)[killed]
    if revival == "resample":
        assert bool(fires.all())
        torch.testing.assert_close(tc.W_dec.norm(dim=-1), torch.ones(tc.cfg.d_sae), rtol=0, atol=1e-6)
    else:
        assert not bool(fires.any())  # control: without resampling they stay dead


def test_resampling_resets_adam_state_of_resampled_rows() -> None:
    from core.train import resample_dead

    source = sparse_pairs()
    cfg = config()
    tc = fresh(cfg, source)
    killed = _kill(tc, 4)
    state = new_state(tc, cfg)
    x, y = source.read(0, 256)
    train_step(tc, state.optimizer, x, y, cfg, lr=cfg.lr)
    moments = state.optimizer.state[tc.W_dec]
    moments["exp_avg"].fill_(1.0)  # make every moment visibly non-zero
    state.steps_since_fired[killed] = cfg.dead_window
    assert resample_dead(state, source, cfg) == 4
    assert moments["exp_avg"][killed].abs().sum() == 0
    assert (moments["exp_avg"][4:] == 1.0).all()
    assert (state.steps_since_fired[killed] == 0).all()


@pytest.mark.parametrize(("activation", "revival"), [("relu", "ghost_grads"), ("topk", "none"), ("batchtopk", "none")])
def test_dead_feature_losses_reach_dead_features(activation: str, revival: str) -> None:
    """Ghost grads (relu) and the TopK auxiliary loss give dead encoder columns a gradient; the plain loss does not."""
    source = sparse_pairs()
    cfg = config(activation=activation, dead_revival=revival, k=4)
    tc = fresh(cfg, source)
    with torch.no_grad():  # dead, with pre-activations in reach of exp (ghost) or of a positive top-k_aux (aux)
        if activation == "relu":
            tc.b_enc[:8] = -20.0
        else:
            tc.b_enc[8:] = 20.0  # the others always win the top-k
    dead = torch.zeros(tc.cfg.d_sae, dtype=torch.bool)
    dead[:8] = True
    x, y = source.read(0, 256)
    assert not bool(compute_loss(tc, x, y, cfg).feature_acts[:, :8].any())  # the code as trained
    for mask, expect_grad in ((None, False), (dead, True)):
        tc.zero_grad()
        terms = compute_loss(tc, x, y, cfg, mask)
        terms.loss.backward()
        grad = tc.W_enc.grad[:, :8].abs().sum()
        assert (grad > 0) == expect_grad
        assert (float(terms.aux.detach()) > 0) == expect_grad


def test_ghost_grad_residual_is_against_the_target(monkeypatch: pytest.MonkeyPatch) -> None:
    """The original code fitted ghost outputs to x - y_hat (the input); ours must get y - y_hat."""
    import core.losses

    seen: dict = {}

    def spy(tc, pre, residual, mse, dead):
        seen["residual"] = residual
        return mse.new_zeros(())

    monkeypatch.setattr(core.losses, "ghost_grad_loss", spy)
    source = sparse_pairs()
    cfg = config(dead_revival="ghost_grads")
    tc = fresh(cfg, source)
    x, y = source.read(0, 64)
    terms = compute_loss(tc, x, y, cfg, torch.ones(tc.cfg.d_sae, dtype=torch.bool))
    torch.testing.assert_close(seen["residual"], y - terms.out.detach(), rtol=0, atol=0)


# ---------------------------------------------------------------- schedules, init, kinds


def test_lr_schedules() -> None:
    total = 110
    c = config(warmup_steps=10)
    assert lr_factor(50, total, dataclasses.replace(c, lr_schedule="constant")) == 1.0
    warm = dataclasses.replace(c, lr_schedule="warmup")
    assert lr_factor(0, total, warm) == pytest.approx(0.1) and lr_factor(4, total, warm) == pytest.approx(0.5)
    assert lr_factor(100, total, warm) == 1.0
    lin = dataclasses.replace(c, lr_schedule="linear")
    assert lr_factor(4, total, lin) == pytest.approx(0.5)
    assert lr_factor(60, total, lin) == pytest.approx(0.5)  # halfway through the 100 decay steps
    assert lr_factor(110, total, lin) == pytest.approx(0.0)
    cos = dataclasses.replace(c, lr_schedule="cosine", lr_final_fraction=0.1)
    assert lr_factor(60, total, cos) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(35, total, cos) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(110, total, cos) == pytest.approx(0.1)


def test_geometric_median_matches_the_one_dimensional_median() -> None:
    points = torch.tensor([[0.0], [1.0], [2.5], [10.0], [100.0]])
    assert float(geometric_median(points, iters=2000, tol=1e-12)[0]) == pytest.approx(2.5, abs=1e-3)


def test_geometric_median_minimises_the_sum_of_distances() -> None:
    gen = torch.Generator().manual_seed(1)
    pts = torch.cat([torch.randn(40, 3, generator=gen), torch.full((5, 3), 30.0)])  # a cluster and outliers
    median = geometric_median(pts, iters=1000, tol=1e-12)

    def cost(p: torch.Tensor) -> torch.Tensor:
        return (pts.double() - p).norm(dim=-1).sum()

    # Independent check: no small step in any direction lowers the cost (a convex function's minimum).
    best = cost(median.double())
    steps = torch.cat([torch.eye(3), -torch.eye(3), torch.randn(20, 3, generator=gen)]).double() * 1e-3
    assert all(cost(median.double() + s) >= best - 1e-9 for s in steps)
    assert median.norm() < 2.5 < pts.mean(0).norm()  # robust to the outliers, unlike the mean


def test_fit_initialises_biases_from_the_data_means() -> None:
    source = sparse_pairs()
    cfg = config(epochs=1, init_tokens=source.n_tokens, lr=1e-12, warmup_steps=0)
    tc = fresh(cfg, source)
    fit(tc, source, cfg)  # lr ~ 0: the biases stay at their initial values
    torch.testing.assert_close(tc.b_dec, source.x.mean(0), rtol=0, atol=1e-5)
    torch.testing.assert_close(tc.b_dec_out, source.y.mean(0), rtol=0, atol=1e-5)


def test_sae_kinds_read_one_side() -> None:
    a, b = torch.zeros(2, 3), torch.ones(2, 5)
    assert select_pair("sae_mlp_out", a, b)[0] is b and select_pair("sae_mlp_in", a, b)[1] is a
    cfg = transcoder_config(config(kind="sae_mlp_out"), 3, 5, "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out")
    assert (cfg.d_in, cfg.d_out, cfg.d_sae) == (5, 5, 20)
    assert cfg.hook_in == cfg.hook_out == "blocks.0.hook_mlp_out"
    assert transcoder_config(config(kind="skip_transcoder"), 3, 5, "a", "b").skip


# ---------------------------------------------------------------- resume and divergence


class Interrupt(Exception):
    pass


@pytest.mark.parametrize(
    "cfg_changes", [{}, {"activation": "topk", "lr_schedule": "cosine", "k": 4}, {"activation": "batchtopk", "k": 4}]
)
def test_resume_equals_uninterrupted(cfg_changes: dict) -> None:
    source = sparse_pairs(n=1000)  # 1000 / 64: a partial last batch in every epoch
    cfg = config(epochs=3, dead_revival="resample", dead_window=5, resample_every=7, **cfg_changes)
    reference = fresh(cfg, source)
    fit(reference, source, cfg)

    saved: dict = {}

    def checkpoint_then_die(state, row) -> None:
        if state.step == 23:  # mid-epoch 2, after a resampling round
            saved["tensors"], saved["meta"] = state_tensors(state), state_meta(state)
        if state.step == 29:
            raise Interrupt

    first = fresh(cfg, source)
    with pytest.raises(Interrupt):
        fit(first, source, cfg, [checkpoint_then_die])
    resumed_tc = fresh(cfg, source)
    state = restore_state(resumed_tc, cfg, saved["tensors"], saved["meta"])
    assert (state.step, state.epoch, state.batch) == (23, 1, 7)
    final = fit(resumed_tc, source, cfg, state=state)
    for name, p in reference.named_parameters():
        assert torch.equal(p, dict(resumed_tc.named_parameters())[name]), name
    assert len(final.history) == final.step


def test_nan_loss_stops_with_a_clear_error() -> None:
    source = sparse_pairs()
    source.y[700:] = float("nan")
    cfg = config()
    with pytest.raises(TrainingDivergedError, match="diverged.*step"):
        fit(fresh(cfg, source), source, cfg)


def test_bf16_autocast_trains_close_to_float32() -> None:
    """The autocast path (meant for GPUs) runs on CPU too and learns about as well as float32."""
    source = sparse_pairs()
    results = {}
    for bf16 in (False, True):
        cfg = config(epochs=3, lr=1e-2, autocast_bf16=bf16)
        tc = fresh(cfg, source)
        results[bf16] = fit(tc, source, cfg).history[-1]["fvu"]
        assert tc.W_enc.dtype == torch.float32  # master weights stay float32
    assert results[True] < 0.3 and abs(results[True] - results[False]) < 0.05
