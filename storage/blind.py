"""Blind comparison files: the rater's page (feature dashboards without their source, a rating form that
downloads ratings.json), the ratings.csv template, the answer key kept outside the rater's folder,
reading ratings back and writing the tally. Every write is atomic.
"""

from __future__ import annotations

import csv
import html
import io
import json
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core.ratings import CONTEXT, INTERPRETABILITY, RATING_FIELDS, BlindError
from storage import dashboard, layout
from storage.dashboard import FeaturePage

if TYPE_CHECKING:  # annotations only: the tally rows come from core.blind
    from core.blind import TallyRow

RATER_DIR = "rater"
"""Sub-folder of a blind set holding what the rater gets (and nothing else)."""
PAGE = "index.html"
TEMPLATE = "ratings.csv"
RATER_FILES = (PAGE, TEMPLATE)
KEY_FILE = "key.json"
"""The answer key, next to (never inside) the rater's folder."""
SET_COLUMN = "set"

CSS = """
.bar{position:sticky;top:0;background:#fff;border-bottom:1px solid #e3e6ec;padding:8px 0;z-index:2;display:flex;gap:12px;align-items:center;flex-wrap:wrap}
.bar button,.bar label.load{font:inherit;border:1px solid #d0d5dd;background:#f9fafb;border-radius:6px;padding:3px 10px;cursor:pointer}
.nav a{display:inline-block;min-width:38px;margin:1px;padding:0 4px;border-radius:3px;background:#eef1f5}.nav a.done{background:#d1fadf}
section.feature{border-top:3px solid #1d2330;margin-top:36px;padding-top:4px}
form.rate{background:#f9fafb;border:1px solid #e3e6ec;border-radius:8px;padding:8px 14px;margin:14px 0}
form.rate fieldset{border:0;padding:2px 0;margin:0}form.rate legend{font-weight:600;padding:0;margin-right:8px;float:left}
form.rate label{margin-right:14px}form.rate textarea{width:100%;font:inherit}details summary{cursor:pointer;color:#175cd3}
"""

SCRIPT = """
const SET = document.body.dataset.set, STORE = "circuitflow-blind-" + SET;
const forms = () => [...document.querySelectorAll("form.rate")];
const picked = (f, name) => (f.querySelector(`input[name="${f.dataset.id}-${name}"]:checked`) || {}).value || "";
function collect() {
  return forms().map(f => ({id: f.dataset.id, interpretability: picked(f, "interpretability"),
    context: picked(f, "context"), note: f.querySelector("textarea").value.trim()}));
}
function save() {
  const rows = collect();
  try { localStorage.setItem(STORE, JSON.stringify(rows)); } catch (e) {}
  let done = 0;
  for (const r of rows) {
    const rated = r.interpretability && (r.interpretability !== "interpretable" || r.context);
    document.querySelector(`.nav a[href="#${r.id}"]`).classList.toggle("done", !!rated);
    done += rated ? 1 : 0;
  }
  document.getElementById("done").textContent = done;
}
function restore(rows) {
  for (const r of rows || []) {
    const f = document.querySelector(`form.rate[data-id="${r.id}"]`);
    if (!f) continue;
    for (const name of ["interpretability", "context"])
      for (const box of f.querySelectorAll(`input[name="${r.id}-${name}"]`)) box.checked = box.value === r[name];
    f.querySelector("textarea").value = r.note || "";
  }
  save();
}
function download() {
  const blob = new Blob([JSON.stringify({set: SET, ratings: collect()}, null, 2) + "\\n"], {type: "application/json"});
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob); a.download = "ratings.json";
  document.body.appendChild(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}
function load(input) {
  const file = input.files[0];
  if (!file) return;
  file.text().then(text => {
    const data = JSON.parse(text);
    if (data.set && data.set !== SET) { alert("these ratings belong to set " + data.set + ", not " + SET); return; }
    restore(Array.isArray(data) ? data : data.ratings);
  }).catch(e => alert("cannot read " + file.name + ": " + e));
}
document.addEventListener("change", save);
document.addEventListener("input", save);
try { restore(JSON.parse(localStorage.getItem(STORE) || "[]")); } catch (e) { save(); }
"""

INSTRUCTIONS = (
    "<p>Each section below is one feature, drawn at random from one of two dictionaries and shown in a random "
    "order; nothing on this page says which dictionary a feature came from. Read its top activations and the "
    "samples across its activation range, then rate it:</p><ul>"
    "<li><b>interpretable</b>: one explanation covers (nearly) every example; "
    "<b>maybe</b>: a plausible explanation with clear exceptions; <b>uninterpretable</b>: none.</li>"
    "<li>For interpretable features, <b>context-free</b>: it fires on a token or word whatever surrounds it; "
    "<b>context-dependent</b>: it needs a particular context.</li></ul>"
    "<p>Ratings are kept in this browser as you go. <b>Download ratings.json</b> and send that file back "
    "(or fill in ratings.csv instead).</p>"
)


