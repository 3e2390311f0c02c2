"""Text corpora and token packing: documents from a source, split into train / held-out, packed into
rows of `context_size` tokens with BOS at each row start, deterministically for a seed."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.metadata
import itertools
import json
import random
import sys
import sysconfig
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from core.errors import UserError

if TYPE_CHECKING:
    from core.config import Config, CorpusConfig

Split = Literal["train", "heldout", "all"]

BUNDLED_DOCSTRINGS = "bundled:docstrings"
# Packages whose docstrings join the standard library's in the bundled corpus, in this order.
DOCSTRING_PACKAGES = ("numpy", "torch", "transformers", "pyarrow", "prefect")


class CorpusError(UserError, ValueError):
    """A corpus problem described in one line."""


# ---------------------------------------------------------------- sources


def iter_documents(source: str, text_column: str = "text", min_chars: int = 200, split: str = "train") -> Iterator[str]:
    """Yield the documents of a corpus source in a deterministic order, skipping short ones."""
    for text in _raw_documents(source, text_column, split):
        text = text.strip()
        if len(text) >= min_chars:
            yield text


def _raw_documents(source: str, text_column: str, split: str) -> Iterator[str]:
    if source == BUNDLED_DOCSTRINGS:
        yield from _DOCSTRINGS
        return
    if source.startswith("bundled:"):
        raise CorpusError(f"corpus {source!r}: unknown bundled corpus; the bundled corpus is {BUNDLED_DOCSTRINGS!r}")
    if source.startswith("hf:"):
        yield from _hf_documents(source[3:], text_column, split)
        return
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in {".txt", ".md"} and p.is_file())
        if not files:
            raise CorpusError(f"corpus {source!r}: the folder holds no .txt or .md files")
        for file in files:
            yield file.read_text(errors="replace")
    elif path.suffix == ".jsonl" and path.is_file():
        yield from _jsonl_documents(path, text_column)
    elif path.suffix == ".parquet" and path.is_file():
        yield from _parquet_documents(path, text_column)
    elif path.exists():
        raise CorpusError(f"corpus {source!r}: expected a folder of .txt files, a .jsonl or .parquet file")
    else:
        raise CorpusError(
            f"corpus {source!r}: no such file or folder; use a folder of .txt files, a .jsonl/.parquet file, "
            f"hf:<dataset id> or {BUNDLED_DOCSTRINGS}"
        )


def _jsonl_documents(path: Path, text_column: str) -> Iterator[str]:
    with open(path) as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise CorpusError(f"{path}:{i}: not valid JSON") from None
            if text_column not in record:
                raise CorpusError(f"{path}:{i}: no {text_column!r} field; set corpus.text_column")
            yield str(record[text_column])


def _parquet_documents(path: Path, text_column: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    if text_column not in schema.names:
        raise CorpusError(
            f"{path}: no column {text_column!r} (columns: {', '.join(schema.names)}); set corpus.text_column"
        )
    table = pq.read_table(path, columns=[text_column])
    for value in table.column(text_column).to_pylist():
        if value is not None:
            yield str(value)


def _hf_documents(dataset_id: str, text_column: str, split: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise CorpusError("hf: corpora need the `datasets` package: pip install datasets") from None
    try:
        stream = datasets.load_dataset(dataset_id, split=split, streaming=True)
    except Exception as exc:  # network or unknown id
        raise CorpusError(
            f"hf:{dataset_id}: could not open the dataset ({type(exc).__name__}); it needs the hub"
        ) from None
    for record in stream:
        yield str(record[text_column])


def _docstring_documents() -> Iterator[str]:
    """Python's pydoc topics, then docstrings of the standard library and DOCSTRING_PACKAGES,
    read with `ast` (never imported), files in sorted order."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]
    for file in _docstring_files():
        yield from _file_docstrings(file)


