"""The HDF5 CAM store (docs/architecture.md, 'Contracts').

One group per image id holding dataset `cam` (float16 [k, H, W] in [0, 1], at the original image
size, for the k foreground classes present) with attribute `keys` (their class indices 1..K).
Beside it: other class maps at image size (`extras`, e.g. a random walk's `background`) and raw
maps stored as the method made them (`raw`: token or stride resolution, views stacked first),
each with attributes `layout` (its dims, e.g. 'views,classes,tokens') and `grid` (h, w); the file
attribute `raw` lists the raw names. File attributes also record the method, scales, stride,
class names and the params that made it. The file is written under a temporary name and renamed
when the writer closes without error; a placeholder store (a stage that did no work) holds no
group and a `skipped` attribute saying why.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import h5py
import numpy as np
from tqdm import tqdm

from wsss_core.data.dataset import check_image_id
from wsss_core.errors import DataError
from wsss_core.io import atomic_path

if TYPE_CHECKING:
    import torch

RawArray = tuple[np.ndarray, str, tuple[int, int]]  # values [V, ...], layout, grid (h, w)


@dataclass
class RawMap:
    """A map stored as it is: values [B, ...] with `layout` naming the dims after the batch (e.g.
    'classes,tokens') and `grid` the (h, w) of its spatial or token grid."""

    values: torch.Tensor
    layout: str
    grid: tuple[int, int]


class CamStoreWriter:
    """Context manager writing a CAM store atomically: `with CamStoreWriter(path, attrs) as w: w.write(...)`."""

    def __init__(self, path: str | Path, attrs: dict, compression_level: int = 4):
        self.path = Path(path)
        self.attrs = attrs
        self.compression_level = compression_level
        self.file: h5py.File | None = None
        self.raw_names: list[str] = []

    def __enter__(self) -> "CamStoreWriter":
        self._atomic = atomic_path(self.path)  # also removes a temporary left by a killed run
        self.file = h5py.File(self._atomic.__enter__(), "w")
        for key, value in self.attrs.items():
            self.file.attrs[key] = json.dumps(value) if isinstance(value, (dict, list, tuple)) else value
        return self

    def write(self, image_id: str, cam: np.ndarray, keys: np.ndarray, extras: dict[str, np.ndarray] | None = None,
              raw: dict[str, RawArray] | None = None, scores: np.ndarray | None = None) -> None:
        """Store one image: cam [k, H, W] (values in [0, 1]) for classes keys [k] (1..K), extras, raw maps, and
        the classifier's image-level scores [K] (logits for every foreground class) as attribute `scores`."""
        check_image_id(image_id, str(self.path))
        cam = np.asarray(cam)
        keys = np.asarray(keys, dtype=np.int64)
        if cam.ndim != 3 or cam.shape[0] != keys.size:
            raise ValueError(f"{image_id}: cam shape {cam.shape} does not match {keys.size} keys")
        group = self.file.create_group(image_id)
        self._dataset(group, "cam", cam.astype(np.float16))
        group["cam"].attrs["keys"] = keys
        if scores is not None:
            group.attrs["scores"] = np.asarray(scores, np.float32)
        for name, value in (extras or {}).items():
            self._dataset(group, name, np.asarray(value).astype(np.float16))
        for name, (values, layout, grid) in (raw or {}).items():
            values = np.asarray(values).astype(np.float16)
            if len(layout.split(",")) != values.ndim:
                raise ValueError(f"{image_id}: raw map {name!r} has {values.ndim} dims, layout {layout!r}")
            self._dataset(group, name, values)
            group[name].attrs.update(layout=layout, grid=np.asarray(grid, np.int64))
            if name not in self.raw_names:
                self.raw_names.append(name)

    def _dataset(self, group: h5py.Group, name: str, array: np.ndarray) -> None:
        if array.size == 0:
            group.create_dataset(name, data=array)
        else:  # one chunk per image: a read decompresses exactly that image
            group.create_dataset(name, data=array, chunks=array.shape, compression="gzip",
                                 compression_opts=self.compression_level, shuffle=True)

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.file.attrs["raw"] = json.dumps(self.raw_names)
        self.file.close()
        self._atomic.__exit__(exc_type, exc, traceback)


