"""Input-invariant views equal what the model's own modules compute: the attention block run with a
pattern fixed on one source, TransformerLens' OV FactoredMatrix, the unembed module, and a
transcoder's decoder applied to a one-hot feature."""

from __future__ import annotations

import pytest
import torch

from core import views
from core.model import load_model
from core.transcoder import TranscoderConfig, init_transcoder

TOL = {"rtol": 1e-10, "atol": 1e-10}  # float64 models: only summation-order rounding differs


@pytest.fixture(scope="module", params=["ln", "rms-gqa"])
def model(request):
    return load_model(f'tiny:{{"preset": "{request.param}", "n_layers": 3}}', "cpu", "float64")


@pytest.fixture(scope="module")
def transcoders(model):
    d = model.cfg.d_model
    out = {}
    for layer in (0, 2):
        tc = init_transcoder(TranscoderConfig(d, 24, d, layer=layer), seed=layer, dtype=torch.float64)
        with torch.no_grad():
            tc.b_dec_out.normal_(generator=torch.Generator().manual_seed(5))
        out[layer] = tc
    return out


def test_deembedding_is_the_embedding_dotted_with_the_encoder(model, transcoders):
    f_enc = transcoders[2].W_enc
    got = views.deembedding(model, f_enc)  # [d_sae d_vocab]
    emb = model.embed(torch.arange(model.cfg.d_vocab)[None])[0]  # the embedding module, token by token
    torch.testing.assert_close(got, (emb @ f_enc).T, **TOL)


def test_head_deembedding_equals_the_attention_block_attending_to_one_token(model, transcoders):
    layer, feature = 1, 5
    f = transcoders[2].W_enc[:, feature]
    attn = model.blocks[layer].attn
    tokens = torch.tensor([3, 77, 200])
    n_pos = 4

    def one_source(pattern, hook):  # every destination attends only to position 0
        fixed = torch.zeros_like(pattern)
        fixed[..., 0] = 1.0
        return fixed

    def head_outputs(value_row: torch.Tensor) -> torch.Tensor:
        """Per-head contribution [head d_model] at the last position when position 0 holds value_row."""
        x = torch.randn(1, n_pos, model.cfg.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        v = x.clone()
        v[0, 0] = value_row
        z = {}
        attn.hook_pattern.add_hook(one_source)
        attn.hook_z.add_hook(lambda act, hook: z.setdefault("z", act))
        try:
            attn(query_input=x, key_input=x, value_input=v)
        finally:
            attn.hook_pattern.remove_hooks()
            attn.hook_z.remove_hooks()
        return torch.einsum("hd,hdm->hm", z["z"][0, -1], attn.W_O)

    bias_only = head_outputs(torch.zeros(model.cfg.d_model, dtype=torch.float64))  # b_V W_O
    for head in range(model.cfg.n_heads):
        got = views.head_deembedding(model, layer, head, f[:, None])[0]
        for t in tokens.tolist():
            direct = (head_outputs(model.W_E[t])[head] - bias_only[head]) @ f
            torch.testing.assert_close(got[t], direct, **TOL)


def test_ov_norms_equal_the_factored_ov_matrix(model, transcoders):
    f_enc = transcoders[2].W_enc[:, :6]
    got = views.ov_norms(model, 2, f_enc)  # [n layer head]
    for layer in range(3):
        ov = model.blocks[layer].attn.OV.AB  # [head d_model d_model], TransformerLens' own W_V W_O
        expected = torch.einsum("hmn,nf->fhm", ov, f_enc).norm(dim=-1)
        torch.testing.assert_close(got[:, layer], expected, **TOL)


def test_logit_lens_is_the_unembedding_of_the_decoder_vector(model, transcoders):
    f_dec = transcoders[0].W_dec[:4]
    got = views.logit_lens(model, f_dec)
    zero = model.unembed(torch.zeros(1, 1, model.cfg.d_model, dtype=torch.float64))[0, 0]
    expected = model.unembed(f_dec[None])[0] - zero  # remove b_U
    torch.testing.assert_close(got, expected, **TOL)


def test_pullback_is_the_earlier_decoder_read_by_the_encoder(transcoders):
    early, late = transcoders[0], transcoders[2]
    f_enc = late.W_enc[:, :3]
    got = views.pullback(early, f_enc)  # [3 d_sae_early]
    eye = torch.eye(early.cfg.d_sae, dtype=torch.float64)
    written = early.decode(eye) - early.decode(torch.zeros_like(eye))  # each feature's decoder write
    torch.testing.assert_close(got, (written @ f_enc).T, **TOL)


def test_feature_views_rows_are_the_top_entries_of_each_view(model, transcoders):
    top = 4
    rows = {}
    for r in views.feature_views(model, transcoders, 2, top, chunk=10):
        rows.setdefault(r.view, []).append(r)
    assert set(rows) == set(views.VIEWS)
    d_sae = transcoders[2].cfg.d_sae

    def per_feature(view: str, column: str) -> dict[int, list]:
        out: dict[int, list] = {}
        for r in rows[view]:
            for f, rank, item, value in zip(
                r.feature.tolist(), r.rank.tolist(), getattr(r, column).tolist(), r.value.tolist(), strict=True
            ):
                out.setdefault(f, []).append((rank, item, value))
        return {f: [x[1:] for x in sorted(v)] for f, v in out.items()}

    deembed = views.deembedding(model, transcoders[2].W_enc)
    lens = views.logit_lens(model, transcoders[2].W_dec)
    norms = views.ov_norms(model, 2, transcoders[2].W_enc).flatten(1)
    pull = views.pullback(transcoders[0], transcoders[2].W_enc)
    got_de, got_top, got_bottom = (
        per_feature("deembed", "token"),
        per_feature("logit_top", "token"),
        per_feature("logit_bottom", "token"),
    )
    got_pull, got_heads = per_feature("pullback", "src_feature"), per_feature("head_deembed", "token")
    got_ov = per_feature("ov_norm", "src_head")
    for f in range(d_sae):
        assert [t for t, _ in got_de[f]] == deembed[f].argsort(descending=True)[:top].tolist()
        assert [t for t, _ in got_top[f]] == lens[f].argsort(descending=True)[:top].tolist()
        assert [t for t, _ in got_bottom[f]] == lens[f].argsort()[:top].tolist()
        assert [v for _, v in got_bottom[f]] == pytest.approx(lens[f].sort().values[:top].tolist(), rel=1e-6)
        best = norms[f].argsort(descending=True)[:top]
        assert [h for h, _ in got_ov[f]] == (best % model.cfg.n_heads).tolist()
        layer, head = divmod(int(best[0]), model.cfg.n_heads)
        through = views.head_deembedding(model, layer, head, transcoders[2].W_enc[:, f : f + 1])[0]
        assert [t for t, _ in got_heads[f]] == through.argsort(descending=True)[:top].tolist()
        strongest = pull[f].abs().argsort(descending=True)[:top]
        assert [s for s, _ in got_pull[f]] == strongest.tolist()
        assert [v for _, v in got_pull[f]] == pytest.approx(pull[f][strongest].tolist(), rel=1e-6)  # signed
    assert {int(x) for r in rows["pullback"] for x in r.src_layer} == {0}
