"""Pre-flight checks that need no model weights: the store path is usable, the dictionary width fits the
settings that index it, and the memory training, mining and tracing will take fits the machine. Each raises a
one-line ConfigError naming the setting to change, before Prefect starts or a model loads."""

from __future__ import annotations

import os
from pathlib import Path

from core.config import TOPK_ACTIVATIONS, Config, ConfigError

FLOAT_BYTES = 4
"""Bytes per float32 value: weights, optimiser state and activations are float32 while training."""
TRAIN_COPIES = 4
"""Float copies of every trained parameter: the weights, their gradients and Adam's two moments."""
BATCH_COPIES = 4
"""Float copies of a training batch's feature activations: pre-activations, activations and both gradients."""
REFUSED_ROOTS = ("/proc", "/sys", "/dev")
"""Kernel filesystems: never a store, even for a user allowed to create entries there."""


def check_store(root: str | Path, name: str = "store.root") -> Path:
    """The store root is a writable directory, or can be created as one. Returns it, resolved; creates nothing."""
    path = Path(root).expanduser().resolve()
    where = f"{name} {str(root)!r}"
    if any(path == Path(r) or Path(r) in path.parents for r in REFUSED_ROOTS):
        raise ConfigError(f"{where}: {path} lies in a kernel filesystem; pass a directory on disk, e.g. ./store")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        kind = "is a file" if existing == path else f"lies under the file {existing}"
        raise ConfigError(f"{where}: {kind}, not a directory; pass a directory (created if missing)")
    if not os.access(existing, os.W_OK | os.X_OK) or _read_only(existing):
        verb = "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
        raise ConfigError(f"{where}: {verb}; pass a directory you can write to")
    return path


def _read_only(path: Path) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


def available_memory(device: str) -> tuple[int, str]:
    """Bytes the run may allocate on `device` (cuda: the GPU's free memory; else MemAvailable) and its name."""
    from core.model import resolve_device

    resolved = resolve_device(device)
    if resolved.type == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(resolved)[0]), f"free on {resolved}"
    try:
        with open("/proc/meminfo") as fh:
            fields = dict(line.split(":", 1) for line in fh)
        return int(fields["MemAvailable"].split()[0]) * 1024, "available RAM"
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "RAM"


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n < 1e12 else f"{n / 1e12:.1f} TB"


def estimates(cfg: Config, d_model: int) -> dict[str, tuple[int, str]]:
    """Peak bytes of each heavy stage and the settings that shrink it (one dictionary per layer)."""
    t = cfg.train
    d_sae = t.expansion_factor * d_model
    weights = 2 * d_model * d_sae + (d_model * d_model if t.kind == "skip_transcoder" else 0)
    parallel = min(cfg.runner.max_workers, len(cfg.activations.layers))
    train = parallel * FLOAT_BYTES * (TRAIN_COPIES * weights + BATCH_COPIES * t.batch_size * d_sae)
    layers = len(cfg.activations.layers)
    mine_rows = cfg.mine.batch_rows * cfg.tokens.context_size
    mine = layers * FLOAT_BYTES * (weights + 2 * mine_rows * d_sae)
    trace = layers * FLOAT_BYTES * (weights + cfg.tokens.context_size * d_sae)
    width = "train.expansion_factor"
    return {
        "training": (train, f"{width} (now {t.expansion_factor}) or train.batch_size"),
        "mining": (mine, f"{width} (now {t.expansion_factor}) or mine.batch_rows"),
        "tracing": (trace, f"{width} (now {t.expansion_factor})"),
    }


def check_resources(cfg: Config, d_model: int, available: tuple[int, str] | None = None) -> None:
    """train.k fits the dictionary width, and every stage's estimated memory fits what is available."""
    d_sae = cfg.train.expansion_factor * d_model
    if cfg.transcoders is None and cfg.train.activation in TOPK_ACTIVATIONS and cfg.train.k > d_sae:
        raise ConfigError(
            f"train.k: {cfg.train.k} is more than the dictionary's {d_sae} features "
            f"(train.expansion_factor {cfg.train.expansion_factor} x d_model {d_model}); "
            "lower train.k or raise train.expansion_factor"
        )
    if cfg.transcoders is not None:
        return  # the imported dictionaries' sizes are checked when they are read
    free, what = available or available_memory(cfg.model.device)
    for stage, (need, fix) in estimates(cfg, d_model).items():
        if need > free:
            raise ConfigError(
                f"{fix.split(' ')[0]}: {stage} needs about {_gb(need)} of memory (d_sae {d_sae}) but {_gb(free)} "
                f"is {what}; lower {fix}"
            )