class CamStore:
    """Read-only access to a CAM store: `store.read(id) -> (cam float32 [k, H, W], keys int64 [k])`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: CAM store not found (run the stage that writes it first)")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as err:
            raise DataError(f"{self.path}: not a readable HDF5 file ({err})") from None
        if "skipped" in self.file.attrs:
            skipped = self.file.attrs["skipped"]
            self.file.close()
            raise DataError(f"{self.path}: a placeholder, its stage did no work ({skipped})")

    def ids(self) -> list[str]:
        """Return the stored image ids (HDF5 order: sorted)."""
        return list(self.file.keys())

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.file

    def check_covers(self, ids: list[str], split: str = "train") -> None:
        """Raise a DataError unless every id has a group: a store made for other data must not be half-used."""
        missing = [image_id for image_id in ids if image_id not in self.file]
        if missing:
            raise DataError(f"{self.path}: {len(missing)} of the {len(ids)} {split} images are missing "
                            f"(e.g. {missing[0]!r}); the store was made for other data: re-run the stage that writes it")

    def attr(self, name: str):
        """Return a file attribute, JSON-decoded where it was stored as JSON."""
        value = self.file.attrs[name]
        if isinstance(value, str) and value[:1] in "[{":
            return json.loads(value)
        return value

    @property
    def attrs(self) -> dict:
        """Return every file attribute (JSON-decoded)."""
        return {name: self.attr(name) for name in self.file.attrs}

    @property
    def class_names(self) -> list[str]:
        return self.attr("class_names")

    @property
    def raw_names(self) -> list[str]:
        """Return the names of the raw maps every group holds."""
        return self.attr("raw") if "raw" in self.file.attrs else []

    def _group(self, image_id: str, name: str) -> h5py.Group:
        if image_id not in self.file:
            raise DataError(f"{self.path}: no image {image_id!r} in the store")
        group = self.file[image_id]
        if not isinstance(group, h5py.Group) or name not in group or "cam" not in group \
                or "keys" not in group["cam"].attrs:
            raise DataError(f"{self.path}: {image_id!r} is not a CAM group with a {name!r} map and class keys")
        return group

    def read(self, image_id: str, name: str = "cam") -> tuple[np.ndarray, np.ndarray]:
        """Return (map float32 [k, H, W], class indices int64 [k]) of one image."""
        group = self._group(image_id, name)
        return group[name][()].astype(np.float32), group["cam"].attrs["keys"].astype(np.int64)

    def read_scores(self, image_id: str) -> np.ndarray | None:
        """Return the classifier's image-level scores float32 [K] stored with the image, or None."""
        scores = self._group(image_id, "cam").attrs.get("scores")
        return None if scores is None else np.asarray(scores, np.float32)

    def map_names(self, image_id: str) -> list[str]:
        """Return the names of the image's class maps ('cam' first, then extras such as 'cam_sa1'; no raw maps)."""
        raw = set(self.raw_names)
        return sorted((name for name in self._group(image_id, "cam") if name not in raw), key=lambda n: n != "cam")

    def read_raw(self, image_id: str) -> dict[str, np.ndarray]:
        """Return {name: float32 array [V, ...]} of the image's raw maps (layout and grid: `raw_layout`)."""
        return {name: self._group(image_id, name)[name][()].astype(np.float32) for name in self.raw_names}

    def raw_layout(self, image_id: str, name: str) -> tuple[str, tuple[int, int]]:
        """Return (layout, grid (h, w)) of one raw map."""
        dataset = self._group(image_id, name)[name]
        return str(dataset.attrs["layout"]), tuple(int(v) for v in dataset.attrs["grid"])

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "CamStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_placeholder_store(path: str | Path, reason: str) -> None:
    """Write a store with no image and a `skipped` attribute: the declared output of a stage that did no work."""
    with atomic_path(path) as temporary, h5py.File(temporary, "w") as handle:
        handle.attrs["skipped"] = reason


