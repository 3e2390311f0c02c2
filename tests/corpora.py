"""Tiny text corpora for tests that run the real stages: numbered documents of varied length."""

from __future__ import annotations

from pathlib import Path

PROSE = (
    "A transcoder reads the input of an MLP sublayer and predicts its output through a wide layer of "
    "sparse features. Researchers read those features one at a time, looking at the text that makes "
    "each one fire, and then follow how the features of early layers feed the features of later ones. "
)


def write_corpus(folder: Path, n_docs: int, text: str = PROSE, min_repeats: int = 1) -> Path:
    """`n_docs` files `docNN.txt`: "Document i. " then `text` repeated min_repeats + i % 3 times."""
    folder.mkdir(parents=True)
    for i in range(n_docs):
        (folder / f"doc{i:02d}.txt").write_text(f"Document {i}. " + text * (min_repeats + i % 3))
    return folder
