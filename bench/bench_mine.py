"""Mining on the bundled model with transcoders on layers 0-3 (d_sae = 4 x 576): mining time against
the forward pass + encode alone, Parquet bytes per non-zero, SQL latency of one feature's top
examples, and a top-k per feature over the whole feature_acts table in DuckDB.

    .venv/bin/python -m bench.bench_mine [--quick]

Transcoders: the trained ones of the latest run of $CIRCUITFLOW_BENCH_STORE (default ./store) when present, else random-init ones whose
encoder bias is set so each feature fires on ~64/2304 of tokens (L0 ~ 64, a trained-like sparsity;
a zero bias would fire half of all features on every token).
"""

from __future__ import annotations

import itertools
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench import common
from core.config import ActivationsConfig, Config, MineConfig, StoreConfig
from core.corpus import iter_documents, pack_rows
from core.mining import mlp_inputs
from core.model import load_model, load_tokenizer
from core.transcoder import Transcoder, TranscoderConfig, init_transcoder
from storage import catalog, layout, tables
from tasks import mine as mine_task

MODEL = "bundled:smollm2-135m"
LAYERS = (0, 1, 2, 3)
TARGET_L0 = 64


def mining_rows(n_rows: int, context: int = 128) -> tuple[np.ndarray, int, list[str]]:
    """Token rows from the bundled docstring corpus (pydoc topics first), BOS id, vocab texts."""
    tok = load_tokenizer(MODEL)
    docs = itertools.islice(iter_documents("bundled:docstrings"), 4000)
    ids = (tok(d, add_special_tokens=False)["input_ids"] for d in docs)
    rows = pack_rows(ids, n_rows, context, tok.bos_token_id)
    vocab = tok.batch_decode([[i] for i in range(len(tok))])
    return rows, tok.bos_token_id, vocab


def random_transcoders(model, rows: np.ndarray, bos: int) -> dict[int, Transcoder]:
    """Kaiming-init transcoders with b_enc at each feature's (1 - L0/d_sae) pre-activation quantile."""
    d = model.cfg.d_model
    out = {}
    calib = torch.as_tensor(rows[:8], dtype=torch.long)
    inputs = mlp_inputs(model, calib, {x: f"blocks.{x}.ln2.hook_normalized" for x in LAYERS})
    keep = (calib != bos).reshape(-1)
    for x in LAYERS:
        cfg = TranscoderConfig(d, 4 * d, d, layer=x, hook_in=f"blocks.{x}.ln2.hook_normalized", model_name=MODEL)
        tc = init_transcoder(cfg, seed=x)
        with torch.no_grad():
            pre = tc.pre_acts(inputs[x].reshape(-1, d)[keep])
            tc.b_enc.copy_(-torch.quantile(pre, 1 - TARGET_L0 / cfg.d_sae, dim=0))
        out[x] = tc
    return out


class PairedReference:
    """Times "forward + encode alone" on every batch right next to the mining run's own forward pass
    (alternating which goes first), so both see the same machine load; that time is excluded from
    the mining time."""

    def __init__(self, transcoders: dict[int, Transcoder]):
        self.transcoders = transcoders
        self.seconds = 0.0
        self.calls = 0

    def reference(self, original, model, tokens, hooks) -> None:
        start = time.perf_counter()
        inputs = original(model, tokens, hooks)
        with torch.inference_mode():
            for x, tc in self.transcoders.items():
                tc.encode(inputs[x].to(tc.dtype))
        self.seconds += time.perf_counter() - start

    def patch(self):
        """Wrap core.mining.mlp_inputs; returns a function that undoes it."""
        import core.mining as mining

        original = mining.mlp_inputs

        def paired(model, tokens, hooks):
            self.calls += 1
            if self.calls % 2:
                self.reference(original, model, tokens, hooks)
                return original(model, tokens, hooks)
            out = original(model, tokens, hooks)
            self.reference(original, model, tokens, hooks)
            return out

        mining.mlp_inputs = paired
        return lambda: setattr(mining, "mlp_inputs", original)


