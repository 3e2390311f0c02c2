"""Corpus sources, the held-out split and row packing."""

from __future__ import annotations

import ast
import itertools
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.corpus import (
    CorpusError,
    _file_docstrings,
    _ReadOnce,
    iter_documents,
    pack_rows,
    select_split,
    shuffled,
    take,
)


def test_pack_rows_bos_and_order():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
    rows = pack_rows(iter(docs), n_rows=3, context_size=4, bos_id=0, sep_id=99)
    stream = [1, 2, 3, 99, 4, 5, 99, 6, 7]
    assert rows.dtype == np.int32
    assert (rows[:, 0] == 0).all()
    assert rows[:, 1:].reshape(-1).tolist() == stream


def test_pack_rows_too_small():
    with pytest.raises(CorpusError, match="yields only 1 rows of 4 tokens but 5 are needed"):
        pack_rows(iter([[1, 2, 3, 4]]), n_rows=5, context_size=4, bos_id=0)


def test_sources(tmp_path):
    folder = tmp_path / "txt"
    folder.mkdir()
    (folder / "b.txt").write_text("b" * 300)
    (folder / "a.txt").write_text("a" * 300)
    (folder / "short.txt").write_text("tiny")
    assert [d[0] for d in iter_documents(str(folder))] == ["a", "b"]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": c * 250}) for c in "xy"))
    assert [d[0] for d in iter_documents(str(jsonl), text_column="body")] == ["x", "y"]
    with pytest.raises(CorpusError, match="no 'text' field; set corpus.text_column"):
        list(iter_documents(str(jsonl)))
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["p" * 250, None, "q" * 250]}), parquet)
    assert [d[0] for d in iter_documents(str(parquet))] == ["p", "q"]
    with pytest.raises(CorpusError, match="no such file or folder"):
        list(iter_documents(str(tmp_path / "nope")))
    with pytest.raises(CorpusError, match="holds no .txt"):
        (tmp_path / "empty").mkdir()
        list(iter_documents(str(tmp_path / "empty")))


def test_split_is_disjoint_and_deterministic():
    docs = [f"document number {i} " * 20 for i in range(400)]
    train = list(select_split(docs, "train", 0.1))
    held = list(select_split(docs, "heldout", 0.1))
    assert not set(train) & set(held)
    assert len(train) + len(held) == 400
    assert 20 <= len(held) <= 70
    assert shuffled(take(docs, 50), 3) == shuffled(take(docs, 50), 3)
    assert shuffled(take(docs, 50), 3) != shuffled(take(docs, 50), 4)
    assert len(list(take(docs, 50))) == 50


def test_bundled_docstrings_are_english_prose():
    docs = list(take(iter_documents("bundled:docstrings"), 300))
    assert len(docs) == 300
    assert all(len(d) >= 200 for d in docs)
    text = " ".join(docs)
    assert text.count(" the ") > 500


NESTED = '''"""module"""
import os
class A:
    """class A"""
    def f(self):
        """method f"""
        def g():
            """inner g"""
        return lambda: [x for x in ()]
if os.name:
    def h():
        """h in an if"""
else:
    class B:
        """B in an else"""
try:
    async def k():
        """async k in a try"""
except OSError:
    def m():
        """m in an except"""
finally:
    with open(os.devnull) as fh:
        def n():
            """n in a with"""
for i in range(1):
    while False:
        def p():
            """p in a while in a for"""
match os.name:
    case "posix":
        def q():
            """q in a match case"""
def r(x=lambda: None):
    """r"""
'''


def test_file_docstrings_follow_ast_walk_order(tmp_path) -> None:
    """The pruned walk yields exactly ast.walk's docstrings, in its order (the corpus stays identical)."""
    source = tmp_path / "nested.py"
    source.write_text(NESTED)
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    expected = [ast.get_docstring(n) for n in ast.walk(ast.parse(NESTED)) if isinstance(n, kinds)]
    assert list(_file_docstrings(source)) == [d for d in expected if d]
    assert len(expected) == 12  # every definition above has a docstring


def test_read_once_replays_what_was_read_and_continues_the_generator() -> None:
    made: list[int] = []

    def make():
        made.append(1)
        yield from ["a", "b", "c"]

    docs = _ReadOnce(make)
    assert list(itertools.islice(docs, 2)) == ["a", "b"]
    assert list(docs) == ["a", "b", "c"]  # replays a, b; reads c
    assert list(docs) == ["a", "b", "c"]
    assert made == [1]


def test_an_interrupted_read_does_not_shorten_the_corpus() -> None:
    """A read that raises (a cancelled task, say) ends its generator; the next iteration reads on from a
    fresh one, past what was already read, and gets the whole corpus."""
    calls = [0]

    def make():
        calls[0] += 1
        yield "a"
        if calls[0] == 1:
            raise KeyboardInterrupt
        yield from ["b", "c"]

    docs = _ReadOnce(make)
    with pytest.raises(KeyboardInterrupt):
        list(docs)
    assert list(docs) == ["a", "b", "c"]
    assert calls == [2]
