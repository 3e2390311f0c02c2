"""The original transcoder release (Dunefsky et al.): one `.pt` per layer, `torch.save({"cfg", "state_dict"})`,
with its `*_log_feature_sparsity.pt` beside it. Read only, never unpickled beyond tensors and an inert config.
The math of the layout is in docs/formats.md.
"""

from __future__ import annotations

import pickle
import pickletools
import re
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.transcoder import Transcoder, TranscoderConfig
from storage.formats.base import (
    CheckpointError,
    build,
    describe_value,
    expect,
    expect_encoder_decoder,
    first_line,
    layer_of,
    refuse_extra,
)

# The original release (Dunefsky et al.; jacobdunefsky/transcoder_circuits, sae_training/sparse_autoencoder.py
# save_model/load_from_pretrained): torch.save({"cfg": LanguageModelSAERunnerConfig, "state_dict": ...}).
SPARSITY_SUFFIX = "_log_feature_sparsity.pt"

# Source: jacobdunefsky/transcoder_circuits, sae_training/sparse_autoencoder.py: forward computes
# relu((x - b_dec) @ W_enc + b_enc) @ W_dec + b_dec_out, with W_enc [d_in, d_sae], W_dec [d_sae, d_out], b_dec [d_in],
# b_dec_out [d_out] (absent for a plain SAE, which adds b_dec); save_model torch.saves {"cfg": cfg, "state_dict": ...}
# where cfg is a sae_training/config.py LanguageModelSAERunnerConfig dataclass (hook_point, hook_point_layer,
# out_hook_point, is_transcoder, d_in, d_out, d_sae, model_name, plus a torch.device and a torch.dtype).
# The release is read with torch's weights-only unpickler (it never imports modules or calls arbitrary globals): the
# config class is mapped to an inert stand-in and every other non-tensor global is refused before unpickling starts.

_FOREIGN_CONFIG = re.compile(r"^(?:[A-Za-z_]\w*\.)*config\.LanguageModelSAERunnerConfig$")
_KNOWN_CONFIG_NAMES = (
    "sae_training.config.LanguageModelSAERunnerConfig",
    "transcoder_circuits.sae_training.config.LanguageModelSAERunnerConfig",
    "sae_lens.training.config.LanguageModelSAERunnerConfig",
)
_SAFE_GLOBALS_LOCK = threading.Lock()  # torch's safe_globals() edits a process-wide set


class ForeignConfig:
    """Inert stand-in for the release's config class: unpickling only fills its __dict__ with plain values."""


def restricted_torch_load(file: Path) -> Any:
    """torch.load(weights_only=True) with the foreign config class mapped to ForeignConfig; anything else refused."""
    names = _foreign_config_globals(file)
    with _SAFE_GLOBALS_LOCK, torch.serialization.safe_globals([(ForeignConfig, name) for name in names]):
        try:
            with warnings.catch_warnings():  # torch warns about pickle protocols it may not read; we refuse instead
                warnings.simplefilter("ignore")
                return torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"{file}: refused to unpickle: {_refusal_reason(exc)}; only tensors and the release's config are read"
            ) from None
        except Exception as exc:  # untrusted bytes can fail in any way; report one line
            raise CheckpointError(f"{file}: not a readable torch file ({first_line(exc)})") from None


def _foreign_config_globals(file: Path) -> list[str]:
    """Scan the pickle (without running it) for globals torch does not allow by default: the release's config class
    is mapped, anything else is refused here with its name. A non-zip file gets the known names (torch still vets it)."""
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(file))
    except Exception:  # not a zip checkpoint: a legacy file of pickles, scanned without running them
        unsafe = [n for n in _raw_pickle_globals(file) if not n.startswith("torch.") and n not in _PLAIN_GLOBALS]
        if not unsafe:
            return list(_KNOWN_CONFIG_NAMES)
    refused = sorted(name for name in unsafe if not _FOREIGN_CONFIG.match(name))
    if refused:
        raise CheckpointError(
            f"{file}: refused to unpickle: it references {', '.join(refused)}, which is neither tensor data nor the release's config class"
        )
    return sorted(unsafe)