# ---------------------------------------------------------------- the rater's page


def _radios(item_id: str, name: str, values: tuple[str, ...]) -> str:
    boxes = "".join(f'<label><input type="radio" name="{item_id}-{name}" value="{v}"> {v}</label>' for v in values)
    return f"<fieldset><legend>{name}</legend>{boxes}</fieldset>"


def render_rating_form(item_id: str) -> str:
    """The form of one feature: interpretability, context (if interpretable) and a free-text note."""
    return (
        f'<form class="rate" data-id="{item_id}" onsubmit="return false">'
        f"{_radios(item_id, 'interpretability', INTERPRETABILITY)}{_radios(item_id, 'context', CONTEXT)}"
        f'<label>note <textarea name="{item_id}-note" rows="2"></textarea></label></form>'
    )


def render_blind_feature(item_id: str, page: FeaturePage) -> str:
    """One feature's dashboard under its opaque id: stats, density, top and banded examples. The input-
    invariant views are left out (they name layers and differ by dictionary kind), as are the title
    and subtitle that name the layer, feature and store."""
    parts = dashboard.feature_parts(page)
    return (
        f'<section class="feature" id="{item_id}"><h1>{item_id}</h1>{parts.stats}'
        f"<h2>Activation density (non-zero activations)</h2>{parts.density}"
        f"<h2>Top activations</h2>{parts.examples}"
        f"<details><summary>Samples across the activation range</summary>{parts.bands}</details>"
        f"{render_rating_form(item_id)}</section>"
    )


def render_blind_page(set_id: str, features: Sequence[tuple[str, FeaturePage]]) -> str:
    """The rater's index.html: instructions, a progress bar with download/load buttons, every feature."""
    total = len(features)
    nav = "".join(f'<a href="#{i}">{i}</a>' for i, _ in features)
    bar = (
        f'<div class="bar"><b>Blind comparison</b><span>set {html.escape(set_id)}</span>'
        f'<span><span id="done">0</span> / {total} rated</span>'
        '<button type="button" onclick="download()">Download ratings.json</button>'
        '<label class="load">Load ratings.json<input type="file" accept=".json,application/json" hidden '
        'onchange="load(this)"></label></div>'
    )
    body = (
        f'{bar}{INSTRUCTIONS}<p class="nav">{nav}</p>'
        + "".join(render_blind_feature(i, page) for i, page in features)
        + f"<script>{SCRIPT}</script>"
    )
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Blind comparison {html.escape(set_id)}'
        f'</title><meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<style>{dashboard.CSS}{CSS}</style></head><body data-set="{html.escape(set_id)}">{body}</body></html>\n'
    )


