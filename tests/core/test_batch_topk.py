"""Batch top-k training: the transcoder it saves is a JumpReLU whose threshold reproduces the code
it was trained with (core.train_steps.track_threshold)."""

from __future__ import annotations

import torch

from core.train import fit
from core.train_steps import THRESHOLD_RATE, track_threshold
from tests.core.test_train import config, fresh, sparse_pairs


def test_the_threshold_follows_the_batches_by_its_moving_average() -> None:
    threshold = torch.zeros(4, dtype=torch.float64)
    track_threshold(threshold, torch.tensor(2.0))  # a fresh threshold takes the first batch's at once
    assert threshold.tolist() == [2.0] * 4
    track_threshold(threshold, torch.tensor(1.0))
    assert threshold.tolist() == [2.0 - THRESHOLD_RATE] * 4
    track_threshold(threshold, torch.tensor(torch.inf))  # a batch that kept nothing does not move it
    assert threshold.tolist() == [2.0 - THRESHOLD_RATE] * 4


def test_batch_topk_saves_a_jumprelu_that_keeps_about_k_per_token() -> None:
    source = sparse_pairs(n=4096)
    cfg = config(activation="batchtopk", k=6, epochs=6, lr=1e-2)
    tc = fresh(cfg, source)
    assert tc.cfg.activation == "jumprelu" and float(tc.threshold.abs().max()) == 0.0
    state = fit(tc, source, cfg)
    threshold = float(tc.threshold[0])
    assert threshold > 0 and torch.equal(tc.threshold, torch.full_like(tc.threshold, threshold))
    last = state.history[-1]
    assert abs(last["l0"] - cfg.k) < 1e-6  # training keeps exactly k * batch per batch
    x, y = source.read(0, source.n_tokens)
    with torch.no_grad():
        out = tc(x)
    l0 = float((out.feature_acts > 0).sum(-1).double().mean())
    fvu = float((out.out - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert abs(l0 - cfg.k) < 0.15 * cfg.k, l0  # the JumpReLU form keeps about k per token
    assert fvu < 0.2 and abs(fvu - last["fvu"]) < 0.05, (fvu, last["fvu"])
    flat = torch.relu(tc.pre_acts(x)).detach().reshape(-1)
    kth = float(flat.topk(cfg.k * x.shape[0]).values[-1])
    assert abs(threshold - kth) < 0.15 * kth, (threshold, kth)  # the learned threshold is the data's selection
