"""The per-layer and all-layers evaluations of one run share the clean model's log-probabilities of the
held-out rows (tasks.evaluate.shared_clean_splice): one clean forward pass per batch, the same figures."""

from __future__ import annotations

import pytest
import torch

import tasks.evaluate as evaluate
from core.config import ActivationsConfig, Config, ModelConfig
from core.metrics import splice_eval
from core.model import load_model
from tests.core.test_metrics import zero_transcoder

CFG = Config(
    model=ModelConfig(name="tiny:rms", device="cpu"), activations=ActivationsConfig(layers=[0, 1], batch_rows=4)
)


@pytest.fixture
def clean_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = evaluate.clean_log_probs

    def counting(model, tokens, batch_rows, first_pos):
        calls.append(tokens.shape[0])
        return real(model, tokens, batch_rows, first_pos)

    monkeypatch.setattr(evaluate, "clean_log_probs", counting)
    evaluate.release_clean_reference()
    yield calls
    evaluate.release_clean_reference()


def transcoder(model, layer: int, seed: int):
    tc = zero_transcoder(model, layer)
    with torch.no_grad():
        tc.b_dec_out.normal_(generator=torch.Generator().manual_seed(seed))
    return tc


def test_evaluations_of_the_same_rows_share_one_clean_pass(clean_calls) -> None:
    rows = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(0))
    first, second = load_model("tiny:rms", "cpu"), load_model("tiny:rms", "cpu")  # two tasks, two model copies
    tcs = {0: transcoder(first, 0, 1), 1: transcoder(first, 1, 2)}
    layer0 = evaluate.shared_clean_splice(CFG, first, rows, {0: tcs[0]}, 1)
    layer1 = evaluate.shared_clean_splice(CFG, second, rows, {1: tcs[1]}, 1)
    both = evaluate.shared_clean_splice(CFG, first, rows, tcs, 1)
    assert clean_calls == [6]
    assert layer0 == splice_eval(first, rows, {0: tcs[0]}, 4, 1)
    assert layer1 == splice_eval(second, rows, {1: tcs[1]}, 4, 1)
    assert both == splice_eval(first, rows, tcs, 4, 1)
    assert layer0.ce_clean == layer1.ce_clean == both.ce_clean

    evaluate.shared_clean_splice(CFG, first, rows[:4], {0: tcs[0]}, 1)  # other rows: a new reference
    evaluate.shared_clean_splice(CFG, first, rows[:4], {0: tcs[0]}, 0)  # another first position: too
    assert clean_calls == [6, 4, 4]
    evaluate.release_clean_reference()
    evaluate.shared_clean_splice(CFG, first, rows[:4], {0: tcs[0]}, 0)
    assert clean_calls == [6, 4, 4, 4]


def test_other_weights_or_a_reference_too_large_to_keep_are_not_shared(clean_calls, monkeypatch) -> None:
    rows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    model = load_model("tiny:rms", "cpu")
    tc = transcoder(model, 0, 3)
    evaluate.shared_clean_splice(CFG, model, rows, {0: tc}, 1)
    changed = load_model("tiny:rms", "cpu")
    with torch.no_grad():
        changed.blocks[1].mlp.W_out.mul_(2.0)
    result = evaluate.shared_clean_splice(CFG, changed, rows, {0: tc}, 1)
    assert result == splice_eval(changed, rows, {0: tc}, 4, 1)
    assert clean_calls == [4, 4]
    monkeypatch.setattr(evaluate, "CLEAN_CACHE_BYTES", 1000)
    assert evaluate.shared_clean_splice(CFG, model, rows, {0: tc}, 1) == splice_eval(model, rows, {0: tc}, 4, 1)
    assert clean_calls == [4, 4]  # computed inside splice_eval, never kept
