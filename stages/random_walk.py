"""Stage `random_walk`: propagate the refined CAMs with AffinityNet's transition matrix (PSA)."""
from __future__ import annotations

from pathlib import Path

import typer

from stages._common import MANIFEST, PARAMS_FILE, load_params, reports_errors, single_command
from stages.refine import REFINED_STORE
from stages.train_affinity import CHECKPOINT
from wsss_core.cams.store import CamStore, CamStoreWriter
from wsss_core.checkpoint import load_checkpoint
from wsss_core.data.dataset import Dataset
from wsss_core.metrics import ConfusionMatrix, iou_report
from wsss_core.models.affinity_net import AffinityNet
from wsss_core.refine.propagate import iterate_random_walk
from wsss_core.refine.pseudo import argmax_labels
from wsss_core.training import resolve_device
from wsss_core.io import write_json

RW_STORE = Path("cams/cams_rw.h5")
METRICS = Path("metrics/rw.json")


@reports_errors
def random_walk(params_file: Path = typer.Option(PARAMS_FILE, "--params", help="params.yaml to read")) -> None:
    """Write cams/cams_rw.h5 ('cam' and 'background' maps) and metrics/rw.json (argmax mIoU)."""
    params = load_params(params_file)
    rw, affinity = params.rw, params.affinity
    dataset = Dataset.load(MANIFEST)
    checkpoint = load_checkpoint(CHECKPOINT, "affinity", {"backbone": affinity.backbone}, "affinity")
    model = AffinityNet(affinity.backbone)
    model.load_state_dict(checkpoint["model"])
    confusion = ConfusionMatrix(dataset.num_classes + 1)
    ids = dataset.ids("train")
    with CamStore(REFINED_STORE) as store:
        store.check_covers(ids)
        attrs = {"method": str(store.attr("method")), "stride": AffinityNet.stride, "class_names": dataset.class_names,
                 "params": {"rw": rw.model_dump(), "affinity": affinity.model_dump()}}
        with CamStoreWriter(RW_STORE, attrs) as writer:
            for image_id, scores, keys in iterate_random_walk(
                    model, store, dataset, ids, rw.bg_mode, rw.bg_alpha, rw.bg_threshold, rw.radius,
                    rw.beta, rw.logt, rw.batch_size, resolve_device(params.device)):
                writer.write(image_id, scores[1:], keys, {"background": scores[0]})
                confusion.update(argmax_labels(scores, keys), dataset.read_mask(image_id))
    report = iou_report(confusion.matrix, dataset.class_names)
    write_json(METRICS, report)
    typer.echo(f"random walk: mIoU {report['miou']:.4f} -> {RW_STORE}")


app = single_command(random_walk)

if __name__ == "__main__":
    app()
