"""Capture of transcoder training pairs: equality with run_with_cache and with the MLP's real input and
output, one-line errors before any forward pass, and the shuffled batch order (exactly once, seeded)."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from core.activations import (
    CaptureError,
    capture_mlp_pairs,
    check_capture,
    check_capture_config,
    pair_dims,
)
from core.batches import PairBatches, epoch_windows
from core.model import load_model
from core.streaming import StreamingPairSource

TINY = ("tiny:ln", "tiny:rms", "tiny:rms-gqa")
BOS = 256


@pytest.fixture(scope="module", params=TINY)
def model(request: pytest.FixtureRequest) -> HookedTransformer:
    return load_model(request.param, device="cpu")


def token_rows(n_rows: int, n_pos: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, 256, (n_rows, n_pos), generator=gen)  # [row, pos]
    rows[:, 0] = BOS
    return rows


class ForwardCounter:
    """Counts forward passes of a model (to prove that validation happens before any)."""

    def __init__(self, model: HookedTransformer) -> None:
        self.calls = 0
        self.handle = model.hook_embed.register_forward_hook(self._count)

    def _count(self, *args: object) -> None:
        self.calls += 1


# ---------------------------------------------------------------- equality with independent references


@pytest.mark.parametrize("drop_bos", [True, False])
def test_pairs_equal_run_with_cache(model: HookedTransformer, drop_bos: bool) -> None:
    """Exact (bitwise) equality with a full run_with_cache of the same batch: same ops, same order."""
    tokens = token_rows(3, 12)
    pairs = capture_mlp_pairs(model, tokens, [0, 1], drop_bos=drop_bos)
    _, cache = model.run_with_cache(tokens)
    skip = int(drop_bos)
    for layer in (0, 1):
        want_in = cache[f"blocks.{layer}.ln2.hook_normalized"][:, skip:].reshape(-1, model.cfg.d_model)
        want_out = cache[f"blocks.{layer}.hook_mlp_out"][:, skip:].reshape(-1, model.cfg.d_model)
        assert pairs[layer].mlp_in.shape == (3 * (12 - skip), model.cfg.d_model)
        torch.testing.assert_close(pairs[layer].mlp_in, want_in, rtol=0, atol=0)
        torch.testing.assert_close(pairs[layer].mlp_out, want_out, rtol=0, atol=0)


def test_mlp_in_is_what_the_mlp_consumes(model: HookedTransformer) -> None:
    """A torch pre-hook on the MLP module (not a TransformerLens hook) sees exactly mlp_in, and the MLP
    applied to mlp_in gives mlp_out (tiny models have non-trivial norm weights, folded at load)."""
    tokens = token_rows(2, 10, seed=1)
    seen: dict[int, torch.Tensor] = {}
    handles = [
        model.blocks[layer].mlp.register_forward_pre_hook(lambda mod, args, layer=layer: seen.update({layer: args[0]}))
        for layer in (0, 1)
    ]
    try:
        pairs = capture_mlp_pairs(model, tokens, [0, 1], drop_bos=True)
    finally:
        for handle in handles:
            handle.remove()
    for layer in (0, 1):
        actual_in = seen[layer][:, 1:].reshape(-1, model.cfg.d_model)
        torch.testing.assert_close(pairs[layer].mlp_in, actual_in, rtol=0, atol=0)
        with torch.inference_mode():
            recomputed = model.blocks[layer].mlp(pairs[layer].mlp_in[None])[0]
        torch.testing.assert_close(recomputed, pairs[layer].mlp_out, rtol=1e-5, atol=1e-6)


def test_unfolded_norm_is_refused_and_would_have_been_wrong() -> None:
    """With norm weights not folded, ln2.hook_normalized differs from the MLP input: capture refuses."""
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32, n_ctx=16, d_vocab=257, act_fn="gelu", seed=3
    )
    raw = HookedTransformer(cfg)
    with torch.no_grad():
        raw.blocks[0].ln2.w.mul_(1.5)
    tokens = token_rows(1, 6)
    _, cache = raw.run_with_cache(tokens)
    normalized = cache["blocks.0.ln2.hook_normalized"]
    mlp_input = normalized * raw.blocks[0].ln2.w + raw.blocks[0].ln2.b
    assert not torch.allclose(normalized, mlp_input)
    counter = ForwardCounter(raw)
    with pytest.raises(CaptureError, match="ln2 applies its weight") as err:
        capture_mlp_pairs(raw, tokens, [0])
    assert "\n" not in str(err.value) and counter.calls == 0


@pytest.mark.parametrize(
    ("layers", "hooks", "tokens", "message"),
    [
        ([2], {}, None, "layer 2 is out of range"),
        ([-1], {}, None, "layer -1 is out of range"),
        ([], {}, None, "no layers"),
        ([0], {"hook_in": "blocks.{layer}.ln3.hook_normalized"}, None, "has no hook 'blocks.0.ln3.hook_normalized'"),
        ([1], {"hook_out": "blocks.{layer}.mlp.hook_nothing"}, None, "has no hook"),
        ([0], {}, torch.full((1, 4), 300), "vocabulary is 0..256"),
        ([0], {}, torch.zeros(1, 300, dtype=torch.long), "300 positions"),
        ([0], {}, torch.zeros(4, dtype=torch.long), "2-D"),
    ],
)
def test_bad_input_is_one_line_before_any_forward(
    layers: list[int], hooks: dict[str, str], tokens: torch.Tensor | None, message: str
) -> None:
    model = load_model("tiny:ln", device="cpu")
    counter = ForwardCounter(model)
    tokens = token_rows(2, 8) if tokens is None else tokens
    with pytest.raises(CaptureError, match=message) as err:
        capture_mlp_pairs(model, tokens, layers, **hooks)
    assert "\n" not in str(err.value)
    assert counter.calls == 0


def test_config_only_check_needs_no_weights() -> None:
    """The pre-flight check on a meta-device skeleton agrees with the check on the loaded model."""
    from core.model import tiny_config

    cfg = tiny_config("tiny:rms")
    check_capture_config(cfg, [0, 1])
    with pytest.raises(CaptureError, match="layer 2 is out of range"):
        check_capture_config(cfg, [0, 2])
    with pytest.raises(CaptureError, match="has no hook 'blocks.1.hook_nope'"):
        check_capture_config(cfg, [1], hook_out="blocks.{layer}.hook_nope")
    attn_only = HookedTransformerConfig(n_layers=1, d_model=8, n_heads=1, d_head=8, n_ctx=4, d_vocab=10, attn_only=True)
    with pytest.raises(CaptureError, match="has no hook 'blocks.0.ln2.hook_normalized'"):
        check_capture_config(attn_only, [0])


def test_pair_dims_known_widths_match_a_probe() -> None:
    """Widths taken from the config equal what the hooks really carry (including an unknown hook)."""
    model = load_model("tiny:rms", device="cpu")
    assert pair_dims(model, [0, 1]) == {0: (32, 32), 1: (32, 32)}
    assert pair_dims(model, [1], "blocks.{layer}.mlp.hook_pre", "blocks.{layer}.hook_mlp_out") == {1: (96, 32)}
    check_capture(model, [0, 1], tokens=token_rows(1, 4))


# ---------------------------------------------------------------- shuffled batches


class IndexPairs(PairBatches):
    """A pair source whose pair t is (t, -t): lets a test see exactly which tokens a batch holds."""

    def __init__(self, n_tokens: int, block_tokens: int, buffer_bytes: int) -> None:
        self.n_tokens, self.d_in, self.d_out = n_tokens, 1, 2
        self.block_tokens, self.buffer_bytes = block_tokens, buffer_bytes
        self.reads: list[tuple[int, int]] = []

    def read(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.reads.append((start, stop))
        t = torch.arange(start, stop, dtype=torch.float32)[:, None]
        return t, torch.cat([-t, 2 * t], dim=1)


@pytest.mark.parametrize(
    ("n_tokens", "block", "window_blocks", "batch", "stop"),
    [(1000, 16, 4, 64, None), (1000, 16, 4, 7, 555), (97, 10, 1, 33, None), (50, 64, 3, 200, None), (0, 8, 2, 4, None)],
)
def test_batches_visit_every_pair_once(
    n_tokens: int, block: int, window_blocks: int, batch: int, stop: int | None
) -> None:
    source = IndexPairs(n_tokens, block, buffer_bytes=window_blocks * block * 4 * 3)
    assert source.window_tokens() == window_blocks * block
    batches = list(source.batches(batch, seed=5, epoch=0, stop_token=stop))
    limit = n_tokens if stop is None else stop
    assert len(batches) == source.num_batches(batch, stop) == -(-limit // batch)
    assert all(b[0].shape[0] == batch for b in batches[:-1])  # only the last batch may be partial
    seen = torch.cat([b[0][:, 0] for b in batches]) if batches else torch.empty(0)
    assert sorted(seen.long().tolist()) == list(range(limit))
    for x_in, x_out in batches:  # pairs stay together
        torch.testing.assert_close(x_out, torch.cat([-x_in, 2 * x_in], dim=1), rtol=0, atol=0)
    assert max((b - a for a, b in source.reads), default=0) <= block


def test_batches_are_deterministic_shuffled_and_resumable() -> None:
    source = IndexPairs(2000, 32, buffer_bytes=8 * 32 * 12)
    order = lambda seed, epoch, start=0: torch.cat([b[0][:, 0] for b in source.batches(50, seed, epoch, start)])  # noqa: E731
    first = order(1, 0)
    torch.testing.assert_close(first, order(1, 0), rtol=0, atol=0)
    assert not torch.equal(first, order(1, 1)) and not torch.equal(first, order(2, 0))
    assert not torch.equal(first, torch.arange(2000, dtype=torch.float32))
    source.reads.clear()
    torch.testing.assert_close(order(1, 0, start=17), first[17 * 50 :], rtol=0, atol=0)
    assert sum(b - a for a, b in source.reads) < 2000  # whole windows before the resume point are not read
    # across windows: the first batch mixes blocks from all over the token range
    assert first[:50].max() - first[:50].min() > 1000


def test_epoch_windows_partition_the_range() -> None:
    windows = epoch_windows(1000, 64, 256, seed=0, epoch=3)
    spans = sorted(span for window in windows for span in window)
    assert spans[0][0] == 0 and spans[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in zip(spans[:-1], spans[1:], strict=True))
    assert [len(w) for w in windows] == [4, 4, 4, 4]


def test_batches_reject_bad_arguments() -> None:
    source = IndexPairs(10, 4, 1000)
    for kwargs in ({"batch_size": 0}, {"seed": -1}, {"stop_token": 11}):
        args = {"batch_size": 2, "seed": 0, "epoch": 0, **kwargs}
        with pytest.raises(ValueError):
            list(source.batches(**args))


# ---------------------------------------------------------------- the streaming source


def test_streaming_source_matches_capture_and_shuffles() -> None:
    model = load_model("tiny:rms-gqa", device="cpu")
    tokens = token_rows(6, 9, seed=2)
    stream = StreamingPairSource(model, tokens.numpy(), layer=1, batch_rows=2, buffer_bytes=2 * 16 * 4 * 64)
    assert (stream.n_tokens, stream.tokens_per_row, stream.d_in, stream.d_out) == (48, 8, 32, 32)
    assert (stream.hook_in, stream.hook_out) == ("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out")
    # same forward batches (2 rows) as the reference -> bitwise equal; a 3-row read is within float32 noise
    ref = torch.cat([capture_mlp_pairs(model, tokens[i : i + 2], [1])[1].mlp_in for i in range(0, 6, 2)])
    torch.testing.assert_close(stream.read(0, 48)[0], ref, rtol=0, atol=0)
    torch.testing.assert_close(stream.read(13, 29)[0], ref[13:29], rtol=1e-5, atol=1e-5)
    # token order: token t = row t // 8, position t % 8 + 1
    _, cache = model.run_with_cache(tokens[3:4])
    torch.testing.assert_close(stream.read(3 * 8 + 4, 3 * 8 + 5)[1][0], cache["blocks.1.hook_mlp_out"][0, 5])
    batches = list(stream.batches(10, seed=0, epoch=0))
    assert [b[0].shape[0] for b in batches] == [10, 10, 10, 10, 8]
    got = torch.cat([b[0] for b in batches])
    perm = [int(torch.argmin((ref - row).abs().sum(1))) for row in got]
    assert sorted(perm) == list(range(48)) and perm != list(range(48))
    torch.testing.assert_close(got, ref[perm], rtol=0, atol=0)


def test_hook_templates_are_validated_by_the_config() -> None:
    from core.config import ActivationsConfig, ConfigError

    assert ActivationsConfig(hook_out="blocks.{layer}.hook_resid_post").hook_out == "blocks.{layer}.hook_resid_post"
    for bad in ("blocks.0.hook_mlp_out", "blocks.{layer}.{other}", "blocks.{layer.hook_mlp_out"):
        with pytest.raises(ConfigError, match="activations.hook_in") as err:
            ActivationsConfig(hook_in=bad)
        assert "\n" not in str(err.value)
