import numpy as np
import pytest

from wsss_core.data.palette import VOC_PALETTE, colorize, read_label_png, write_label_png
from wsss_core.errors import DataError


def test_voc_colormap_known_entries():
    assert VOC_PALETTE[0].tolist() == [0, 0, 0]
    assert VOC_PALETTE[1].tolist() == [128, 0, 0]  # aeroplane
    assert VOC_PALETTE[15].tolist() == [192, 128, 128]  # person
    assert VOC_PALETTE[255].tolist() == [224, 224, 192]  # void


def test_palette_png_round_trip_keeps_indices_and_colours(tmp_path):
    labels = np.array([[0, 1, 2], [15, 20, 255]], dtype=np.uint8)
    path = tmp_path / "m.png"
    write_label_png(path, labels)
    np.testing.assert_array_equal(read_label_png(path), labels)
    from PIL import Image

    with Image.open(path) as image:
        assert image.mode == "P"
        rgb = np.asarray(image.convert("RGB"))
    np.testing.assert_array_equal(rgb, colorize(labels))


def test_corrupt_label_png_names_the_file(tmp_path):
    path = tmp_path / "bad.png"
    path.write_bytes(b"not a png")
    with pytest.raises(DataError, match="bad.png"):
        read_label_png(path)
