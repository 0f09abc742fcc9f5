import numpy as np
from PIL import Image
from typer.testing import CliRunner

from stages.cli import app
from tests.fixtures import make_dataset
from wsss_core.cams.store import CamStoreWriter


def test_cams_ls_and_show_write_a_panel_per_id(tmp_path):
    dataset = make_dataset(tmp_path)
    dataset.save(tmp_path / "prepared" / "dataset.json")
    store = tmp_path / "cams.h5"
    with CamStoreWriter(store, {"method": "cam", "scales": [1.0], "stride": 4, "class_names": dataset.class_names}) as writer:
        for image_id in dataset.ids("train"):
            keys = np.array(dataset.labels[image_id])
            height, width = dataset.read_image(image_id).shape[:2]
            writer.write(image_id, np.random.default_rng(0).random((len(keys), height, width)), keys)
    runner = CliRunner()
    listing = runner.invoke(app, ["cams", "ls", "--store", str(store)])
    assert listing.exit_code == 0
    assert "b\t20x28\tx,z" in listing.output and "images=3" in listing.output
    out = tmp_path / "panel.png"
    shown = runner.invoke(app, ["cams", "show", "a", "b", "--store", str(store),
                                "--dataset", str(tmp_path / "prepared" / "dataset.json"), "--out", str(out)])
    assert shown.exit_code == 0, shown.output
    panel = np.asarray(Image.open(out))
    # row b is widest: image + 2 CAMs + GT = 4 tiles of 28 px and 3 gaps of 4 px; 2 rows of 14 + 20 px, 1 gap
    assert panel.shape == (2 * (14 + 20) + 4, 4 * 28 + 3 * 4, 3)
    missing = runner.invoke(app, ["cams", "show", "zzz", "--store", str(store),
                                  "--dataset", str(tmp_path / "prepared" / "dataset.json")])
    assert missing.exit_code == 2 and "no image 'zzz'" in missing.output
