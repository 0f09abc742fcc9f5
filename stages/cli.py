"""The `wsss` command: every pipeline stage plus inspection commands."""
from __future__ import annotations

import typer

from stages import (affinity_labels, dcrf, eval_cams, evaluate, export_cams, inspect_cams, inspect_masks, predict,
                    prepare, pseudo_masks, random_walk, refine, train_affinity, train_cls, train_seg)

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Weakly supervised semantic segmentation as a DVC pipeline.")
app.command("prepare", help="Stage: build data/prepared (synthetic or VOC).")(prepare.prepare)
app.command("train-cls", help="Stage: train the method's classifier.")(train_cls.train_cls)
app.command("export-cams", help="Stage: export multi-scale CAMs to HDF5.")(export_cams.export_cams)
app.command("eval-cams", help="Stage: score CAMs (mIoU, threshold sweep).")(eval_cams.eval_cams)
app.command("refine", help="Stage: the method's attention refinement of the CAMs.")(refine.refine)
app.command("affinity-labels", help="Stage: confident affinity labels from CAMs.")(affinity_labels.affinity_labels)
app.command("train-affinity", help="Stage: train AffinityNet.")(train_affinity.train_affinity)
app.command("random-walk", help="Stage: propagate CAMs by random walk.")(random_walk.random_walk)
app.command("dcrf", help="Stage: dense CRF of the random-walk scores.")(dcrf.dcrf)
app.command("pseudo-masks", help="Stage: final pseudo masks (palette PNGs).")(pseudo_masks.pseudo_masks)
app.command("train-seg", help="Stage: train DeepLab on the pseudo masks.")(train_seg.train_seg)
app.command("evaluate", help="Stage: val mIoU of the segmentation network.")(evaluate.evaluate)
app.command("predict", help="Segment new images with a trained checkpoint.")(predict.predict)
app.add_typer(inspect_cams.app, name="cams")
app.add_typer(inspect_masks.app, name="masks")

if __name__ == "__main__":
    app()
