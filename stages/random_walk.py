"""Stage `random_walk`: propagate the refined CAMs with AffinityNet's transition matrix (PSA)."""
from __future__ import annotations

from pathlib import Path

import typer

from stages._common import load_params, reports_errors, single_command, skipped
from stages.artifacts import AFFINITY_CHECKPOINT, MANIFEST, PARAMS_FILE, REFINED_STORE, RW_METRICS, RW_STORE
from wsss_core.cams.store import CamStore, CamStoreWriter
from wsss_core.checkpoint import load_checkpoint
from wsss_core.data.dataset import Dataset
from wsss_core.io import write_json
from wsss_core.metrics import ConfusionMatrix, describe_miou, scored_report
from wsss_core.models.affinity_net import AffinityNet
from wsss_core.refine.propagate import iterate_random_walk
from wsss_core.refine.pseudo import argmax_labels
from wsss_core.training import resolve_device


@reports_errors
def random_walk(params_file: Path = typer.Option(PARAMS_FILE, "--params", help="params.yaml to read")) -> None:
    """Write cams/cams_rw.h5 ('cam' and 'background' maps) and metrics/rw.json (argmax mIoU)."""
    params = load_params(params_file)
    if skipped("random_walk", params):
        return
    rw, affinity = params.rw, params.affinity
    dataset = Dataset.load(MANIFEST)
    ids = dataset.ids("train")
    checkpoint = load_checkpoint(AFFINITY_CHECKPOINT, "affinity",
                                 {"affinity": {"backbone": affinity.backbone, "dilated": affinity.dilated}})
    model = AffinityNet(affinity.backbone, dilated=affinity.dilated)
    model.load_state_dict(checkpoint["model"])
    confusion = ConfusionMatrix(dataset.num_classes + 1)
    with CamStore(REFINED_STORE) as store:
        store.check_covers(ids)
        attrs = {"method": str(store.attr("method")), "stride": AffinityNet.stride, "class_names": dataset.class_names,
                 "params": {"rw": rw.model_dump(), "affinity": affinity.model_dump()}}
        with CamStoreWriter(RW_STORE, attrs) as writer:
            for image_id, scores, keys in iterate_random_walk(model, store, dataset, ids, rw,
                                                              device=resolve_device(params.device)):
                writer.write(image_id, scores[1:], keys, {"background": scores[0]})
                if dataset.has_mask(image_id):
                    confusion.update(argmax_labels(scores, keys), dataset.read_mask(image_id))
    report = scored_report(confusion.matrix, dataset.class_names, len(dataset.scored_ids(ids)))
    write_json(RW_METRICS, report)
    typer.echo(f"random walk: {describe_miou(report)} -> {RW_STORE}")


app = single_command(random_walk)

if __name__ == "__main__":
    app()
