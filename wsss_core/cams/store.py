"""The HDF5 CAM store (see ARCHITECTURE 'Contracts').

One group per image id holding dataset `cam` (float16 [k, H, W] in [0, 1], at the original image
size, for the k foreground classes present) with attribute `keys` (their class indices 1..K),
and any attention maps beside it. File attributes: method, scales, stride, class_names, params.
The file is written under a temporary name and renamed when the writer closes without error.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from wsss_core.data.dataset import check_image_id
from wsss_core.errors import DataError
from wsss_core.io import atomic_path


class CamStoreWriter:
    """Context manager writing a CAM store atomically: `with CamStoreWriter(path, attrs) as w: w.write(...)`."""

    def __init__(self, path: str | Path, attrs: dict, compression_level: int = 4):
        self.path = Path(path)
        self.attrs = attrs
        self.compression_level = compression_level
        self.file: h5py.File | None = None

    def __enter__(self) -> "CamStoreWriter":
        self._atomic = atomic_path(self.path)  # also removes a temporary left by a killed run
        self.file = h5py.File(self._atomic.__enter__(), "w")
        for key, value in self.attrs.items():
            self.file.attrs[key] = json.dumps(value) if isinstance(value, (dict, list, tuple)) else value
        return self

    def write(self, image_id: str, cam: np.ndarray, keys: np.ndarray, extra: dict[str, np.ndarray] | None = None) -> None:
        """Store one image's CAMs cam [k, H, W] (values in [0, 1]) for classes keys [k] (1..K)."""
        check_image_id(image_id, str(self.path))
        cam = np.asarray(cam)
        keys = np.asarray(keys, dtype=np.int64)
        if cam.ndim != 3 or cam.shape[0] != keys.size:
            raise ValueError(f"{image_id}: cam shape {cam.shape} does not match {keys.size} keys")
        group = self.file.create_group(image_id)
        self._dataset(group, "cam", cam.astype(np.float16))
        group["cam"].attrs["keys"] = keys
        for name, value in (extra or {}).items():
            self._dataset(group, name, np.asarray(value).astype(np.float16))

    def _dataset(self, group: h5py.Group, name: str, array: np.ndarray) -> None:
        if array.size == 0:
            group.create_dataset(name, data=array)
        else:  # one chunk per image: a read decompresses exactly that image
            group.create_dataset(name, data=array, chunks=array.shape, compression="gzip",
                                 compression_opts=self.compression_level, shuffle=True)

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.file.close()
        self._atomic.__exit__(exc_type, exc, traceback)


class CamStore:
    """Read-only access to a CAM store: `store.read(id) -> (cam float32 [k, H, W], keys int64 [k])`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: CAM store not found (run export_cams first)")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as err:
            raise DataError(f"{self.path}: not a readable HDF5 file ({err})") from None

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
    def class_names(self) -> list[str]:
        return self.attr("class_names")

    def read(self, image_id: str, name: str = "cam") -> tuple[np.ndarray, np.ndarray]:
        """Return (map float32 [k, H, W], class indices int64 [k]) of one image."""
        if image_id not in self.file:
            raise DataError(f"{self.path}: no image {image_id!r} in the store")
        group = self.file[image_id]
        if not isinstance(group, h5py.Group) or name not in group or "cam" not in group \
                or "keys" not in group["cam"].attrs:
            raise DataError(f"{self.path}: {image_id!r} is not a CAM group with a {name!r} map and class keys")
        return group[name][()].astype(np.float32), group["cam"].attrs["keys"].astype(np.int64)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "CamStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
