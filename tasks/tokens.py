"""Stage `tokens`: read a corpus, split off held-out documents, pack token rows into Parquet."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from prefect import task

from core.config import Config
from core.corpus import (
    corpus_fingerprint,
    iter_documents,
    mine_corpus,
    select_split,
    shuffled,
    take,
    tokenize_and_pack,
)
from core.model import load_tokenizer
from storage.tables import tokens_table, vocab_table, write_table
from tasks.common import build_stage, cache_key, log


def build_tokens(cfg: Config, split: str, tmp: Path) -> dict[str, Any]:
    """Tokenise and pack one split of a corpus into `tmp`; return the manifest fields."""
    corpus = cfg.corpus if split == "train" else mine_corpus(cfg)[0]
    n_rows = cfg.tokens.train_rows if split == "train" else cfg.tokens.mine_rows
    tokenizer = load_tokenizer(cfg.model.name)
    docs = iter_documents(corpus.source, corpus.text_column, corpus.min_chars, corpus.split)
    docs = shuffled(select_split(take(docs, corpus.max_docs), split, cfg.tokens.holdout_fraction), cfg.tokens.seed)
    log(f"tokens[{split}]: {len(docs)} documents from {corpus.source}")
    rows = tokenize_and_pack(docs, tokenizer, n_rows, cfg.tokens.context_size)
    write_table(tokens_table(rows), tmp / "tokens.parquet")
    vocab = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    write_table(vocab_table(vocab), tmp / "vocab.parquet")
    return {
        "split": split,
        "rows": int(rows.shape[0]),
        "context_size": int(rows.shape[1]),
        "n_tokens": int(rows.size),
        "documents": len(docs),
        "corpus": dataclasses.asdict(corpus),
        "fingerprint": corpus_fingerprint(corpus.source),
        "tokenizer": cfg.model.name,
        "bos_token_id": tokenizer.bos_token_id,
    }


@task(name="tokenize_corpus", task_run_name="tokens-{split}", cache_key_fn=cache_key("tokens"), persist_result=True)
def tokenize_corpus(cfg: Config, split: str, key: str, force: bool = False) -> dict[str, Any]:
    """Prefect task: the tokens stage for one split ("train", "heldout" or "all")."""
    return build_stage(cfg.store.root, "tokens", key, lambda tmp: build_tokens(cfg, split, tmp), force)
