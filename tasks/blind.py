"""Blind comparison of two dictionaries (transcoders or SAEs): describe each, derive the config that mines
it through the ordinary mine stage, build the blind set (stage `blind`: the answer key, with the rater's
folder beside it) and tally a rater's answers per dictionary.
"""

from __future__ import annotations

import dataclasses
import glob
import re
from pathlib import Path
from typing import Any, NamedTuple

from prefect import task
from prefect.context import TaskRunContext

from core.blind import BlindError, BlindItem, TallyRow, check_ratings, dictionary_kind, draw_blind_set, live_features
from core.config import Config
from core.mining import band_levels
from storage import blind as files
from storage import dashboard, duck, layout
from tasks.common import build_stage, cache_key, log

STAGE = "blind"
_SET_ID = re.compile(r"^[0-9a-f]{8,64}$")


@dataclasses.dataclass(frozen=True)
class Dictionary:
    """One dictionary of a comparison, as read from its checkpoint."""

    name: str
    """Label in the answer key and the tally (never shown to the rater)."""
    path: str
    """Absolute path of its folder or file."""
    layer: int
    """Layer it reads from."""
    kind: str
    """transcoder, skip-transcoder or sae (core.blind.dictionary_kind)."""
    hook_in: str
    """Hook its features read."""
    hook_out: str
    """Hook it reconstructs."""
    d_sae: int
    """Number of features."""


def describe_dictionary(path: str | Path, layer: int | None = None, name: str | None = None) -> Dictionary:
    """Read a checkpoint folder or file (any layout `circuitflow convert` reads); `layer` picks one
    dictionary from a folder holding several."""
    from storage.checkpoints import read_transcoders

    where = Path(path).expanduser().resolve()
    if not where.exists():
        raise BlindError(f"{path}: no such dictionary; give a transcoder or SAE folder such as <store>/train/<key>")
    found = read_transcoders(glob.escape(str(where)))
    layers = sorted(tc.cfg.layer for tc in found)
    if layer is not None:
        found = [tc for tc in found if tc.cfg.layer == layer]
    if layer is not None and not found:
        raise BlindError(f"{path}: no dictionary for layer {layer}; it holds layers {layers}")
    if len(found) != 1:
        raise BlindError(f"{path}: holds dictionaries for layers {layers}; pass --layer to pick one")
    cfg = found[0].cfg
    if cfg.layer < 0:
        raise BlindError(f"{path}: its layer is unknown (hooks {cfg.hook_in or '?'}); convert it with a layer first")
    kind = dictionary_kind(cfg)
    label = name or f"{kind} layer {cfg.layer} ({where.name})"
    return Dictionary(label, str(where), cfg.layer, kind, cfg.hook_in, cfg.hook_out, cfg.d_sae)


def describe_dictionaries(
    paths: list[str], layer: int | None = None, names: list[str] | None = None
) -> list[Dictionary]:
    """Both dictionaries, refusing the same one twice and giving them distinct names."""
    if len(paths) != 2:
        raise BlindError(f"a blind comparison takes two dictionaries, got {len(paths)}")
    if names is not None and (len(names) != 2 or len(set(names)) != 2 or not all(names)):
        raise BlindError(f"--names: give two distinct names separated by a comma, got {','.join(names)!r}")
    found = [describe_dictionary(p, layer, names[i] if names else None) for i, p in enumerate(paths)]
    if found[0].path == found[1].path and found[0].layer == found[1].layer:
        raise BlindError(f"{paths[0]} and {paths[1]} are the same dictionary; compare two different ones")
    if found[0].name == found[1].name:
        found = [dataclasses.replace(d, name=f"{d.name} {tag}") for d, tag in zip(found, "AB", strict=True)]
    return found


def _hook_template(hook: str, layer: int) -> str | None:
    """blocks.3.hook_mlp_out -> blocks.{layer}.hook_mlp_out (None when the hook does not name the layer)."""
    prefix = f"blocks.{layer}."
    return "blocks.{layer}." + hook[len(prefix) :] if hook.startswith(prefix) else None


def mining_config(cfg: Config, d: Dictionary) -> Config:
    """The config whose mine stage mines `d` alone: `transcoders:` names it, `activations` its layer and
    hooks, no trace roots. The mine key then hashes the dictionary's file stamps with the mining settings."""
    acts = cfg.activations
    acts = dataclasses.replace(
        acts,
        layers=(d.layer,),
        hook_in=_hook_template(d.hook_in, d.layer) or acts.hook_in,
        hook_out=_hook_template(d.hook_out, d.layer) or acts.hook_out,
    )
    trace = dataclasses.replace(cfg.trace, roots=())
    return dataclasses.replace(cfg, transcoders=glob.escape(d.path), activations=acts, trace=trace)


def blind_key(dictionaries: list[Dictionary], mine_keys: list[str], n: int, seed: int, min_density: float) -> str:
    """Content key of a blind set: what is drawn, from which mined dictionaries, with which seed."""
    settings = {
        "n": n,
        "seed": seed,
        "min_density": min_density,
        "dictionaries": [{"name": d.name, "layer": d.layer, "kind": d.kind} for d in dictionaries],
    }
    return layout.stage_key(STAGE, settings, {f"mine_{i}": k for i, k in enumerate(mine_keys)})


# ---------------------------------------------------------------- the blind set


def _pages(root: str, tokens_dir: Path, mine_dir: Path, layer: int, features: list[int]) -> list[Any]:
    """The dashboard data of `features` of one mined dictionary."""
    con = duck.open_views(root, {**duck.tokens_views(tokens_dir), **duck.mine_views(mine_dir)})
    try:
        return [dashboard.load_feature(con, layer, f, band_levels=band_levels) for f in features]
    finally:
        con.close()


