"""Stage `mine`: every non-zero feature activation of the held-out tokens into Parquet, per-feature
stats, top and banded examples, input-invariant views, and feature dashboards (docs/method.md section 4).

Pass 1 streams the model over the token rows and writes feature_acts runs sorted by feature;
pass 2 reads them back one bounded chunk of features at a time for stats and examples.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prefect import task
from prefect.context import TaskRunContext
from tqdm.auto import tqdm

from core.config import Config
from core.mining import RunBuffer, band_levels, stream_nonzeros, summarize_features
from core.transcoder import Transcoder
from core.views import feature_views
from storage import dashboard, dashboard_index, duck, layout, links, tables
from tasks.common import build_stage, cache_key, log
from tasks.feature_chunks import iter_feature_chunks
from tasks.transcoders import load_layer_transcoders

MAX_RUN_NONZEROS = 32_000_000
"""Non-zeros held per layer before a sorted run is written (about 14 bytes each)."""
MAX_CHUNK_NONZEROS = 8_000_000
"""Non-zeros read back at a time in pass 2."""


def _hooks(cfg: Config, transcoders: dict[int, Transcoder]) -> None:
    """Fill in a transcoder's input hook from the config when its file does not name one."""
    for layer, tc in transcoders.items():
        if not tc.cfg.hook_in:
            tc.cfg = tc.cfg.with_(hook_in=cfg.activations.hook_in.format(layer=layer))


