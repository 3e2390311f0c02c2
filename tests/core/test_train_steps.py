"""The hand-written training steps (core.train_steps, core.topk) against the autograd reference
(core.losses.compute_loss): equal loss and gradients in float64 on random data, and 20 Adam steps
ending at the same weights."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from core import topk
from core.config import TrainConfig
from core.losses import compute_loss
from core.train import TrainingDivergedError, fit, new_state, new_transcoder, transcoder_config
from core.train_steps import hand_pass, hand_written, reference_step, remove_parallel_grad, train_step
from core.transcoder import Transcoder

D_IN, D_OUT, D_SAE, BATCH = 16, 12, 128, 96
REL = 1e-6
"""Relative tolerance of a gradient (norm of the difference over the norm of the reference)."""

CASES = {
    "relu": {"activation": "relu", "l1_coefficient": 0.05},
    "relu unconstrained": {"activation": "relu", "l1_coefficient": 0.05, "normalize_decoder": False},
    "relu skip": {"activation": "relu", "kind": "skip_transcoder"},
    "relu ghost grads": {"activation": "relu", "dead_revival": "ghost_grads"},
    "jumprelu": {"activation": "jumprelu", "l0_coefficient": 0.05, "jumprelu_bandwidth": 0.2},
    "topk sparse": {"activation": "topk", "k": 8},  # 8 / 128 <= SPARSE_MAX_DENSITY: the sparse pass
    "topk sparse skip": {"activation": "topk", "k": 8, "kind": "skip_transcoder"},
    "topk dense": {"activation": "topk", "k": 40},  # above SPARSE_MAX_DENSITY: the dense pass
    "topk aux": {"activation": "topk", "k": 8, "aux_k_coefficient": 0.5},
    "batchtopk sparse": {"activation": "batchtopk", "k": 8},
    "batchtopk sparse skip": {"activation": "batchtopk", "k": 8, "kind": "skip_transcoder"},
    "batchtopk dense": {"activation": "batchtopk", "k": 40},
    "batchtopk aux": {"activation": "batchtopk", "k": 8, "aux_k_coefficient": 0.5},
}


def setup(changes: dict, seed: int = 0) -> tuple[Transcoder, TrainConfig, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A float64 transcoder with random (non-trivial) biases and thresholds, a random batch, a dead mask."""
    cfg = dataclasses.replace(TrainConfig(expansion_factor=8, seed=seed, lr=1e-2), **changes)
    tc = new_transcoder(cfg, transcoder_config(cfg, D_IN, D_OUT, "in", "out")).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (tc.b_enc, tc.b_dec, tc.b_dec_out):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.1)
        if cfg.activation in ("topk", "batchtopk"):  # some tokens get fewer than k positive pre-activations
            tc.b_enc.sub_(2.5)
        if tc.threshold is not None and cfg.activation == "jumprelu":
            tc.threshold.copy_(torch.rand(D_SAE, generator=gen, dtype=torch.float64) * 0.5)
        if tc.W_skip is not None:
            tc.W_skip.copy_(torch.randn(tc.W_skip.shape, generator=gen, dtype=torch.float64) * 0.1)
    x = torch.randn(BATCH, tc.cfg.d_in, generator=gen, dtype=torch.float64)
    y = torch.randn(BATCH, tc.cfg.d_out, generator=gen, dtype=torch.float64) * 0.5
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::5] = True
    return tc, cfg, x, y, dead


def grads(tc: Transcoder) -> dict[str, torch.Tensor | None]:
    return {name: None if p.grad is None else p.grad.clone() for name, p in tc.named_parameters()}


