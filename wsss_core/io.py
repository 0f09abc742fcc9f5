"""Atomic writes: every artifact appears under its final name only once it is complete.

One convention for the whole project: a file or folder `x` is built as `x.tmp` beside it and
renamed to `x` when the block that writes it ends without error. A `x.tmp` left by a killed run
is removed when the next run starts writing `x`, and on failure the temporary is removed.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

TEMPORARY_SUFFIX = ".tmp"


def temporary_path(path: str | Path) -> Path:
    """Return the temporary name of `path`: `<name>.tmp` in the same folder."""
    path = Path(path)
    return path.with_name(path.name + TEMPORARY_SUFFIX)


def remove_path(path: Path) -> None:
    """Remove a file, a link or a folder tree at `path`; nothing happens if it does not exist."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | Path, folder: bool = False) -> Iterator[Path]:
    """Yield the temporary path to write `path` under; rename it into place if the block succeeds.

    folder=True creates the temporary as an empty folder (it replaces an existing `path` folder);
    otherwise the block creates the temporary file. A stale temporary is removed first; on an
    error the temporary is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(path)
    remove_path(temporary)
    if folder:
        temporary.mkdir()
    try:
        yield temporary
        if folder:
            remove_path(path)
        os.replace(temporary, path)
    finally:
        remove_path(temporary)


def write_json(path: str | Path, payload: dict) -> None:
    """Write `payload` as indented JSON, atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(payload, indent=2) + "\n")


def save_image(path: str | Path, pixels) -> None:
    """Write uint8 [H, W, 3] (or [H, W]) pixels atomically, in the format of the path's suffix (.png, .jpg)."""
    from PIL import Image

    path = Path(path)
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        raise ValueError(f"{path}: unknown image suffix {path.suffix!r} (use .png or .jpg)")
    with atomic_path(path) as temporary:
        Image.fromarray(pixels).save(temporary, format=image_format, **({"quality": 90} if image_format == "JPEG" else {}))


def shard_path(path: str | Path, index: int, count: int) -> Path:
    """Return where shard `index` of `count` of the artifact at `path` is written: `<name>.shard-<i>-of-<n>` beside it."""
    path = Path(path)
    return path.with_name(f"{path.name}.shard-{index}-of-{count}")


def shard_paths(path: str | Path, count: int) -> list[Path]:
    """Return the paths of all `count` shards of the artifact at `path`, in shard order (see shard_path)."""
    return [shard_path(path, index, count) for index in range(count)]
