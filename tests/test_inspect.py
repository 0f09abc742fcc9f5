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
            cam = np.random.default_rng(0).random((len(keys), height, width))
            writer.write(image_id, cam, keys, {"cam_sa1": cam / 2})
    runner = CliRunner()
    listing = runner.invoke(app, ["cams", "ls", "--store", str(store)])
    assert listing.exit_code == 0
    assert "b\t20x28\tx,z" in listing.output and "images=3" in listing.output
    assert "class maps: cam, cam_sa1 raw maps: none" in listing.output
    out = tmp_path / "panel.png"
    shown = runner.invoke(app, ["cams", "show", "a", "b", "--store", str(store),
                                "--dataset", str(tmp_path / "prepared" / "dataset.json"), "--out", str(out)])
    assert shown.exit_code == 0, shown.output
    panel = np.asarray(Image.open(out))
    # row b is widest: image + 2 CAMs + GT = 4 tiles of 28 px and 3 gaps of 4 px; 2 rows of 14 + 20 px, 1 gap
    assert panel.shape == (2 * (14 + 20) + 4, 4 * 28 + 3 * 4, 3)
    out_layers = tmp_path / "layers.png"
    layers = runner.invoke(app, ["cams", "show", "b", "--map", "cam", "--map", "cam_sa1", "--store", str(store),
                                 "--dataset", str(tmp_path / "prepared" / "dataset.json"), "--out", str(out_layers)])
    assert layers.exit_code == 0, layers.output
    rows = np.asarray(Image.open(out_layers))
    assert rows.shape == (2 * (14 + 20) + 4, 4 * 28 + 3 * 4, 3)  # one row per map
    unknown = runner.invoke(app, ["cams", "show", "b", "--map", "cam_sa9", "--store", str(store),
                                  "--dataset", str(tmp_path / "prepared" / "dataset.json")])
    assert unknown.exit_code == 2 and "with a 'cam_sa9' map" in unknown.output
    missing = runner.invoke(app, ["cams", "show", "zzz", "--store", str(store),
                                  "--dataset", str(tmp_path / "prepared" / "dataset.json")])
    assert missing.exit_code == 2 and "no image 'zzz'" in missing.output
