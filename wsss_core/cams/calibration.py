"""How partial are the CAMs on the synthetic data: mean activation on parts vs bodies."""
from __future__ import annotations

import numpy as np

from wsss_core.cams.store import CamStore
from wsss_core.data.synthetic import SyntheticSpec, render_sample


def part_body_activation(store: CamStore, spec: SyntheticSpec, ids: list[str]) -> dict:
    """Return {'part_mean', 'body_mean', 'background_mean'}: the mean CAM of each pixel's own class.

    Part and body pixels are those of labelled objects (re-rendered from the spec, so the ids
    must be train ids `syn_train_<index>` of a store exported from the set this spec generated);
    background_mean is each labelled class's map on the background pixels of its own image, averaged over
    (pixel, class), so that it compares a class map with its own class's background (the max over the present
    classes would grow with their number).
    """
    part_sum = body_sum = background_sum = 0.0
    part_count = body_count = background_count = 0
    for image_id in ids:
        sample = render_sample(spec, "train", int(image_id.rsplit("_", 1)[1]))
        cam, keys = store.read(image_id)
        if cam.shape[0] == 0:
            continue
        channel = np.zeros(256, np.int64)
        channel[keys] = np.arange(len(keys))
        labelled = np.isin(sample.labels, keys)
        own = np.take_along_axis(cam, channel[sample.labels][None], 0)[0]  # [H, W]: CAM of the pixel's class
        part, body = labelled & sample.part_mask, labelled & ~sample.part_mask
        background = sample.labels == 0
        part_sum += own[part].sum()
        body_sum += own[body].sum()
        background_sum += cam[:, background].sum()
        part_count, body_count, background_count = (part_count + part.sum(), body_count + body.sum(),
                                                     background_count + background.sum() * len(keys))
    return {"part_mean": float(part_sum / max(part_count, 1)), "body_mean": float(body_sum / max(body_count, 1)),
            "background_mean": float(background_sum / max(background_count, 1))}
