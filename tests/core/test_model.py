"""Model loading: tiny random models, local folders, the bundled SmolLM2 against transformers' own
GGUF loader (the independent reference), tokenizers, and one-line errors for bad specs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from core.model import (
    CACHE_ENV,
    ModelSpecError,
    ModelUnavailableError,
    bundled_gguf_path,
    load_model,
    load_tokenizer,
    model_info,
    resolve_device,
    unpermute_rotary_rows,
)
from core.tokenizer import byte_level_tokenizer

TINY = ["tiny:ln", "tiny:rms", "tiny:rms-gqa"]
BUNDLED = "bundled:smollm2-135m"

# Relative logit tolerance vs transformers: max |ours - ref| / max |ref| (measured ~2e-6 in float32).
LOGIT_RTOL = 2e-5

PROSE = (
    "The river runs through the middle of the old town, and on summer evenings people gather along its banks "
    "to walk, talk and watch the light fade over the water. Small boats drift past the stone bridges while "
    "children feed the ducks near the market square. Most of the houses here were built more than two hundred "
    "years ago, and many families have lived in them for generations. Visitors often say that the town feels "
    "calm and friendly, a place where time seems to move a little more slowly than in the busy cities nearby."
)

TOKENIZER_TEXTS = [
    PROSE,
    "def area(radius: float) -> float:\n    return 3.14159 * radius ** 2  # circle\n\n\tpass\n",
    "In 2024 we sold 1,234,567 units at $19.99 (v2.3.4, id 0x1F, 12345678901234567890).",
    "Ünïcödé: 日本語のテキスト, emoji 🤖🎉, Ελληνικά, naïve café",
    "   leading,    multiple   spaces\n\n\n and trailing  \t",
    "<|im_start|>user\nHello<|im_end|>",
]


def mlp_inputs(model, tokens: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hook_normalized at ln2 of `layer`, the tensor the MLP module actually receives)."""
    seen: list[torch.Tensor] = []
    handle = model.blocks[layer].mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        _, cache = model.run_with_cache(tokens, names_filter=f"blocks.{layer}.ln2.hook_normalized")
    finally:
        handle.remove()
    return cache[f"blocks.{layer}.ln2.hook_normalized"], seen[0]


def centered(logits: torch.Tensor) -> torch.Tensor:
    """Logits minus their vocabulary mean: what a model with a centred unembedding outputs."""
    return logits - logits.mean(-1, keepdim=True)


# ---------------------------------------------------------------- tiny models


@pytest.mark.parametrize("spec", TINY)
def test_tiny_presets_run_and_are_deterministic(spec: str) -> None:
    first, second = load_model(spec, device="cpu"), load_model(spec, device="cpu")
    tokens = first.to_tokens("hello tiny world")
    assert tokens[0, 0].item() == 256 and tokens.shape == (1, 17)
    with torch.no_grad():
        logits = first(tokens)
        assert torch.equal(logits, second(tokens))
    assert logits.shape == (1, 17, 257) and torch.isfinite(logits).all()
    info = model_info(spec)
    assert (info.n_layers, info.d_model, info.d_vocab) == (first.cfg.n_layers, first.cfg.d_model, 257)


def test_tiny_presets_have_their_architecture() -> None:
    ln, rms, gqa = (load_model(spec, device="cpu").cfg for spec in TINY)
    assert ln.normalization_type == "LNPre" and ln.positional_embedding_type == "standard" and ln.act_fn == "gelu"
    assert rms.normalization_type == "RMSPre" and rms.positional_embedding_type == "rotary" and rms.gated_mlp
    assert gqa.n_key_value_heads is not None and gqa.n_key_value_heads < gqa.n_heads


def test_tiny_json_overrides_and_seed() -> None:
    model = load_model('tiny:{"preset":"ln","n_layers":3,"seed":1}', device="cpu")
    assert model.cfg.n_layers == 3
    other = load_model("tiny:ln", device="cpu")
    assert not torch.equal(model.W_E, other.W_E)
    assert model_info('tiny:{"preset":"rms","d_model":48,"d_head":12}').d_model == 48