def ratings_template(set_id: str, ids: Sequence[str]) -> str:
    """ratings.csv: a `set` column, then id, interpretability, context, note; one empty row per feature."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([SET_COLUMN, *RATING_FIELDS])
    writer.writerows([set_id, i, "", "", ""] for i in ids)
    return out.getvalue()


def write_rater_folder(folder: str | Path, set_id: str, features: Sequence[tuple[str, FeaturePage]]) -> Path:
    """index.html and ratings.csv (each written atomically) into `folder`."""
    folder = Path(folder)
    dashboard.write_html(render_blind_page(set_id, features), folder / PAGE)
    with layout.atomic_file(folder / TEMPLATE) as tmp:
        tmp.write_text(ratings_template(set_id, [i for i, _ in features]), encoding="utf-8")
    return folder


def export_folder(src: str | Path, dst: str | Path) -> Path:
    """Copy a rater folder to `dst` atomically; an existing `dst` is replaced only when it holds nothing
    but a previous export (so a rater's ratings.json saved there is never deleted)."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        foreign = sorted(p.name for p in dst.iterdir() if p.name not in RATER_FILES) if dst.is_dir() else [dst.name]
        if foreign:
            raise BlindError(f"{dst}: exists and holds {', '.join(foreign[:3])}; choose a new --out folder")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        shutil.copytree(src, tmp)
        layout.publish(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


# ---------------------------------------------------------------- the answer key


def write_key(path: str | Path, key: dict[str, Any]) -> Path:
    layout.write_json_atomic(path, key)
    return Path(path)


def read_key(path: str | Path) -> dict[str, Any]:
    """The answer key from key.json or from the blind set's folder holding it."""
    path = Path(path)
    file = path / KEY_FILE if path.is_dir() else path
    if not file.is_file():
        raise BlindError(f"{file}: no answer key there; pass --key <store>/blind/<set>/{KEY_FILE} or the right --store")
    try:
        key = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BlindError(f"{file}: not a readable answer key ({exc})") from None
    if not isinstance(key, dict) or not {"set", "dictionaries", "features"} <= set(key):
        raise BlindError(f"{file}: not an answer key (expected set, dictionaries and features)")
    return key


# ---------------------------------------------------------------- ratings files


class RatingsFile(NamedTuple):
    """A ratings file as read: the set it names (None when it names none) and (location, row) pairs."""

    set_id: str | None
    rows: list[tuple[str, dict[str, Any]]]


def read_ratings(path: str | Path) -> RatingsFile:
    """ratings.json (as the page downloads it: {"set", "ratings": [...]}, or a bare list) or ratings.csv."""
    path = Path(path)
    if not path.is_file():
        raise BlindError(f"{path}: no such ratings file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # spreadsheets may prepend a byte-order mark
    except UnicodeDecodeError:
        raise BlindError(f"{path}: not UTF-8 text; save the ratings as UTF-8 JSON or CSV") from None
    if path.suffix.lower() == ".json":
        return _ratings_json(path, text)
    if path.suffix.lower() == ".csv":
        return _ratings_csv(path, text)
    raise BlindError(f"{path}: expected a .json or .csv ratings file")


def _ratings_json(path: Path, text: str) -> RatingsFile:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BlindError(f"{path.name}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    set_id = None
    if isinstance(data, dict):
        set_id, data = data.get("set"), data.get("ratings")
    if not isinstance(data, list):
        raise BlindError(f'{path.name}: expected {{"set": ..., "ratings": [...]}} as the page downloads it')
    if set_id is not None and not isinstance(set_id, str):
        raise BlindError(f"{path.name}: set must be text, got {set_id!r}")
    rows = []
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise BlindError(
                f"{path.name}: ratings[{i}] is {row!r}, expected an object with {', '.join(RATING_FIELDS)}"
            )
        rows.append((f"{path.name}: ratings[{i}]", row))
    return RatingsFile(set_id or None, rows)


def _ratings_csv(path: Path, text: str) -> RatingsFile:
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip().lower() for c in reader.fieldnames or []]
    missing = [c for c in ("id", "interpretability") if c not in columns]
    if missing:
        raise BlindError(
            f"{path.name}: missing column(s) {', '.join(missing)}; columns are {', '.join((SET_COLUMN, *RATING_FIELDS))}"
        )
    reader.fieldnames = columns
    rows, sets = [], set()
    for row in reader:
        if None in row:
            raise BlindError(f"{path.name}: line {reader.line_num} has more cells than the header")
        if not any((v or "").strip() for v in row.values()):
            continue
        sets.add((row.get(SET_COLUMN) or "").strip())
        rows.append((f"{path.name}: line {reader.line_num}", row))
    sets.discard("")
    if len(sets) > 1:
        raise BlindError(f"{path.name}: rows name several sets ({', '.join(sorted(sets))}); keep one set per file")
    return RatingsFile(sets.pop() if sets else None, rows)


# ---------------------------------------------------------------- the tally

TALLY_COLUMNS = (
    "dictionary",
    "rated",
    "interpretable",
    "maybe",
    "uninterpretable",
    "context_free",
    "context_dependent",
)


def format_tally(rows: Sequence[TallyRow]) -> str:
    """A text table: one row per dictionary; context columns count interpretable features only."""
    head = ["dictionary", "rated", "interpretable", "maybe", "uninterpretable", "context-free", "context-dependent"]
    cells = [head] + [[str(v) for v in r] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in cells]  # fmt: skip
    return "\n".join(lines)


def write_tally(rows: Sequence[TallyRow], path: str | Path) -> Path:
    """The tally as .csv, .json or .md (by suffix), written atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(TALLY_COLUMNS)
        writer.writerows(rows)
        text = out.getvalue()
    elif suffix == ".json":
        text = json.dumps([r._asdict() for r in rows], indent=2) + "\n"
    elif suffix == ".md":
        lines = ["| " + " | ".join(TALLY_COLUMNS) + " |", "|" + "---|" * len(TALLY_COLUMNS)]
        text = "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows]) + "\n"
    else:
        raise BlindError(f"{path}: the tally is written as .csv, .json or .md; choose one of those suffixes")
    path.parent.mkdir(parents=True, exist_ok=True)
    with layout.atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- reading what the mine stage wrote


class LiveStats(NamedTuple):
    """One layer's per-feature firing counts from a mine stage's feature_stats.parquet."""

    feature: np.ndarray
    """int32 [d_sae] feature index."""
    n_fired: np.ndarray
    """int64 [d_sae] tokens the feature fired on."""
    freq: np.ndarray
    """float64 [d_sae] n_fired / mined tokens."""


def read_firing(mine_dir: str | Path, layer: int) -> LiveStats:
    """feature, n_fired and freq of every feature of `layer` in a mine stage directory."""
    file = Path(mine_dir) / "feature_stats.parquet"
    if not file.is_file():
        raise BlindError(f"{mine_dir}: no feature_stats.parquet; the mine stage did not finish (rerun it)")
    table = pq.read_table(file, columns=["layer", "feature", "n_fired", "freq"])
    table = table.filter(pc.equal(table.column("layer"), layer))
    return LiveStats(*(table.column(c).to_numpy() for c in ("feature", "n_fired", "freq")))
