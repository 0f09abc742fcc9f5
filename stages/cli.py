"""The `wsss` command: every pipeline stage (help from the stage's own docstring) plus inspection commands."""
from __future__ import annotations

import typer

from stages import (affinity_labels, check_weights, compose, dcrf, eval_cams, evaluate, export_cams, inspect_cams, inspect_masks,
                    inspect_rws, predict, prepare, pseudo_masks, random_walk, refine, report, summary, train_affinity,
                    train_cls, train_seg)

STAGE_MODULES = (prepare, train_cls, export_cams, eval_cams, refine, affinity_labels, train_affinity, random_walk,
                 dcrf, pseudo_masks, train_seg, evaluate, summary)

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Weakly supervised semantic segmentation as a DVC pipeline.")
for module in STAGE_MODULES:
    name = module.__name__.rsplit(".", 1)[1]
    summary = " ".join(module.__doc__.split(":", 1)[1].split("\n\n")[0].split())
    app.command(name.replace("_", "-"), help=f"Stage: {summary}")(getattr(module, name))
app.command("predict", help="Segment new images with a trained checkpoint.")(predict.predict)
app.command("compose", help="Write params.yaml from conf/ as `dvc exp run -S ...` would.")(compose.compose_params)
app.command("check-weights", help="Load the pretrained weight files an experiment names, before a long run."
            )(check_weights.check_weights)
app.command("collect", help="Store the workspace's finished run in results/runs/ for `wsss report`.")(report.collect)
app.command("report", help="Write docs/results.md, docs/results.html and the README's results table from "
            "results/runs/.")(report.report)
app.add_typer(inspect_cams.app, name="cams")
app.add_typer(inspect_masks.app, name="masks")
app.add_typer(inspect_rws.app, name="rws")

if __name__ == "__main__":
    app()
