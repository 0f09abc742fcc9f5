"""`wsss compose`: write params.yaml from conf/ exactly as `dvc exp run` does (DVC's Hydra composition).

`wsss compose` writes the committed default; `wsss compose method=cam data=voc12-mini` previews an
experiment's params without running it (the same overrides as `dvc exp run -S ...`).
"""
from __future__ import annotations

from pathlib import Path

import typer

from stages._common import compose, parse_params_text, reports_errors, single_command
from stages.artifacts import PARAMS_FILE
from wsss_core.io import atomic_path


@reports_errors
def compose_params(
    overrides: list[str] = typer.Argument(None, help="Hydra overrides, e.g. method=cam data=voc12-mini cls.lr=0.05"),
    out: Path = typer.Option(PARAMS_FILE, "--out", help="file to write ('-' prints it)"),
) -> None:
    """Compose params.yaml from conf/ (as `dvc exp run -S ...` would), validate it and write it (nothing is
    written when the composed params would be refused by the stages)."""
    text = compose(overrides or [])
    parse_params_text(text, f"params composed from conf/ with {' '.join(overrides or []) or 'no override'}")
    if str(out) == "-":
        typer.echo(text, nl=False)
    else:
        with atomic_path(out) as temporary:
            temporary.write_text(text)
        typer.echo(f"wrote {out}")


app = single_command(compose_params)

if __name__ == "__main__":
    app()