class Stopwatch:
    """Accumulates the seconds spent in wrapped functions (the mining overhead, measured directly)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.depth = 0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            self.depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
                if self.depth == 0:  # nested calls (add -> flush) count once
                    self.seconds += time.perf_counter() - start

        return timed


def write_tokens(root: Path, rows: np.ndarray, vocab: list[str], bos: int) -> None:
    d = layout.stage_dir(root, "tokens", "bench")
    tables.write_table(tables.tokens_table(rows), d / "tokens.parquet")
    tables.write_table(tables.vocab_table(vocab), d / "vocab.parquet")
    layout.write_json_atomic(d / layout.MANIFEST, {"stage": "tokens", "bos_token_id": bos})


def time_overhead(watch: Stopwatch):
    """Time every call of the pass-1 overhead functions; returns a function that undoes it."""
    import core.mining as mining

    saved = {
        (mining, "batch_nonzeros"): mining.batch_nonzeros,
        (mining.RunBuffer, "add"): mining.RunBuffer.add,
        (mining.RunBuffer, "flush"): mining.RunBuffer.flush,
        (mine_task.tables, "write_feature_acts"): mine_task.tables.write_feature_acts,
    }
    for (owner, name), fn in saved.items():
        setattr(owner, name, watch.wrap(fn))

    def undo() -> None:
        for (owner, name), fn in saved.items():
            setattr(owner, name, fn)

    return undo


def sql_latency(root: Path, features: list[tuple[int, int]]) -> tuple[float, float, float]:
    """Median ms of one feature's top examples (plain, and with context text), and ms to connect."""
    start = time.perf_counter()
    con = catalog.connect(root)
    connect_ms = (time.perf_counter() - start) * 1000
    plain, with_text = [], []
    for sql, sink in (
        (
            "select band, rank, row, pos, act from top_examples where layer = ? and feature = ? order by band, rank",
            plain,
        ),
        (
            "select band, rank, act, context(row, pos) from top_examples where layer = ? and feature = ? order by band, rank",
            with_text,
        ),
    ):
        con.execute(sql, list(features[0])).fetchall()  # warm
        for layer, feature in features:
            t = time.perf_counter()
            con.execute(sql, [layer, feature]).fetchall()
            sink.append((time.perf_counter() - t) * 1000)
    con.close()
    return statistics.median(plain), statistics.median(with_text), connect_ms


def topk_over_table(root: Path, k: int) -> tuple[float, int]:
    con = catalog.connect(root)
    sql = (
        "select count(*) from (select layer, feature, row, pos, act, row_number() over "
        f"(partition by layer, feature order by act desc, row, pos) as rk from feature_acts) where rk <= {k}"
    )
    start = time.perf_counter()
    n = con.execute(sql).fetchall()[0][0]
    seconds = time.perf_counter() - start
    con.close()
    return seconds, n