def build_blind_set(
    root: str,
    key: str,
    dictionaries: list[Dictionary],
    mine_keys: list[str],
    tokens_key: str,
    n: int,
    seed: int,
    min_density: float,
    tmp: Path,
) -> dict[str, Any]:
    """Draw the set, write the rater's folder (`rater/`) and the answer key (`key.json`) into `tmp`."""
    tokens_dir = layout.stage_dir(root, "tokens", tokens_key)
    mine_dirs = [layout.stage_dir(root, "mine", k) for k in mine_keys]
    live = [
        live_features(*files.read_firing(m, d.layer), min_density) for d, m in zip(dictionaries, mine_dirs, strict=True)
    ]
    items = draw_blind_set(live, [d.name for d in dictionaries], n, seed)
    pages: dict[str, Any] = {}
    for i, (d, mine_dir) in enumerate(zip(dictionaries, mine_dirs, strict=True)):
        mine = [item for item in items if item.dictionary == i]
        loaded = _pages(root, tokens_dir, mine_dir, d.layer, [item.feature for item in mine])
        pages.update({item.id: page for item, page in zip(mine, loaded, strict=True)})
    files.write_rater_folder(tmp / files.RATER_DIR, key, [(item.id, pages[item.id]) for item in items])
    described = [
        {**dataclasses.asdict(d), "mine": k, "live": len(f)}
        for d, k, f in zip(dictionaries, mine_keys, live, strict=True)
    ]
    answer = {
        "set": key,
        "n": n,
        "seed": seed,
        "min_density": min_density,
        "dictionaries": described,
        "features": [
            {
                "id": it.id,
                "dictionary": it.dictionary,
                "name": dictionaries[it.dictionary].name,
                "layer": dictionaries[it.dictionary].layer,
                "feature": it.feature,
            }
            for it in items
        ],
    }
    files.write_key(tmp / files.KEY_FILE, answer)
    log(f"blind: {len(items)} features from {len(dictionaries)} dictionaries, live {[len(f) for f in live]}")
    return {
        "n": n,
        "seed": seed,
        "features": len(items),
        "rater": f"{files.RATER_DIR}/{files.PAGE}",
        "answer_key": files.KEY_FILE,
        "dictionaries": described,
    }


@task(name="make_blind_set", task_run_name="blind-set", cache_key_fn=cache_key(STAGE), persist_result=True)
def make_blind_set(
    cfg: Config,
    key: str,
    dictionaries: list[dict[str, Any]],
    mine_keys: list[str],
    tokens_key: str,
    n: int,
    seed: int,
    min_density: float = 0.0,
    force: bool = False,
) -> dict[str, Any]:
    """Prefect task: the blind set of two mined dictionaries (a stage `blind` directory, cached by key)."""
    found = [Dictionary(**d) for d in dictionaries]
    root = cfg.store.root

    def build(tmp: Path) -> dict[str, Any]:
        return build_blind_set(root, key, found, mine_keys, tokens_key, n, seed, min_density, tmp)

    summary = build_stage(root, STAGE, key, build, force)
    _publish_artifact(summary)
    return summary


def rater_folder(summary: dict[str, Any]) -> Path:
    """The rater's folder of a blind set (hand it over as is: the answer key is outside it)."""
    return Path(summary["path"]) / files.RATER_DIR


def export_rater_folder(summary: dict[str, Any], out: str | Path) -> Path:
    """Copy the rater's folder of a blind set to `out` (atomic; never over a folder holding other files)."""
    return files.export_folder(rater_folder(summary), out)


def _publish_artifact(summary: dict[str, Any]) -> None:
    if TaskRunContext.get() is None:
        return
    from prefect.artifacts import create_link_artifact

    page = rater_folder(summary) / files.PAGE
    create_link_artifact(
        key="blind-rater-page",
        link=page.resolve().as_uri(),
        link_text=f"blind rating page ({summary['manifest']['features']} features)",
        description=f"Hand over `{page.parent}`; the answer key stays in `{Path(summary['path']) / files.KEY_FILE}`.",
    )


# ---------------------------------------------------------------- tallying


class Tally(NamedTuple):
    """The unblinded counts of a ratings file."""

    rows: list[TallyRow]
    set_id: str
    rated: int
    total: int


def find_key(store: str | Path, set_id: str | None, key_path: str | Path | None) -> dict[str, Any]:
    """The answer key: `key_path` when given, else the store's blind set the ratings name."""
    if key_path is not None:
        return files.read_key(key_path)
    if not set_id:
        raise BlindError("the ratings name no set (no `set` field or column); pass --key <store>/blind/<set>/key.json")
    if not _SET_ID.match(set_id):
        raise BlindError(f"the ratings name set {set_id!r}, which is not a blind set id; pass --key")
    return files.read_key(layout.stage_dir(store, STAGE, set_id))


def tally_ratings(
    ratings: str | Path, store: str | Path = "./store", key_path: str | Path | None = None, partial: bool = False
) -> Tally:
    """Read ratings (JSON or CSV), check them against the answer key, unblind and count per dictionary."""
    from core.blind import tally

    found = files.read_ratings(ratings)
    key = find_key(store, found.set_id, key_path)
    if found.set_id and found.set_id != key["set"]:
        raise BlindError(f"{ratings}: these ratings are for set {found.set_id}, but the key is for set {key['set']}")
    items = [BlindItem(f["id"], int(f["dictionary"]), int(f["feature"])) for f in key["features"]]
    checked = check_ratings(found.rows, [i.id for i in items], partial)
    rows = tally(checked, items, [d["name"] for d in key["dictionaries"]])
    return Tally(rows, key["set"], len(checked), len(items))