def test_tiny_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model("tiny:rms", device="cpu")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("spec", TINY)
@pytest.mark.parametrize("layer", [0, 1])
def test_hook_normalized_is_the_mlp_input(spec: str, layer: int) -> None:
    model = load_model(spec, device="cpu")
    hooked, actual = mlp_inputs(model, model.to_tokens(["the MLP input", "is what it reads"]), layer)
    torch.testing.assert_close(hooked, actual, rtol=0, atol=0)


def test_dtype_and_device() -> None:
    model = load_model("tiny:rms", device="cpu", dtype="float64")
    assert model.W_E.dtype == torch.float64 and model.cfg.dtype == torch.float64
    assert model(model.to_tokens("x")).dtype == torch.float64
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------- tokenizers


def test_byte_level_tokenizer() -> None:
    tokenizer = byte_level_tokenizer()
    text = "héllo ✓\n\t<x>"
    ids = tokenizer(text)["input_ids"]
    assert ids == list(text.encode()) and len(tokenizer) == 257
    assert tokenizer.bos_token_id == 256 and tokenizer.decode(ids) == text
    assert tokenizer.decode([256, *ids], skip_special_tokens=True) == text


def test_load_tokenizer_tiny_does_not_add_bos() -> None:
    tokenizer = load_tokenizer("tiny:ln")
    assert tokenizer("ab")["input_ids"] == [97, 98] and tokenizer.bos_token == "<|bos|>"


# ---------------------------------------------------------------- local Hugging Face folders


def test_local_folder_matches_transformers(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "my-llama"  # "llama" in the path: TL 3.9 would guess from the name
    config = LlamaConfig(
        vocab_size=257,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=256,
        eos_token_id=256,
    )
    torch.manual_seed(0)
    reference = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    reference.save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)

    model = load_model(str(folder), device="cpu")
    tokens = model.to_tokens("a local folder")
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), centered(reference(tokens).logits), rtol=1e-5, atol=1e-5)
    hooked, actual = mlp_inputs(model, tokens, 1)
    torch.testing.assert_close(hooked, actual, rtol=0, atol=0)
    info = model_info(str(folder))
    assert (info.n_layers, info.d_model, info.d_mlp, info.normalization, info.name) == (2, 32, 64, "RMS", "my-llama")


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "tiny:nope",
        "tiny:{not json",
        'tiny:{"preset":"ln","bogus_field":1}',
        'tiny:{"preset":"ln","d_vocab":300}',
        "bundled:nope",
        "/no/such/folder",
        "./missing",
        "hub:gpt2",
        "not-a-transformerlens-model-xyz",
    ],
)
def test_bad_specs_raise_one_line_value_errors(spec: str) -> None:
    for call in (model_info, load_tokenizer, load_model):
        with pytest.raises(ValueError) as err:
            call(spec)
        assert isinstance(err.value, ModelSpecError) and "\n" not in str(err.value), str(err.value)


def test_unreadable_folder_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"architectures": ["NoSuchForCausalLM"], "model_type": "nope"}')
    for call in (model_info, load_tokenizer, load_model):
        with pytest.raises(ModelSpecError, match="not a loadable Hugging Face model folder") as err:
            call(str(tmp_path))
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("bad", [{"device": "gpu"}, {"device": "cuda:x"}, {"dtype": "float8"}])
def test_bad_device_and_dtype(bad: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="expected"):
        load_model("tiny:ln", **bad)


