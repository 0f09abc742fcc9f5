"""The `wsss` command: every pipeline stage plus inspection commands."""
from __future__ import annotations

import typer

from stages import eval_cams, export_cams, inspect_cams, prepare, train_cls

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Weakly supervised semantic segmentation as a DVC pipeline.")
app.command("prepare", help="Stage: build data/prepared (synthetic or VOC).")(prepare.prepare)
app.command("train-cls", help="Stage: train the method's classifier.")(train_cls.train_cls)
app.command("export-cams", help="Stage: export multi-scale CAMs to HDF5.")(export_cams.export_cams)
app.command("eval-cams", help="Stage: score CAMs (mIoU, threshold sweep).")(eval_cams.eval_cams)
app.add_typer(inspect_cams.app, name="cams")

if __name__ == "__main__":
    app()
