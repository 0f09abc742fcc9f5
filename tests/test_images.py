"""wsss_core.data.images: how files become pixels (limits, EXIF orientation, 16-bit greyscale)."""
import numpy as np
import pytest
from PIL import Image

from wsss_core.data.images import image_size, read_rgb
from wsss_core.errors import DataError


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896], [65535, 1000, 40000]], np.uint16)
    Image.fromarray(values).save(tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode == "I;16"
    rgb = read_rgb(tmp_path / "g.png")
    expected = np.round(values / 257.0).astype(np.uint8)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], expected)


@pytest.mark.parametrize("orientation, upright_corner", [(1, (0, 0)), (3, (-1, -1)), (6, (0, -1)), (8, (-1, 0))])
def test_exif_orientation_is_applied(tmp_path, orientation, upright_corner):
    """A white top-left corner as stored lands where a viewer that honours EXIF shows it."""
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:4, :4] = 255
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(tmp_path / "o.jpg", exif=exif.tobytes(), quality=100)
    rgb = read_rgb(tmp_path / "o.jpg")
    turned = orientation in (6, 8)
    assert rgb.shape[:2] == ((40, 20) if turned else (20, 40))
    assert image_size(tmp_path / "o.jpg") == (rgb.shape[1], rgb.shape[0])
    row, col = upright_corner
    assert rgb[row, col].mean() > 200 and rgb[rgb.shape[0] // 2, rgb.shape[1] // 2].mean() < 30


def test_pixel_limit_is_checked_before_decoding(tmp_path):
    Image.fromarray(np.zeros((30, 50, 3), np.uint8)).save(tmp_path / "a.png")
    assert read_rgb(tmp_path / "a.png", max_pixels=1500).shape == (30, 50, 3)
    with pytest.raises(DataError, match=r"a.png: 50x30 image has 1,500 pixels, over the limit of 1,499"):
        read_rgb(tmp_path / "a.png", max_pixels=1499)


def test_thirty_two_bit_images_are_refused(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / "f.tiff")
    with pytest.raises(DataError, match=r"f.tiff: 'F' images \(32-bit integer or float\) are not supported"):
        read_rgb(tmp_path / "f.tiff")


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(DataError, match=r"nope.jpg: image not found"):
        read_rgb(tmp_path / "nope.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DataError, match=r"bad.jpg: unreadable or corrupt image"):
        read_rgb(tmp_path / "bad.jpg")
