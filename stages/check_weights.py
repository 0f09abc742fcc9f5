"""`wsss check-weights`: load every pretrained weight file an experiment names, before a long run.

The files are loaded by the very code the training stages use (the classifier of the method, DeepLab's
backbone, AffinityNet's), so a missing file, a pickled one or a key layout that does not fit fails here in
seconds with the stage's own one-line error. `wsss check-weights profile=paper method=mct` takes the same
overrides as `dvc exp run -S ...`.
"""
from __future__ import annotations

from pathlib import Path

import typer

from stages._common import compose, parse_params_text, reports_errors
from stages.artifacts import CLS_CHECKPOINT
from wsss_core.methods import get_method
from wsss_core.models.affinity_net import AffinityNet
from wsss_core.models.deeplab import build_segmenter


@reports_errors
def check_weights(
    overrides: list[str] = typer.Argument(None, help="Hydra overrides, e.g. profile=paper method=mct"),
    classes: int = typer.Option(20, "--classes", help="foreground classes of the heads built around the weights"),
) -> None:
    """Load the pretrained weights that the composed params name (cls, seg, affinity); print what loaded."""
    params = parse_params_text(compose(overrides or []),
                               f"params composed from conf/ with {' '.join(overrides or []) or 'no override'}")
    method = get_method(params)
    method.build_classifier(params.cls, classes, pretrained=True)
    typer.echo(f"classifier ({params.method}, {params.cls.backbone}): "
               + (f"{params.cls.pretrained} loaded" if params.cls.pretrained else "no file (random init)"))
    if params.seg.pretrained and Path(params.seg.pretrained) != CLS_CHECKPOINT:
        build_segmenter(params.seg.arch, params.seg.backbone, classes + 1, params.seg.pretrained,
                        params.seg.output_stride, channels=params.seg.decoder_channels)
        typer.echo(f"segmenter ({params.seg.arch}, {params.seg.backbone}): {params.seg.pretrained} loaded")
    else:
        typer.echo(f"segmenter: {params.seg.pretrained or 'random init'} (made by train_cls, nothing to check now)")
    if params.affinity.pretrained:
        AffinityNet(params.affinity.backbone, params.affinity.pretrained, dilated=params.affinity.dilated)
        typer.echo(f"AffinityNet ({params.affinity.backbone}): {params.affinity.pretrained} loaded")