def extract(
    model,
    transcoders: dict[int, Transcoder],
    rows: np.ndarray,
    bos_id: int | None,
    batch_rows: int,
    out: Path,
    max_run: int | None = None,
) -> dict[int, int]:
    """Pass 1: write `feature_acts/layer=L/part-*.parquet` runs; return non-zeros per layer."""
    buffers = {x: RunBuffer(tc.cfg.d_sae, max_run or MAX_RUN_NONZEROS) for x, tc in transcoders.items()}
    parts = dict.fromkeys(transcoders, 0)
    counts = dict.fromkeys(transcoders, 0)

    def write(layer: int, run) -> None:
        if run is not None and run.size:
            tables.write_feature_acts(
                tables.feature_acts_table(*run), tables.feature_acts_path(out, layer, parts[layer])
            )
            parts[layer] += 1
            counts[layer] += run.size

    progress = _Progress(-(-rows.shape[0] // batch_rows), "mine: token batches")
    for batch in stream_nonzeros(model, transcoders, rows, batch_rows, bos_id):
        for layer, nz in batch.items():
            write(layer, buffers[layer].add(nz))
        progress.step()
    progress.close()
    for layer, buffer in buffers.items():
        write(layer, buffer.flush())
    return counts


def summarize(cfg: Config, transcoders: dict[int, Transcoder], out: Path, n_tokens: int) -> None:
    """Pass 2: feature_stats.parquet and top_examples.parquet from the feature_acts runs. Layers are
    summarised concurrently (numpy releases the GIL in its sorts and reductions) and written in order."""
    with (
        tables.TableSink(out / "feature_stats.parquet", tables.FEATURE_STATS_SCHEMA) as stats_sink,
        tables.TableSink(out / "top_examples.parquet", tables.TOP_EXAMPLES_SCHEMA) as examples_sink,
        ThreadPoolExecutor(max_workers=max(1, min(torch.get_num_threads(), len(transcoders)))) as pool,
    ):
        jobs = [pool.submit(_summarize_layer, cfg, layer, tc, out, n_tokens) for layer, tc in transcoders.items()]
        for job in jobs:
            for stats, examples in job.result():
                stats_sink.write(stats)
                examples_sink.write(examples)


def _summarize_layer(cfg: Config, layer: int, tc: Transcoder, out: Path, n_tokens: int) -> list[tuple[Any, Any]]:
    """One layer's (feature_stats, top_examples) tables, a pair per bounded chunk of features."""
    m = cfg.mine
    parts = sorted((out / "feature_acts" / f"layer={layer}").glob("part-*.parquet"))
    tables_out = []
    for first, stop, nz in iter_feature_chunks(parts, tc.cfg.d_sae, MAX_CHUNK_NONZEROS):
        stats, examples = summarize_features(nz, first, stop, m.top_k, m.num_bands, m.per_band, m.histogram_bins)
        tables_out.append(
            (tables.feature_stats_table(layer, stats, n_tokens), tables.top_examples_table(layer, examples))
        )
    return tables_out


def views(cfg: Config, model, transcoders: dict[int, Transcoder], out: Path) -> int:
    """feature_views.parquet: the input-invariant views of every feature."""
    progress = _Progress(len(transcoders), "mine: feature views", key="mine-views-progress", unit="layer")
    with tables.TableSink(out / "feature_views.parquet", tables.FEATURE_VIEWS_SCHEMA) as sink:
        for layer in transcoders:
            for rows in feature_views(model, transcoders, layer, cfg.mine.view_top):
                sink.write(tables.feature_views_table(layer, rows))
            progress.step()
    progress.close()
    return sink.rows


def dashboards(cfg: Config, plan: dict[str, Any], out: Path) -> dict[str, Any]:
    """dashboards/index.html plus pages of the most frequent features of each layer."""
    tokens_dir = layout.stage_dir(cfg.store.root, "tokens", plan["tokens_mine"])
    sources = {**duck.tokens_views(tokens_dir), **duck.mine_views(out)}
    con = duck.open_views(cfg.store.root, sources)
    try:
        index = dashboard_index.load_index(con)
        pages = _pick_pages(index, cfg.mine.dashboard_pages)

        def link(layer: int, feature: int) -> str | None:
            return dashboard.feature_page_name(layer, feature) if (layer, feature) in pages else None

        subtitle = f"model {cfg.model.name} · mine stage {out.name.split('.')[0]}"
        for layer, feature in sorted(pages):
            page = dashboard.load_feature(con, layer, feature, band_levels=band_levels)
            path = out / "dashboards" / dashboard.feature_page_name(layer, feature)
            dashboard.write_html(dashboard.render_feature(page, link, subtitle), path)
        summaries = dashboard_index.layer_summaries(con)
        html = dashboard_index.render_index(index, summaries, link, subtitle)
        dashboard.write_html(html, out / "dashboards" / "index.html")
        return {"pages": len(pages), "layers": summaries, "top": _top_features(index)}
    finally:
        con.close()


def _pick_pages(index: list[dict[str, Any]], per_layer: int) -> set[tuple[int, int]]:
    picked: dict[int, list[int]] = {}
    for r in index:  # already most frequent first within each layer
        chosen = picked.setdefault(r["layer"], [])
        if len(chosen) < per_layer:
            chosen.append(r["feature"])
    return {(layer, f) for layer, fs in picked.items() for f in fs}


def _top_features(index: list[dict[str, Any]], n: int = 5) -> list[dict[str, Any]]:
    """Per layer: the n most frequent and the n strongest (largest max activation) features."""
    rows = []
    for layer in sorted({r["layer"] for r in index}):
        mine = [r for r in index if r["layer"] == layer]
        for kind, chosen in (
            ("most frequent", mine[:n]),
            ("strongest", sorted(mine, key=lambda r: -r["max_act"])[:n]),
        ):
            rows += [
                {
                    "layer": layer,
                    "feature": r["feature"],
                    "kind": kind,
                    "freq": round(r["freq"], 6),
                    "max_act": round(r["max_act"], 4),
                    "top_tokens": " | ".join(r["top_tokens"] or []),
                }
                for r in chosen
            ]
    return rows


def build_mine(cfg: Config, plan: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """Mine the held-out tokens with every layer's transcoder into `tmp`; return the manifest fields."""
    from core.model import load_model, resolve_device
    from storage.checkpoints import check_fits

    torch.set_num_threads(cfg.runner.torch_threads)
    tokens_dir = layout.stage_dir(cfg.store.root, "tokens", plan["tokens_mine"])
    if not layout.is_complete(tokens_dir):
        raise layout.StoreError(f"{tokens_dir}: no mining tokens; run the tokens stage first")
    rows = tables.read_tokens(tokens_dir / "tokens.parquet")
    bos_id = layout.read_manifest(tokens_dir).get("bos_token_id") if cfg.mine.skip_bos else None
    device = resolve_device(cfg.model.device)
    model = load_model(cfg.model.name, cfg.model.device, cfg.model.dtype)
    transcoders = load_layer_transcoders(cfg, plan, device)
    _hooks(cfg, transcoders)
    for layer, tc in transcoders.items():
        check_fits(tc, model.cfg.d_model, layer)
    n_tokens = int(rows.size if bos_id is None else (rows != bos_id).sum())
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    counts = extract(model, transcoders, rows, bos_id, cfg.mine.batch_rows, tmp)
    seconds["extract"] = time.perf_counter() - start
    log(f"mine: {sum(counts.values()):,} non-zeros over {n_tokens:,} tokens in {seconds['extract']:.1f} s")
    start = time.perf_counter()
    summarize(cfg, transcoders, tmp, n_tokens)
    seconds["summarize"] = time.perf_counter() - start
    start = time.perf_counter()
    n_views = views(cfg, model, transcoders, tmp)
    seconds["views"] = time.perf_counter() - start
    start = time.perf_counter()
    dash = dashboards(cfg, plan, tmp)
    seconds["dashboards"] = time.perf_counter() - start
    log("mine: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    acts_bytes = sum(p.stat().st_size for p in (tmp / "feature_acts").rglob("*.parquet"))
    return {
        "layers": {str(x): {"d_sae": tc.cfg.d_sae, "nonzeros": counts[x]} for x, tc in transcoders.items()},
        "n_tokens": n_tokens,
        "rows": int(rows.shape[0]),
        "nonzeros": sum(counts.values()),
        "feature_acts_bytes": acts_bytes,
        "bytes_per_nonzero": acts_bytes / max(sum(counts.values()), 1),
        "feature_views_rows": n_views,
        "dashboards": {"index": "dashboards/index.html", "pages": dash["pages"]},
        "tokens_mine": plan["tokens_mine"],
        "layer_summaries": dash["layers"],
        "top_features": dash["top"],
        "phase_seconds": {k: round(v, 3) for k, v in seconds.items()},
    }


@task(name="mine_features", task_run_name="mine", cache_key_fn=cache_key("mine"), persist_result=True)
def mine_features(cfg: Config, key: str, plan: dict, force: bool = False) -> dict[str, Any]:
    """Prefect task: the mine stage for the plan's mining tokens and transcoders."""
    summary = build_stage(cfg.store.root, "mine", key, lambda tmp: build_mine(cfg, plan, tmp), force)
    publish_artifacts(summary)
    return summary


# ---------------------------------------------------------------- Prefect artifacts and progress


def _in_run() -> bool:
    return TaskRunContext.get() is not None


def publish_artifacts(summary: dict[str, Any]) -> None:
    """A link to the dashboard index and a table of the most frequent and strongest features."""
    if not _in_run():
        return
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    manifest = summary["manifest"]
    index = Path(summary["path"]) / manifest["dashboards"]["index"]
    root, route = Path(summary["path"]).parents[1], f"/mine/{summary['key']}/"
    if links.served_link(route):  # a browser opens http:// links from the UI, never file:// ones
        create_link_artifact(
            key="mine-dashboards",
            link=links.served_link(route),
            link_text="feature dashboards (index; every feature has a page)",
            description=f"Served by `circuitflow serve --store {root}`.",
        )
    else:
        create_markdown_artifact(
            key="mine-dashboards", markdown=f"Feature dashboards: {links.serve_hint(root, route)}."
        )
    lines = ["| layer | features | fired | never fired | L0 |", "|---|---|---|---|---|"]
    lines += [
        f"| {s['layer']} | {s['features']} | {s['alive']} | {s['dead']} | {s['l0']:.1f} |"
        for s in manifest["layer_summaries"]
    ]
    create_markdown_artifact(
        key="mine-summary",
        markdown=f"## Mining\n\n{manifest['nonzeros']:,} non-zeros over {manifest['n_tokens']:,} tokens "
        f"({manifest['bytes_per_nonzero']:.2f} bytes each in Parquet).\n\n"
        + "\n".join(lines)
        + f"\n\nDashboards: {links.serve_hint(root, route)} (static copy: `{index}`)\n",
    )
    create_table_artifact(
        key="mine-top-features",
        table=manifest["top_features"],
        description="Most frequent and strongest features per layer",
    )


class _Progress:
    """A terminal progress bar, mirrored to a Prefect progress artifact inside a run."""

    def __init__(self, total: int, label: str, key: str = "mine-progress", unit: str = "batch"):
        self.total, self.done, self.shown = max(total, 1), 0, 0.0
        self.bar = tqdm(total=total, desc=label, unit=unit, leave=False)
        self.artifact = None
        if _in_run():
            from prefect.artifacts import create_progress_artifact

            self.artifact = create_progress_artifact(0.0, key=key, description=label)

    def step(self) -> None:
        self.done += 1
        self.bar.update(1)
        percent = 100.0 * self.done / self.total
        if self.artifact is not None and (percent - self.shown >= 5 or self.done == self.total):
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.artifact, percent)
            self.shown = percent

    def close(self) -> None:
        self.bar.close()