def run(quick: bool = False) -> list[dict]:
    n_rows = 32 if quick else 256
    cfg = Config(activations=ActivationsConfig(layers=LAYERS), mine=MineConfig(), store=StoreConfig(root="unused"))
    model = load_model(MODEL, "cpu", "float32")
    rows, bos, vocab = mining_rows(n_rows)
    transcoders = common.trained_transcoders(LAYERS)
    kind = f"trained ({common.store()})" if transcoders else f"random-init, L0~{TARGET_L0}"
    transcoders = transcoders or random_transcoders(model, rows, bos)
    root = Path(tempfile.mkdtemp(prefix="bench-mine-"))
    try:
        write_tokens(root, rows, vocab, bos)
        out = layout.stage_dir(root, "mine", "bench")
        out.mkdir(parents=True)
        batch = cfg.mine.batch_rows
        overhead = Stopwatch()  # time in extraction, sorting and writing inside pass 1
        reference = PairedReference(transcoders)
        undo = [time_overhead(overhead), reference.patch()]
        start = time.perf_counter()
        try:
            counts = mine_task.extract(model, transcoders, rows, bos, batch, out)
        finally:
            for fn in undo:
                fn()
        extract_s = time.perf_counter() - start - reference.seconds  # the mining run's own time
        n_tokens = int((rows != bos).sum())
        start = time.perf_counter()
        mine_task.summarize(cfg, transcoders, out, n_tokens)
        summarize_s = time.perf_counter() - start
        ratio = (extract_s + summarize_s) / reference.seconds
        in_run = (extract_s + summarize_s) / (extract_s - overhead.seconds)  # residual = forward + encode
        start = time.perf_counter()
        mine_task.views(cfg, model, transcoders, out)
        views_s = time.perf_counter() - start
        plan = {"tokens_mine": "bench", "tokens_train": "bench", "train": {}, "mine": "bench"}
        start = time.perf_counter()
        mine_task.dashboards(Config(**{**cfg.__dict__, "store": StoreConfig(root=str(root))}), plan, out)
        dash_s = time.perf_counter() - start
        layout.write_json_atomic(out / layout.MANIFEST, {"stage": "mine"})
        (root / "runs").mkdir()
        layout.write_json_atomic(root / "runs" / "latest.json", {"plan": plan})
        nnz = sum(counts.values())
        acts_bytes = sum(p.stat().st_size for p in (out / "feature_acts").rglob("*.parquet"))
        rng = np.random.default_rng(0)
        probe = [(int(rng.choice(LAYERS)), int(rng.integers(0, transcoders[0].cfg.d_sae))) for _ in range(20)]
        plain_ms, text_ms, connect_ms = sql_latency(root, probe)
        topk_s, topk_rows = topk_over_table(root, cfg.mine.top_k)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    tokens_note = f"{n_rows} rows x 128 = {rows.size} tokens, {kind} transcoders, {torch.get_num_threads()} threads"
    return [
        {
            "name": "mine_time_ratio",
            "value": ratio,
            "unit": "x",
            "target": "<= 1.25",
            "met": ratio <= 1.25,
            "note": f"mining {extract_s + summarize_s:.1f} s (pass 1 {extract_s:.1f} s of which extract+sort+write "
            f"{overhead.seconds:.1f} s, pass 2 {summarize_s:.1f} s) / forward+encode alone {reference.seconds:.1f} s, "
            f"timed batch by batch next to the mining run's own; pass-1 residual as denominator: {in_run:.3f}x; "
            f"load avg {os.getloadavg()[0]:.1f}; {tokens_note}",
        },
        {
            "name": "feature_acts_bytes_per_nonzero",
            "value": acts_bytes / nnz,
            "unit": "B",
            "target": "<= 6",
            "met": acts_bytes / nnz <= 6,
            "note": f"{nnz:,} non-zeros (L0 {nnz / n_tokens / len(LAYERS):.1f} per layer), {acts_bytes / 1e6:.1f} MB",
        },
        {
            "name": "sql_one_feature_top_examples",
            "value": plain_ms,
            "unit": "ms",
            "target": "< 50",
            "met": plain_ms < 50,
            "note": f"median of 20 features on an open connection; with context() text {text_ms:.1f} ms; connect {connect_ms:.0f} ms",
        },
        {
            "name": "sql_topk_per_feature_whole_table",
            "value": topk_s,
            "unit": "s",
            "target": "report",
            "met": None,
            "note": f"top-{cfg.mine.top_k} of every feature by window function over {nnz:,} rows -> {topk_rows:,} rows",
        },
        {
            "name": "mine_views_and_dashboards",
            "value": views_s + dash_s,
            "unit": "s",
            "target": "report",
            "met": None,
            "note": f"input-invariant views {views_s:.1f} s (vocab 49152 x 4 x 2304 features), index + pages {dash_s:.1f} s",
        },
    ]


if __name__ == "__main__":
    common.main(run, __doc__)