_PLAIN_GLOBALS = {"collections.OrderedDict", "builtins.set", "builtins.slice", "_codecs.encode"}
"""Globals of a legacy torch file besides torch's own (which torch's weights-only reader vets)."""
_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def _raw_pickle_globals(file: Path) -> set[str]:
    """`module.name` of every global the pickles at the start of `file` import (read, never run)."""
    found: set[str] = set()
    with open(file, "rb") as fh:
        for _ in range(5):  # a legacy torch file: magic, protocol, sys info, the object, storage keys
            strings: list[str] = []
            try:
                for op, arg, _pos in pickletools.genops(fh):
                    if op.name in _STRINGS:
                        strings.append(str(arg))
                    elif op.name == "GLOBAL":
                        found.add(str(arg).replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.add(f"{strings[-2]}.{strings[-1]}")
            except (ValueError, EOFError):  # raw storage bytes (or garbage) follow the pickles
                break
    return found


def _refusal_reason(exc: Exception) -> str:
    text = str(exc)
    opcode = re.search(r"Unsupported operand (\d+)", text)
    if opcode:
        name = next((o.name for o in pickletools.opcodes if o.code == chr(int(opcode[1]))), opcode[1])
        return f"it uses the pickle opcode {name}, which the safe loader does not read; re-save it with torch.save"
    match = re.search(r"(?:unsupported )?GLOBAL ([\w.]+)", text, flags=re.IGNORECASE)
    if match:
        return f"it references {match.group(1)}, which is not allowed"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else type(exc).__name__


def _plain_config(file: Path, cfg: Any) -> dict[str, Any]:
    if isinstance(cfg, ForeignConfig):
        cfg = dict(vars(cfg))
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{file}: 'cfg' is {describe_value(cfg)}, expected the release's config object")
    return {k: (str(v) if isinstance(v, torch.device | torch.dtype) else v) for k, v in cfg.items()}


def load_release(file: Path) -> Transcoder:
    if file.name.endswith(SPARSITY_SUFFIX):
        raise CheckpointError(f"{file}: this is a feature-sparsity file; load it with load_log_feature_sparsity")
    obj = restricted_torch_load(file)
    if not isinstance(obj, dict) or not {"cfg", "state_dict"} <= set(obj):
        raise CheckpointError(
            f"{file}: expected {{'cfg', 'state_dict'}} (the original release layout), found {describe_value(obj)}"
        )
    cfg = _plain_config(file, obj["cfg"])
    state = {k: v for k, v in dict(obj["state_dict"]).items() if isinstance(v, Tensor)}
    is_transcoder = bool(cfg.get("is_transcoder", "b_dec_out" in state))
    d_in, d_sae = _release_int(file, cfg, "d_in"), _release_int(file, cfg, "d_sae")
    d_out = int(cfg.get("d_out") or d_in) if is_transcoder else d_in
    ours = _release_to_ours(file, state, is_transcoder, (d_in, d_sae, d_out))
    hook_in = _release_str(file, cfg, "hook_point")
    hook_out = _release_str(file, cfg, "out_hook_point") if is_transcoder else hook_in
    layer = layer_of(cfg.get("hook_point_layer"), hook_in, hook_out)
    model_name = _release_str(file, cfg, "model_name")
    tc_cfg = TranscoderConfig(d_in, d_sae, d_out, "relu", 32, False, hook_in, hook_out, layer, model_name)
    return build(tc_cfg, ours, file)


def _release_to_ours(
    file: Path, state: Mapping[str, Tensor], is_transcoder: bool, dims: tuple[int, int, int]
) -> dict[str, Tensor]:
    d_in, _, d_out = dims
    ours = {**expect_encoder_decoder(file, state, dims), "b_dec": expect(file, state, "b_dec", (d_in,), "d_in")}
    ours["b_dec_out"] = expect(file, state, "b_dec_out", (d_out,), "d_out") if is_transcoder else ours["b_dec"]
    refuse_extra(file, state, {"W_enc", "b_enc", "W_dec", "b_dec", "b_dec_out"})
    return ours


def _release_str(file: Path, cfg: Mapping[str, Any], key: str) -> str:
    value = cfg.get(key)
    if value is not None and not isinstance(value, str):
        raise CheckpointError(f"{file}: the config's {key!r} is {describe_value(value)}, expected a string")
    return value or ""


def _release_int(file: Path, cfg: Mapping[str, Any], key: str) -> int:
    if not isinstance(cfg.get(key), int):
        raise CheckpointError(
            f"{file}: the config has no integer {key!r}; expected the release's LanguageModelSAERunnerConfig"
        )
    return int(cfg[key])