def test_unreachable_hub_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # no traffic: fail as an unreachable hub does
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    for call in (model_info, load_tokenizer, load_model):
        with pytest.raises(ModelUnavailableError) as err:
            call("gpt2")
        message = str(err.value)
        assert isinstance(err.value, RuntimeError) and "\n" not in message
        assert "unreachable" in message and "bundled:smollm2-135m" in message and "model: /path" in message


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    n_heads, d_head, d_model = 3, 8, 5
    hf_rows = np.arange(n_heads * d_head * d_model, dtype=np.float32).reshape(n_heads * d_head, d_model)
    # llama.cpp's converter: per head, rows (2, d_head/2) -> (d_head/2, 2)
    gguf_rows = hf_rows.reshape(n_heads, 2, d_head // 2, d_model).swapaxes(1, 2).reshape(hf_rows.shape)
    assert np.array_equal(unpermute_rotary_rows(gguf_rows, n_heads), hf_rows)


# ---------------------------------------------------------------- the bundled model


@pytest.fixture(scope="module")
def bundled(tmp_path_factory: pytest.TempPathFactory):
    """(cold model converted from the GGUF, warm model from the cache it wrote, cache folder)."""
    cache = tmp_path_factory.mktemp("circuitflow-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(cache))
        cold = load_model(BUNDLED, device="cpu")
        warm = load_model(BUNDLED, device="cpu")
    return cold, warm, cache


@pytest.fixture(scope="module")
def reference():
    """transformers' own GGUF loader: (model, tokenizer), independent of our conversion."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = bundled_gguf_path(BUNDLED)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tokenizer


@pytest.mark.bundled
def test_bundled_cache_round_trip(bundled) -> None:
    cold, warm, cache = bundled
    cold_params, warm_params = dict(cold.named_parameters()), dict(warm.named_parameters())
    assert cold_params.keys() == warm_params.keys()
    assert all(torch.equal(cold_params[name], warm_params[name]) for name in cold_params)
    files = sorted(p.name for p in (cache / "models").iterdir())
    assert any(f.endswith(".safetensors") for f in files) and not any(".tmp-" in f for f in files)
    assert warm.cfg.normalization_type == "RMSPre" and warm.cfg.model_name == "SmolLM2-135M-Instruct"


@pytest.mark.bundled
def test_bundled_shapes_and_info(bundled) -> None:
    _, warm, _ = bundled
    info = model_info(BUNDLED)
    assert tuple(info) == (30, 576, 1536, 49152, 8192, "RMS", "SmolLM2-135M-Instruct")
    cfg = warm.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.d_mlp, cfg.n_heads, cfg.n_key_value_heads) == (30, 576, 1536, 9, 3)


@pytest.mark.bundled
def test_bundled_logits_match_transformers(bundled, reference) -> None:
    _, model, _ = bundled
    hf_model, _ = reference
    for prompt in ["The capital of France is", "def add(a, b):\n    return a +", "Once upon a time, there"]:
        tokens = model.to_tokens(prompt)
        with torch.no_grad():
            ours, theirs = model(tokens), centered(hf_model(tokens).logits)
        assert (ours - theirs).abs().max() <= LOGIT_RTOL * theirs.abs().max()
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.bundled
def test_bundled_tokenizer_matches_transformers(reference) -> None:
    _, hf_tokenizer = reference
    ours = load_tokenizer(BUNDLED)
    assert ours.bos_token == hf_tokenizer.bos_token == "<|im_start|>" and len(ours) == 49152
    for text in TOKENIZER_TEXTS:
        ids = ours(text)["input_ids"]
        assert ids == hf_tokenizer(text)["input_ids"], text
        assert ours.decode(ids) == text


@pytest.mark.bundled
def test_bundled_tokenizer_splits_every_number_like_smollm2() -> None:
    """SmolLM2 (and llama.cpp's "smollm" pre-tokenizer) isolate every Unicode number code point;
    transformers' GGUF loader keeps " ½" whole, so here we follow SmolLM2, not that reference."""
    tokenizer = load_tokenizer(BUNDLED)
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(" 2024 ½")["input_ids"])
    assert pieces == ["Ġ", "2", "0", "2", "4", "Ġ", "Â½"]


@pytest.mark.bundled
def test_bundled_scores_english_prose(bundled) -> None:
    _, model, _ = bundled
    tokens = model.to_tokens(PROSE)
    assert 90 <= tokens.shape[1] <= 130
    with torch.no_grad():
        loss = model(tokens, return_type="loss").item()
    assert loss < 4.5, loss


@pytest.mark.bundled
@pytest.mark.parametrize("layer", [0, 3])
def test_bundled_hook_normalized_is_the_mlp_input(bundled, layer: int) -> None:
    _, model, _ = bundled
    hooked, actual = mlp_inputs(model, model.to_tokens("Folded norms make the hook exact."), layer)
    torch.testing.assert_close(hooked, actual, rtol=0, atol=0)


def test_cache_env_is_respected(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from core.model import cache_dir

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv(CACHE_ENV)
    assert cache_dir() == Path(os.path.expanduser("~")) / ".cache" / "circuitflow"
