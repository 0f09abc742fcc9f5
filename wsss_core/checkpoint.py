"""Checkpoints: torch.save dicts with the model state, the method name and the params used."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from wsss_core.errors import DataError, ParamsError


def save_checkpoint(path: str | Path, model: nn.Module, method: str, params: dict, **extra) -> None:
    """Write {'model', 'method', 'params', **extra} to a temporary name, then rename into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "method": method, "params": params, **extra}, temporary)
    os.replace(temporary, path)


def load_checkpoint(path: str | Path, method: str, params: dict, section: str) -> dict:
    """Read a checkpoint and check it was made by `method` with `params` (the keys that shape the model).

    A mismatch is a ParamsError naming the first differing key, e.g. 'cls.backbone'.
    """
    checkpoint = read_checkpoint(path)
    if checkpoint.get("method") != method:
        raise ParamsError(f"{path} was trained with method={checkpoint.get('method')!r}, params say {method!r}")
    saved = checkpoint.get("params", {}).get(section, {})
    for key, value in params.items():
        if saved.get(key) != value:
            raise ParamsError(f"{path} was trained with {section}.{key}={saved.get(key)!r}, params say {value!r}")
    return checkpoint


def read_checkpoint(path: str | Path) -> dict:
    """Return a checkpoint dict as saved by save_checkpoint; a missing or unreadable file is a DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for a bad file
        raise DataError(f"{path}: unreadable checkpoint ({err})") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise DataError(f"{path}: not a wsss checkpoint (no 'model' entry)")
    return checkpoint