def merge_stores(parts: list[Path], destination: str | Path, ids: list[str]) -> None:
    """Write the store `destination` (atomically) from shard stores that hold each of `ids` exactly once.

    Each image's group is copied as stored (its compressed chunks unchanged), so the merged store holds the
    same values as one written in one pass; the file attributes are the first part's, the raw names the
    union of the parts'. A missing part, an image in two parts, or an image missing from or foreign to
    `ids` is a DataError. The parts are left in place.
    """
    for part in parts:
        if not Path(part).is_file():
            raise DataError(f"{part}: shard store not found (run every shard before merging)")
    handles = []
    for part in parts:
        try:
            handles.append(h5py.File(part, "r"))
        except OSError as err:
            for handle in handles:
                handle.close()
            raise DataError(f"{part}: unreadable shard store, truncated or not HDF5 ({err})") from None
    try:
        owner: dict[str, h5py.File] = {}
        for part, handle in zip(parts, handles):
            for image_id in handle:
                if image_id in owner:
                    raise DataError(f"{part}: image {image_id!r} is also in {owner[image_id].filename}")
                owner[image_id] = handle
        missing, foreign = sorted(set(ids) - set(owner)), sorted(set(owner) - set(ids))
        if missing or foreign:
            raise DataError(f"{destination}: the shards miss {len(missing)} and add {len(foreign)} images of the "
                            f"{len(ids)} to merge (e.g. {(missing or foreign)[0]!r}): shards of another run?")
        raw_names: list[str] = []
        for handle in handles:
            raw_names += [name for name in json.loads(handle.attrs.get("raw", "[]")) if name not in raw_names]
        with atomic_path(destination) as temporary, h5py.File(temporary, "w") as merged:
            for key, value in handles[0].attrs.items():
                merged.attrs[key] = value
            merged.attrs["raw"] = json.dumps(raw_names)
            for image_id in ids:
                owner[image_id].copy(owner[image_id][image_id], merged, name=image_id)
    finally:
        for handle in handles:
            handle.close()


RefineFunction = Callable[[np.ndarray, np.ndarray, dict[str, np.ndarray]], np.ndarray]


def transform_store(source: CamStore, destination: str | Path, ids: list[str], refine: RefineFunction | None,
                    attrs: dict) -> None:
    """Write `destination` with refine(cam [k,H,W], keys [k], raw) -> cam [k,H,W] in [0, 1] per id.

    refine None: the destination is a hard link to the source (a copy where links are not possible),
    raw maps included. Otherwise the refined store keeps the source's file attributes plus `attrs`,
    and holds no raw maps.
    """
    if refine is None:
        with atomic_path(destination) as temporary:
            try:
                os.link(source.path, temporary)
            except OSError:
                shutil.copyfile(source.path, temporary)
        return
    source.check_covers(ids)
    with CamStoreWriter(destination, {**{k: v for k, v in source.attrs.items() if k != "raw"}, **attrs}) as writer:
        for image_id in tqdm(ids, desc="refine", unit="img"):
            cam, keys = source.read(image_id)
            refined = np.asarray(refine(cam, keys, source.read_raw(image_id)), dtype=np.float32)
            if refined.shape != cam.shape or not (np.all(refined >= 0) and np.all(refined <= 1)):
                raise ValueError(f"{image_id}: refined CAMs must be {cam.shape} in [0, 1], got {refined.shape} "
                                 f"in [{refined.min():.3g}, {refined.max():.3g}]")
            writer.write(image_id, refined, keys)
