"""Checkpoints: torch.save dicts with the model state, the method name and the params used.

Every file is read with `torch.load(weights_only=True)`: tensors and plain Python values only,
so loading a checkpoint can never run code. Params are stored as plain types (model_dump).
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from wsss_core.errors import DataError, ParamsError, WsssError
from wsss_core.io import atomic_path


def load_torch_file(path: str | Path, what: str = "checkpoint", error: type[WsssError] = DataError):
    """Return the object in a torch file, loaded with weights_only=True (no code runs).

    A missing or unreadable file, or one that needs code execution to load (arbitrary pickled
    objects), raises `error` with one line naming the file and `what` it was meant to be.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise error(f"{path}: refused: this {what} holds pickled objects beyond tensors and plain values, "
                    "and loading it would run code (only weights files and wsss checkpoints load)") from None
    except Exception as err:  # torch raises many types for a bad file
        raise error(f"{path}: unreadable {what} ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
                    ) from None


def save_checkpoint(path: str | Path, model: nn.Module, method: str, params: dict, **extra) -> None:
    """Write {'model', 'method', 'params', **extra} atomically; params and extra must be plain types."""
    with atomic_path(path) as temporary:
        torch.save({"model": model.state_dict(), "method": method, "params": params, **extra}, temporary)


def load_checkpoint(path: str | Path, method: str, expected: dict[str, dict]) -> dict:
    """Read a checkpoint and check it was made by `method` with the expected params.

    expected: {section: {key: value}} of the params that shape the model; a mismatch is a
    ParamsError naming the first differing key, e.g. 'cls.backbone'.
    """
    checkpoint = read_checkpoint(path)
    if checkpoint.get("method") != method:
        raise ParamsError(f"{path} was trained with method={checkpoint.get('method')!r}, params say {method!r}")
    for section, params in expected.items():
        saved = checkpoint.get("params", {}).get(section, {})
        for key, value in params.items():
            if saved.get(key) != value:
                raise ParamsError(f"{path} was trained with {section}.{key}={saved.get(key)!r}, params say {value!r}")
    return checkpoint


def save_placeholder_checkpoint(path: str | Path, reason: str) -> None:
    """Write a checkpoint holding only {'skipped': reason}: the declared output of a stage that did no work."""
    with atomic_path(path) as temporary:
        torch.save({"skipped": reason}, temporary)


def read_checkpoint(path: str | Path) -> dict:
    """Return a checkpoint dict as saved by save_checkpoint; a missing, unsafe, placeholder or foreign file is a DataError."""
    checkpoint = load_torch_file(path)
    if isinstance(checkpoint, dict) and "skipped" in checkpoint:
        raise DataError(f"{path}: a placeholder, its stage did no work ({checkpoint['skipped']})")
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise DataError(f"{path}: not a wsss checkpoint (no 'model' entry)")
    return checkpoint
