"""Stage `pseudo_masks`: the final training labels for segmentation (VOC palette PNGs)."""
from __future__ import annotations

from pathlib import Path

import typer

from stages._common import MANIFEST, PARAMS_FILE, load_params, reports_errors, single_command
from stages.dcrf import LABEL_DIR as CRF_DIR
from stages.random_walk import RW_STORE
from stages.refine import REFINED_STORE
from wsss_core.cams.evaluate import cam_labels
from wsss_core.cams.store import CamStore
from wsss_core.data.dataset import Dataset
from wsss_core.data.label_dir import LabelDirWriter, check_label_dir, read_label_dir
from wsss_core.refine.pseudo import disagreement_to_void, rw_labels
from wsss_core.io import write_json

MASK_DIR = Path("labels/pseudo")
METRICS = Path("metrics/pseudo.json")


@reports_errors
def pseudo_masks(params_file: Path = typer.Option(PARAMS_FILE, "--params", help="params.yaml to read")) -> None:
    """Write labels/pseudo/<id>.png from the configured source; metrics/pseudo.json on the train split."""
    params = load_params(params_file)
    settings = params.pseudo
    dataset = Dataset.load(MANIFEST)
    ids = dataset.ids("train")
    with CamStore(REFINED_STORE) as cams, CamStore(RW_STORE) as walked, LabelDirWriter(MASK_DIR, dataset) as writer:
        cams.check_covers(ids)
        walked.check_covers(ids)
        check_label_dir(CRF_DIR, ids, "dcrf")
        for image_id in ids:
            by_source = {
                "cam": lambda: cam_labels(*cams.read(image_id), params.cams.bg_threshold),
                "rw": lambda: rw_labels(walked, image_id),
                "crf": lambda: read_label_dir(CRF_DIR, image_id),
            }
            labels = by_source[settings.source]()
            if settings.uncertain_to_void:
                other = "rw" if settings.source == "crf" else "crf"
                labels = disagreement_to_void(labels, by_source[other]())
            writer.write(image_id, labels)
    report = writer.report()
    write_json(METRICS, report)
    typer.echo(f"pseudo masks ({settings.source}): mIoU {report['miou']:.4f}, coverage {report['coverage']:.1%}")


app = single_command(pseudo_masks)

if __name__ == "__main__":
    app()
