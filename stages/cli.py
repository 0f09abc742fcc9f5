"""The `wsss` command: every pipeline stage plus inspection commands."""
from __future__ import annotations

import typer

from stages import prepare

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Weakly supervised semantic segmentation as a DVC pipeline.")
app.command("prepare", help="Stage: build data/prepared (synthetic or VOC).")(prepare.prepare)

if __name__ == "__main__":
    app()