def assert_relative(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = expected.norm().clamp_min(1e-30)
    assert float((actual - expected).norm() / scale) <= REL, what


@pytest.mark.parametrize("case", CASES)
def test_hand_written_loss_and_gradients_equal_autograd(case: str) -> None:
    tc, cfg, x, y, dead = setup(CASES[case])
    revive = "aux" in case or cfg.dead_revival == "ghost_grads"
    mask = dead if revive else None
    ref = copy.deepcopy(tc)
    terms = compute_loss(ref, x, y, cfg, mask, sparsity_scale=0.7)
    terms.loss.backward()
    optimizer = torch.optim.SGD(tc.parameters(), lr=0.0)  # lr 0: train_step's gradients, weights unchanged
    metrics = train_step(tc, optimizer, x, y, cfg, 0.0, mask, sparsity_scale=0.7)
    if cfg.normalize_decoder:
        remove_parallel_grad(ref)  # train_step applies the constraint to its gradients
    expected = grads(ref)
    for name, grad in grads(tc).items():
        if name == "threshold" and cfg.activation == "batchtopk":
            assert expected[name] is None  # set from the batch's selection, not by gradient
            continue
        assert expected[name].norm() > 0, f"{case}: reference {name} gradient is zero (the test would be blind)"
        assert_relative(grad, expected[name], f"{case}: {name}")
    for field in ("loss", "mse", "sparsity", "aux"):
        torch.testing.assert_close(
            getattr(metrics, field).double(), getattr(terms, field).detach().double(), rtol=REL, atol=1e-12
        )
    if revive:
        assert float(terms.aux.detach()) > 0
    active = terms.feature_acts != 0
    assert torch.equal(metrics.fired, active.any(0))
    torch.testing.assert_close(metrics.l0, active.sum(-1).double().mean())


def test_the_cases_cover_both_topk_passes_and_the_jumprelu_window() -> None:
    """Controls for the test above: which pass each TopK case takes, and that thresholds get a kernel gradient."""
    assert topk.use_sparse(torch.zeros(1, D_SAE), 8) and not topk.use_sparse(torch.zeros(1, D_SAE), 40)
    tc, cfg, x, y, _ = setup(CASES["topk sparse"])
    values = topk.select(tc.pre_acts(x), cfg.k)[0]
    assert bool((values > 0).any()) and bool((values < 0).any())
    tc, cfg, x, y, _ = setup(CASES["jumprelu"])
    hand_pass(tc, x, y, cfg, 0.0, measure=False)  # no L0 term: only the JumpReLU estimator reaches the threshold
    assert int((tc.threshold.grad != 0).sum()) > 5


@pytest.mark.parametrize(
    "case", ["relu", "jumprelu", "topk sparse", "topk dense", "relu skip", "batchtopk sparse", "batchtopk dense"]
)
def test_twenty_steps_end_at_the_reference_weights(case: str) -> None:
    tc, cfg, x_all, y_all, _ = setup(CASES[case], seed=1)
    assert hand_written(tc, cfg)
    ref = copy.deepcopy(tc)
    states = new_state(tc, cfg), new_state(ref, cfg)
    gen = torch.Generator().manual_seed(2)
    for step in range(20):
        rows = torch.randint(0, BATCH, (BATCH,), generator=gen)
        x, y = x_all[rows], y_all[rows]
        train_step(tc, states[0].optimizer, x, y, cfg, cfg.lr, measure=step % 7 == 0)
        reference_step(ref, states[1].optimizer, x, y, cfg, cfg.lr)
    moved = 0.0
    for (name, p), q in zip(tc.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5, msg=name)
        moved = max(moved, float((q - setup(CASES[case], seed=1)[0].get_parameter(name)).detach().abs().max()))
    assert moved > 1e-3  # the weights did move, so agreement is not trivial


def test_fit_measures_only_logged_steps_and_still_catches_divergence() -> None:
    from tests.core.test_train import config, fresh, sparse_pairs

    source = sparse_pairs(n=640)  # 10 batches of 64 per epoch
    cfg = config(epochs=1, log_every=4)
    seen: list[tuple[int, bool]] = []
    state = fit(fresh(cfg, source), source, cfg, [lambda s, row: seen.append((s.step, row is not None))])
    assert [step for step, logged in seen if logged] == [4, 8, 10]  # every 4th step and the last
    assert [row["step"] for row in state.history] == [4, 8, 10]
    assert all(math.isfinite(v) for row in state.history for v in row.values())

    poisoned = fresh(cfg, source)
    with torch.no_grad():
        poisoned.b_dec_out.fill_(float("inf"))  # non-finite weights from the start: caught at the first logged step
    with pytest.raises(TrainingDivergedError, match="by step 4"):
        fit(poisoned, source, dataclasses.replace(cfg, init_b_dec="zeros"), state=new_state(poisoned, cfg))


def check_pieces(pairs: topk.Pairs, z: torch.Tensor, w_dec: torch.Tensor, g_out: torch.Tensor) -> None:
    """core.topk's products over `pairs` equal the dense ones over their code z [batch, d_sae]."""
    exact = {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(pairs.csr(pairs.vals).to_dense(), z, rtol=0, atol=0)
    torch.testing.assert_close(topk.decode(pairs, w_dec), z @ w_dec, **exact)
    dense_grads = (g_out @ w_dec.T)[pairs.rows, pairs.cols]
    torch.testing.assert_close(topk.active_grads(pairs, g_out, w_dec), dense_grads, **exact)
    by_feature = topk.FeatureMajor(pairs)
    torch.testing.assert_close(by_feature.matmul(pairs.vals, g_out), z.T @ g_out, **exact)
    torch.testing.assert_close(by_feature.sum(pairs.vals), z.sum(0), **exact)


def pieces_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    pre = torch.randn(BATCH, D_SAE, generator=gen, dtype=torch.float64)
    w_dec = torch.randn(D_SAE, D_OUT, generator=gen, dtype=torch.float64)
    g_out = torch.randn(BATCH, D_OUT, generator=gen, dtype=torch.float64)
    return pre, w_dec, g_out


def test_sparse_topk_pieces_equal_their_dense_formulation() -> None:
    pre, w_dec, g_out = pieces_data()
    values, indices = topk.select(pre, 8)
    torch.testing.assert_close(values.sort(-1).values, pre.topk(8).values.sort(-1).values, rtol=0, atol=0)
    z = torch.zeros_like(pre).scatter(-1, indices, values.relu())  # the dense code [batch, d_sae]
    check_pieces(topk.per_token(pre, 8), z, w_dec, g_out)


@pytest.mark.parametrize("hint", [None, 0.5, 1.0, 1.5, 100.0, float("inf")])  # no screen, screens that hold,
# one that holds at its second margin, ones that fall back to no screen
def test_batch_topk_selection_equals_the_sort_of_the_whole_batch(hint: float | None) -> None:
    pre, w_dec, g_out = pieces_data()
    exact = pre.reshape(-1).sort(descending=True).values[8 * BATCH - 1]
    pairs = topk.per_batch(pre, 8, None if hint is None else torch.tensor(hint * float(exact)))
    z = pre * (pre >= exact)
    assert int((z > 0).sum()) == 8 * BATCH and int((z > 0).sum(-1).max()) > 8  # uneven per token
    check_pieces(pairs, z, w_dec, g_out)
    torch.testing.assert_close(topk.dense(pairs), z, rtol=0, atol=0)
    shifted = pre - 3.0  # fewer positive pre-activations than 8 per token: all the positive ones are kept
    assert int((shifted > 0).sum()) < 8 * BATCH
    check_pieces(topk.per_batch(shifted, 8, torch.tensor(0.5)), shifted.relu(), w_dec, g_out)


def test_batch_topk_keeps_ties_and_tiny_values_as_the_reference_does() -> None:
    """Ties with the (k * batch)-th value are all kept, and so are positive values too small for a normal
    float, in the selection and in the autograd reference (core.losses.batch_topk_relu) alike."""
    from core.losses import batch_topk_relu

    tiny = torch.finfo(torch.float32).tiny
    pre = torch.tensor([[3.0, 2.0, 2.0, -1.0], [2.0, tiny / 4, 0.0, -2.0]])
    want = torch.tensor([[3.0, 2.0, 2.0, 0.0], [2.0, 0.0, 0.0, 0.0]])  # k * batch = 2: the tied 2s all stay
    torch.testing.assert_close(topk.dense(topk.per_batch(pre, 1)), want, rtol=0, atol=0)
    torch.testing.assert_close(batch_topk_relu(pre, 1), want, rtol=0, atol=0)
    few = torch.tensor([[tiny / 4, -1.0], [-1.0, -1.0]])  # one positive value, subnormal: kept by both
    torch.testing.assert_close(topk.dense(topk.per_batch(few, 2)), few.relu(), rtol=0, atol=0)
    torch.testing.assert_close(batch_topk_relu(few, 2), few.relu(), rtol=0, atol=0)


def test_all_finite_sees_every_non_finite_value_and_not_an_overflowing_sum() -> None:
    from core.train import all_finite

    big = torch.full((1000,), 3e38)  # finite, but the sum overflows to inf
    assert not torch.isfinite(big.sum()) and all_finite(big)
    for bad in (float("nan"), float("inf"), -float("inf")):
        for place in (0, 517, 999):
            x = torch.randn(1000)
            x[place] = bad
            assert not all_finite(x), (bad, place)
    both = torch.randn(1000)
    both[3], both[4] = float("inf"), -float("inf")  # the sum is NaN
    assert not all_finite(both) and all_finite(torch.randn(10, 10))