class _ReadOnce:
    """The items of a generator that yields the same sequence every time in a process (the bundled
    docstrings: the installed files do not change under a running process), read at most once: each
    iteration replays what earlier ones read and continues the generator from there; a read that
    raises leaves the next one to a fresh generator. The tokens stage reads the corpus once per split."""

    def __init__(self, make: Callable[[], Iterator[str]]) -> None:
        self.make, self.items, self.source, self.done = make, [], None, False
        self.lock = threading.Lock()

    def __iter__(self) -> Iterator[str]:
        for i in itertools.count():
            with self.lock:
                if i == len(self.items) and not self._read_one():
                    return
                item = self.items[i]
            yield item

    def _read_one(self) -> bool:
        if self.done:
            return False
        if self.source is None:  # a fresh generator, past what earlier ones read
            self.source = itertools.islice(self.make(), len(self.items), None)
        try:
            self.items.append(next(self.source))
        except StopIteration:
            self.done = True
        except BaseException:  # an interrupted read (cancellation, memory) ends that generator, not the corpus
            self.source = None
            raise
        return not self.done


_DOCSTRINGS = _ReadOnce(_docstring_documents)


def _docstring_files() -> Iterator[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    yield from sorted(stdlib.glob("*.py"))
    skip = {"site-packages", "test", "idlelib", "lib2to3", "tkinter", "turtledemo"}
    roots = [p for p in sorted(stdlib.iterdir()) if p.is_dir() and p.name not in skip]
    for package in DOCSTRING_PACKAGES:
        try:
            roots.append(Path(str(importlib.metadata.distribution(package).locate_file(package))))
        except importlib.metadata.PackageNotFoundError:
            continue
    for root in roots:
        for file in sorted(root.rglob("*.py")):
            if "test" not in file.relative_to(root).as_posix().lower():
                yield file


def _file_docstrings(file: Path) -> Iterator[str]:
    try:
        tree = ast.parse(file.read_bytes())
    except (SyntaxError, ValueError, OSError):
        return
    for node in _statements(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield doc


_HOLDS_STATEMENTS = (ast.stmt, ast.excepthandler, ast.match_case)
"""Node types whose subtrees can hold a definition: statements, except clauses, match cases."""


def _statements(tree: ast.Module) -> Iterator[ast.AST]:
    """The module and every statement in it, in `ast.walk`'s breadth-first order, without visiting
    expressions: definitions (the nodes that hold docstrings) only ever sit in statement bodies, so
    skipping expression subtrees keeps their order and spares most of the walk."""
    queue = deque([tree])
    while queue:
        node = queue.popleft()
        queue.extend(c for c in ast.iter_child_nodes(node) if isinstance(c, _HOLDS_STATEMENTS))
        yield node


def corpus_fingerprint(source: str) -> dict[str, object]:
    """Cheap facts that change when the corpus content changes (part of the tokens stage key)."""
    if source == BUNDLED_DOCSTRINGS:
        versions = {"python": sys.version.split()[0]}
        for package in DOCSTRING_PACKAGES:
            try:
                versions[package] = importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:
                versions[package] = None
        return {"source": source, "versions": versions}
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        digest = hashlib.sha256()
        for f in files:
            stat = f.stat()
            digest.update(f"{f.relative_to(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return {"source": str(path.resolve()), "files": digest.hexdigest()[:16]}
    if path.is_file():
        stat = path.stat()
        return {"source": str(path.resolve()), "size": stat.st_size, "mtime": stat.st_mtime_ns}
    return {"source": source}


# ---------------------------------------------------------------- splitting and packing


def in_heldout(text: str, holdout_fraction: float) -> bool:
    """Deterministic document-level split by content hash."""
    h = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    return (h % 1_000_000) / 1_000_000 < holdout_fraction


def in_split(doc: str, split: Split, holdout_fraction: float) -> bool:
    """Whether a document belongs to a split ("all" holds every document)."""
    return split == "all" or in_heldout(doc, holdout_fraction) == (split == "heldout")


def select_split(docs: Iterable[str], split: Split, holdout_fraction: float) -> Iterator[str]:
    for doc in docs:
        if in_split(doc, split, holdout_fraction):
            yield doc


def take(docs: Iterable[str], max_docs: int | None) -> Iterator[str]:
    """The first max_docs documents (all when None)."""
    for i, doc in enumerate(docs):
        if max_docs is not None and i >= max_docs:
            return
        yield doc


def shuffled(docs: Iterable[str], seed: int) -> list[str]:
    """The documents in an order shuffled by a seeded RNG."""
    taken = list(docs)
    random.Random(seed).shuffle(taken)
    return taken


def pack_rows(
    token_docs: Iterable[list[int]], n_rows: int, context_size: int, bos_id: int, sep_id: int | None = None
) -> np.ndarray:
    """Concatenate tokenised documents (separated by `sep_id`, default BOS) and cut the stream into
    rows of `context_size` tokens, each starting with BOS. Returns int32 [n_rows, context_size]."""
    sep = bos_id if sep_id is None else sep_id
    body = context_size - 1
    rows = np.empty((n_rows, context_size), dtype=np.int32)
    rows[:, 0] = bos_id
    buffer: list[int] = []
    filled = 0
    for doc in token_docs:
        buffer.extend(doc)
        buffer.append(sep)
        while len(buffer) >= body and filled < n_rows:
            rows[filled, 1:] = buffer[:body]
            buffer = buffer[body:]
            filled += 1
        if filled == n_rows:
            return rows
    raise CorpusError(
        f"the corpus yields only {filled} rows of {context_size} tokens but {n_rows} are needed; "
        "add text, raise corpus.max_docs, or lower tokens.train_rows / tokens.mine_rows"
    )


def count_rows(
    docs: Iterable[str],
    tokenizer,
    needed: Mapping[Split, int],
    context_size: int,
    holdout_fraction: float,
    batch_docs: int = 64,
) -> dict[Split, int]:
    """Rows of `context_size` tokens each split of `docs` packs into (as `pack_rows` packs them: each
    document adds its tokens plus a separator, each row takes `context_size - 1`), tokenising only until
    every split has its `needed` rows. Exact for a split that falls short; at least its need otherwise."""
    body = context_size - 1
    tokens = dict.fromkeys(needed, 0)
    batch: list[tuple[str, list[Split]]] = []

    def short() -> list[Split]:
        return [split for split, rows in needed.items() if tokens[split] < rows * body]

    def count(batch: list[tuple[str, list[Split]]]) -> None:
        ids = tokenizer([doc for doc, _ in batch], add_special_tokens=False)["input_ids"]
        for (_, splits), doc_ids in zip(batch, ids, strict=True):
            for split in splits:
                tokens[split] += len(doc_ids) + 1

    for doc in docs:
        wanting = short()
        if not wanting:
            break
        splits = [split for split in wanting if in_split(doc, split, holdout_fraction)]
        if splits:
            batch.append((doc, splits))
        if len(batch) == batch_docs:
            count(batch)
            batch = []
    if batch:
        count(batch)
    return {split: n // body for split, n in tokens.items()}


def tokenize_and_pack(docs: list[str], tokenizer, n_rows: int, context_size: int, batch_docs: int = 256) -> np.ndarray:
    """Tokenise documents (no special tokens) lazily in batches and pack them into rows."""
    bos = tokenizer.bos_token_id
    if bos is None:
        raise CorpusError("the tokenizer has no BOS token; set one (tokenizer.bos_token) to pack rows")

    def token_docs() -> Iterator[list[int]]:
        for start in range(0, len(docs), batch_docs):
            batch = docs[start : start + batch_docs]
            yield from tokenizer(batch, add_special_tokens=False)["input_ids"]

    if not docs:
        raise CorpusError("the corpus has no documents after filtering; check corpus.source and corpus.min_chars")
    return pack_rows(token_docs(), n_rows, context_size, bos)


def mine_corpus(cfg: Config) -> tuple[CorpusConfig, str]:
    """The corpus and split the mining tokens come from: the held-out split by default, all of
    `mine.corpus` when one is set."""
    if cfg.mine.corpus is None:
        return cfg.corpus, "heldout"
    return dataclasses.replace(cfg.corpus, source=cfg.mine.corpus), "all"
