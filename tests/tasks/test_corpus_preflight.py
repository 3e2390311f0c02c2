"""The pre-flight corpus size check (tasks.plan.check_corpus_size over core.corpus.count_rows): the rows it
counts are exactly what the tokens stage's packer can fill, it stops reading once every split has enough, and a
corpus too small is one ConfigError naming the rows found and what to change, before any model is loaded."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from core import model
from core.config import Config, ConfigError, load_config
from core.corpus import CorpusError, count_rows, select_split, tokenize_and_pack
from storage import layout
from tasks import plan as planning

CONTEXT = 32
HOLDOUT = 0.25
WORDS = "the a transcoder reads sparse features of each layer and predicts outputs from inputs".split()


def documents(n: int, seed: int = 0) -> list[str]:
    """Seeded documents of 5-80 words (so the two splits and the packing boundaries vary)."""
    rng = random.Random(seed)
    return [f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 80))) for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    return model.load_tokenizer("tiny:ln")


@pytest.mark.parametrize("split", ["train", "heldout", "all"])
def test_counted_rows_are_exactly_what_packing_fills(tokenizer, split: str) -> None:
    """With a need no corpus meets the count is exact: packing that many rows works, one more fails."""
    docs = documents(120)
    rows = count_rows(docs, tokenizer, {split: 10**9}, CONTEXT, HOLDOUT, batch_docs=7)[split]
    chosen = list(select_split(docs, split, HOLDOUT))
    assert rows > 5
    assert tokenize_and_pack(chosen, tokenizer, rows, CONTEXT).shape == (rows, CONTEXT)
    with pytest.raises(CorpusError, match=f"yields only {rows} rows"):
        tokenize_and_pack(chosen, tokenizer, rows + 1, CONTEXT)


def test_counting_stops_once_every_split_has_enough(tokenizer) -> None:
    read = [0]

    def stream() -> Iterator[str]:
        for doc in documents(2000):
            read[0] += 1
            yield doc

    rows = count_rows(stream(), tokenizer, {"train": 3, "heldout": 2}, CONTEXT, HOLDOUT, batch_docs=4)
    assert rows["train"] >= 3 and rows["heldout"] >= 2
    assert read[0] < 60, f"read {read[0]} of 2000 documents for 5 rows"


def write_corpus(folder: Path, n: int) -> Path:
    folder.mkdir()
    for i, doc in enumerate(documents(n)):
        (folder / f"d{i:03d}.txt").write_text(doc)
    return folder


def config(tmp_path: Path, n_docs: int = 40, **sets: int) -> Config:
    """The tiny model over `n_docs` documents; `sets` are dotted overrides (`tokens__train_rows=5`)."""
    corpus = write_corpus(tmp_path / "corpus", n_docs)
    base = [f"corpus.source={corpus}", "corpus.min_chars=1", f"store.root={tmp_path / 'store'}", "model.name=tiny:ln"]
    base += [f"tokens.context_size={CONTEXT}", f"tokens.holdout_fraction={HOLDOUT}", "tokens.mine_rows=2"]
    return load_config(None, base + [f"{k.replace('__', '.')}={v}" for k, v in sets.items()])


def exact_rows(cfg: Config, split: str, tokenizer) -> int:
    docs = [p.read_text().strip() for p in sorted(Path(cfg.corpus.source).glob("*.txt"))][: cfg.corpus.max_docs]
    return count_rows(docs, tokenizer, {split: 10**9}, CONTEXT, HOLDOUT)[split]


def test_a_corpus_too_small_for_train_rows_is_one_line(tmp_path, tokenizer) -> None:
    cfg = config(tmp_path, tokens__train_rows=5000)
    with pytest.raises(ConfigError) as err:
        planning.check_corpus_size(cfg)
    found = exact_rows(cfg, "train", tokenizer)
    message = str(err.value)
    assert "\n" not in message and message.startswith(
        f"tokens.train_rows: the corpus yields only {found} rows of {CONTEXT} tokens but 5000 are needed"
    ), message
    assert message.endswith("add text or lower tokens.train_rows"), message  # max_docs (4000) did not stop it


def test_a_held_out_split_too_small_names_the_holdout_fraction(tmp_path, tokenizer) -> None:
    cfg = config(tmp_path, 30, tokens__train_rows=2, tokens__mine_rows=900, corpus__max_docs=30)
    with pytest.raises(ConfigError) as err:
        planning.check_corpus_size(cfg)
    found = exact_rows(cfg, "heldout", tokenizer)
    message = str(err.value)
    assert message.startswith(f"tokens.mine_rows: the corpus yields only {found} rows of {CONTEXT} tokens"), message
    assert message.endswith("raise tokens.holdout_fraction or corpus.max_docs or lower tokens.mine_rows"), message


def test_the_check_runs_once_and_not_at_all_when_the_tokens_exist(tmp_path, monkeypatch) -> None:
    cfg = config(tmp_path, tokens__train_rows=4)
    planning.check_corpus_size(cfg)  # large enough
    monkeypatch.setattr(model, "load_tokenizer", _no_tokenizer)
    planning.check_corpus_size(cfg)  # remembered in this process: no tokenizer again
    monkeypatch.setattr(planning, "_SIZE_CHECKED", set())
    with pytest.raises(RuntimeError, match="tokenizer loaded"):
        planning.check_corpus_size(cfg)
    keys = planning.make_plan(cfg)
    for key in (keys.tokens_train, keys.tokens_mine):
        folder = layout.stage_dir(cfg.store.root, "tokens", key)
        folder.mkdir(parents=True)
        layout.write_json_atomic(folder / layout.MANIFEST, {"stage": "tokens"})
    planning.check_corpus_size(cfg)  # both artifacts exist: nothing to count


def _no_tokenizer(spec: str):
    raise RuntimeError("tokenizer loaded")
