import numpy as np
import pytest

from wsss_core.cams.calibration import part_body_activation
from wsss_core.cams.store import CamStore, CamStoreWriter
from wsss_core.data.sources import SyntheticSpec
from wsss_core.data.synthetic import render_sample


def write_store(path, spec, ids, cam_of):
    with CamStoreWriter(path, {"method": "cam"}) as writer:
        for image_id in ids:
            sample = render_sample(spec, "train", int(image_id.rsplit("_", 1)[1]))
            keys = np.array(sorted(set(sample.classes)))
            writer.write(image_id, np.stack([cam_of(sample, key) for key in keys]).astype(np.float32), keys)


@pytest.mark.parametrize("target,expected", [("part", (1.0, 0.0)), ("object", (1.0, 1.0)), ("body", (0.0, 1.0))])
def test_part_body_activation_on_hand_made_cams(tmp_path, target, expected):
    spec = SyntheticSpec(n_train=6, n_val=1, image_size=96)
    ids = [f"syn_train_{i:05d}" for i in range(6)]
    regions = {"part": lambda s, k: (s.labels == k) & s.part_mask,
               "object": lambda s, k: s.labels == k,
               "body": lambda s, k: (s.labels == k) & ~s.part_mask}
    write_store(tmp_path / "c.h5", spec, ids, regions[target])
    with CamStore(tmp_path / "c.h5") as store:
        result = part_body_activation(store, spec, ids)
    assert (result["part_mean"], result["body_mean"]) == pytest.approx(expected)
    assert result["background_mean"] == 0.0


def test_background_mean_averages_each_class_map_on_its_own_background(tmp_path):
    """A class map 0.5 on the background beside one at 0 gives 0.25 (the max over classes would give 0.5)."""
    spec = SyntheticSpec(n_train=12, n_val=1, image_size=96)
    ids = [f"syn_train_{i:05d}" for i in range(12)]
    two = [i for i in ids if len(set(render_sample(spec, "train", int(i[-5:])).classes)) == 2]
    assert two, "the spec should draw an image with two classes"

    def cam_of(sample, key):
        first = key == min(sample.classes)
        return np.where(sample.labels == 0, 0.5 if first else 0.0, 0.0)

    write_store(tmp_path / "c.h5", spec, two, cam_of)
    with CamStore(tmp_path / "c.h5") as store:
        assert part_body_activation(store, spec, two)["background_mean"] == pytest.approx(0.25)
