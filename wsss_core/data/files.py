"""Bounded, validated reading of the small files that describe a dataset (id lists, class lists, labels), and
the links policy for every file a reader opens.

Text: UTF-8, with or without a byte-order mark; anything else (UTF-16, Latin-1, binary) is one DataError
naming the file. Sizes are checked before reading. JSON: duplicate keys and deep nesting are errors, never a
silent last-one-wins or a RecursionError. Links: a file (or folder) that resolves outside the dataset root is
refused unless the caller allows it (`data.follow_links`), the same way in the VOC, tags and COCO readers.
"""
from __future__ import annotations

import codecs
import csv
import io
import json
from pathlib import Path

from wsss_core.data.images import DEFAULT_MAX_TEXT_BYTES
from wsss_core.errors import DataError


def read_text(path: Path, max_bytes: int = DEFAULT_MAX_TEXT_BYTES) -> str:
    """Return the UTF-8 text of path (a BOM is dropped); a DataError naming it when missing, larger than max_bytes
    or not UTF-8."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise DataError(f"{path}: {size} bytes, more than the {max_bytes} allowed (data.max_text_bytes)")
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or err})") from None
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError(f"{path}: UTF-16 text; save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start} is {data[err.start:err.start + 1]!r}); "
                        "save it as UTF-8") from None


def read_csv_rows(path: Path, max_bytes: int = DEFAULT_MAX_TEXT_BYTES) -> list[tuple[int, list[str]]]:
    """Return (line number, fields) of every row of a UTF-8 CSV file; a malformed row is a DataError naming the
    file and line."""
    reader = csv.reader(io.StringIO(read_text(path, max_bytes), newline=""))
    rows = []
    try:
        for row in reader:
            rows.append((reader.line_num, row))
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: not a CSV row ({err})") from None
    return rows


def _refuse_duplicates(path: Path):
    def hook(pairs: list[tuple[str, object]]) -> dict:
        seen: dict[str, object] = {}
        for key, value in pairs:
            if key in seen:
                raise DataError(f"{path}: key {key!r} appears twice in one JSON object")
            seen[key] = value
        return seen
    return hook


def read_json(path: Path, max_bytes: int = DEFAULT_MAX_TEXT_BYTES):
    """Return the parsed JSON of a UTF-8 file; invalid JSON, a key repeated in one object or nesting too deep for
    the parser is a DataError naming the file."""
    text = read_text(path, max_bytes)
    try:
        return json.loads(text, object_pairs_hook=_refuse_duplicates(path))
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply") from None
    except ValueError as err:  # json.JSONDecodeError, and numbers past Python's digit limit
        raise DataError(f"{path}: not valid JSON ({err})") from None


def check_inside(path: Path, root: Path, follow_links: bool = False) -> Path:
    """Return path if it resolves inside root (or follow_links allows any target); a DataError naming the link
    and where it leads otherwise. A path that does not exist is returned as it is (its reader reports it)."""
    if follow_links or not path.exists():
        return path
    target, base = path.resolve(), root.resolve()
    if target != base and base not in target.parents:
        raise DataError(f"{path}: leads outside the data root {root} (to {target}); copy it in, or set "
                        "data.follow_links: true to read links that leave the root")
    return path
