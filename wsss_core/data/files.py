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
from dataclasses import dataclass
from pathlib import Path

from wsss_core.data.images import DEFAULT_MAX_PIXELS, DEFAULT_MAX_TEXT_BYTES
from wsss_core.errors import DataError

DEFAULT_MAX_PARSE_BYTES = 8 * 2**30  # JSON files estimated to take more memory to parse are refused (read_json)


@dataclass(frozen=True)
class ReadLimits:
    """What every reader bounds (the `data` section's limits): pixels per image, bytes of a list, class or
    labels file, estimated bytes of a JSON parse, and whether links may resolve outside the dataset root."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES
    max_parse_bytes: int = DEFAULT_MAX_PARSE_BYTES
    follow_links: bool = False


def _read_bytes(path: Path, max_bytes: int, size_param: str) -> bytes:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise DataError(f"{path}: {size} bytes, more than the {max_bytes} allowed ({size_param})")
        return path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or err})") from None


def _decode(path: Path, data: bytes) -> str:
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError(f"{path}: UTF-16 text; save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start} is {data[err.start:err.start + 1]!r}); "
                        "save it as UTF-8") from None


def read_text(path: Path, max_bytes: int = DEFAULT_MAX_TEXT_BYTES, size_param: str = "data.max_text_bytes") -> str:
    """Return the UTF-8 text of path (a BOM is dropped); a DataError naming it when missing, larger than max_bytes
    (the error names size_param, the param that sets it) or not UTF-8."""
    return _decode(path, _read_bytes(path, max_bytes, size_param))


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


def json_memory_estimate(data: bytes) -> int:
    """Return an upper estimate, in bytes, of the memory that parsing the UTF-8 JSON `data` with read_json takes:
    the decoded text (4 bytes a character once any byte is non-ASCII) and the Python objects, from counts of the
    structural bytes (per comma 40: a value and its pointer; per colon 160: a key, the pair and its dict entry;
    per bracket or brace 100: a container; per quote 30: a string's header) plus the bytes themselves for string
    contents. Calibrated with tracemalloc on CPython 3.11 (lists of ints, floats, strings, empty lists and dicts,
    a large dict, COCO-like records): never under the measured peak, about 2x over it on COCO-like files."""
    text = len(data) if data.isascii() else 4 * len(data)
    objects = (40 * data.count(b",") + 160 * data.count(b":") + 100 * (data.count(b"[") + data.count(b"{"))
               + 30 * data.count(b'"') + len(data))
    return text + objects + 4096


def read_json(path: Path, max_bytes: int = DEFAULT_MAX_TEXT_BYTES, max_parse_bytes: int = DEFAULT_MAX_PARSE_BYTES,
              size_param: str = "data.max_text_bytes"):
    """Return the parsed JSON of a UTF-8 file. A file over max_bytes (named as size_param), one whose parse
    json_memory_estimate puts over max_parse_bytes (data.max_parse_bytes; checked before the text is decoded),
    invalid JSON, a key repeated in one object or nesting too deep for the parser is a DataError naming the file.
    Memory stays under the file's size plus max_parse_bytes."""
    data = _read_bytes(path, max_bytes, size_param)
    estimate = json_memory_estimate(data)
    if estimate > max_parse_bytes:
        raise DataError(f"{path}: parsing it would take about {estimate:,} bytes of memory, more than the "
                        f"{max_parse_bytes:,} allowed (data.max_parse_bytes)")
    text = _decode(path, data)
    del data
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
