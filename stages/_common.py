"""What every stage entrypoint shares: params loading and one-line error reporting."""
from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path
from typing import Callable, Iterator

import typer
import yaml

from wsss_core.config import CrfParams, Params, parse_params
from wsss_core.errors import ParamsError, WsssError
from wsss_core.refine.crf import CrfSettings

PARAMS_FILE = Path("params.yaml")
MANIFEST = Path("data/prepared/dataset.json")


def load_params(path: Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml; a missing or malformed file is a ParamsError."""
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        mapping = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    return parse_params(mapping, source=str(path))


def reports_errors(function: Callable) -> Callable:
    """Wrap a stage so a WsssError prints as one line on stderr and exits with status 2."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except WsssError as err:
            typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
            raise typer.Exit(2) from None

    return wrapper


def write_json(path: Path, payload: dict) -> None:
    """Write JSON to a temporary name, then rename it into place."""
    with written_then_renamed(path) as temporary:
        temporary.write_text(json.dumps(payload, indent=2) + "\n")


@contextlib.contextmanager
def written_then_renamed(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix) and rename it to `path` if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def single_command(function: Callable) -> typer.Typer:
    """Return a Typer app whose only command is `function` (for `python -m stages.<name>`)."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(function)
    return app


def log_epoch(live, epoch: int, values: dict[str, float]) -> None:
    """Log one epoch's values to a dvclive Live, advance its step, and echo them on one line."""
    for name, value in values.items():
        live.log_metric(name, value)
    live.next_step()
    typer.echo(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))


def crf_settings(section: CrfParams) -> CrfSettings:
    """Return CrfSettings from a params CRF section (its `workers` is not a CRF setting)."""
    return CrfSettings(**section.model_dump(exclude={"workers"}))
