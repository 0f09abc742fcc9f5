"""What every stage entrypoint shares: params loading and composition, one-line errors, the Typer app, stage
times, training curves and score files."""
from __future__ import annotations

import contextlib
import functools
import json
import re
import time
from pathlib import Path
from typing import Callable, Iterator

import typer
import yaml
from dvclive import Live

from stages.artifacts import OUTPUTS, PARAMS_FILE, SCORE_FILES, STAGE_TIMES
from wsss_core.config import Params, parse_params
from wsss_core.distributed import is_main, launched_by_torchrun
from wsss_core.errors import DataError, ParamsError, WsssError
from wsss_core.io import atomic_path
from wsss_core.methods import method_params


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads exponent floats without a dot (1e-3) as numbers, as YAML 1.2
    and DVC do (YAML 1.1, PyYAML's default, reads them as text)."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"))


def load_params(path: Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml (method sections by the registered methods); problems are a ParamsError."""
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    return parse_params_text(path.read_text(), str(path))


def parse_params_text(text: str, source: str) -> Params:
    """Validate params given as YAML text (read as YAML 1.2 reads numbers); problems are a ParamsError naming
    source."""
    try:
        mapping = yaml.load(text, Loader=_Yaml12Loader)
    except yaml.YAMLError as err:
        raise ParamsError(f"{source}: not valid YAML ({str(err).splitlines()[0]})") from None
    return parse_params(mapping, method_params(), source=source)


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


def single_command(function: Callable) -> typer.Typer:
    """Return a Typer app whose only command is `function` (for `python -m stages.<name>`, as dvc.yaml runs them).

    A DAG stage (a name in artifacts.OUTPUTS) that completes appends {stage, seconds, finished (Unix time)} to
    artifacts.STAGE_TIMES, from the process that was started (under torchrun: the launcher, not the ranks).
    """
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    if function.__name__ not in OUTPUTS:
        app.command()(function)
        return app

    @functools.wraps(function)
    def timed(*args, **kwargs):
        started = time.time()
        result = function(*args, **kwargs)
        if not launched_by_torchrun():
            record_stage_time(function.__name__, time.time() - started)
        return result

    app.command()(timed)
    return app


def record_stage_time(stage: str, seconds: float) -> None:
    """Append one line {stage, seconds, finished} to artifacts.STAGE_TIMES (not a DVC output)."""
    STAGE_TIMES.parent.mkdir(parents=True, exist_ok=True)
    with STAGE_TIMES.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"stage": stage, "seconds": round(seconds, 2), "finished": round(time.time(), 2)})
                     + "\n")


@contextlib.contextmanager
def training_curves(folder: str | Path) -> Iterator[Live | None]:
    """Yield a dvclive Live writing into `<folder>.tmp`, which replaces `folder` when training succeeds.

    A run that fails or is killed leaves the previous curves in place. Ranks other than 0 of a torchrun
    world get None: only rank 0 logs.
    """
    if not is_main():
        yield None
        return
    with atomic_path(folder, folder=True) as staging, Live(str(staging), dvcyaml=None, save_dvc_exp=False) as live:
        yield live


def log_epoch(live: Live, epoch: int, values: dict[str, float]) -> None:
    """Log one epoch's values to a dvclive Live, advance its step, and echo them on one line."""
    for name, value in values.items():
        live.log_metric(name, value)
    live.next_step()
    typer.echo(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))


def read_score_files() -> dict[str, dict]:
    """Return {file stem: document} of the pipeline's score files (artifacts.SCORE_FILES; a missing one is left
    out, an unreadable one is a DataError naming it)."""
    documents = {}
    for path in SCORE_FILES:
        if path.is_file():
            try:
                documents[path.stem] = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as err:
                raise DataError(f"{path}: unreadable metrics file ({err})") from None
    return documents


CONFIG_DIR = Path("conf")


def compose(overrides: list[str], config_dir: Path = CONFIG_DIR) -> str:
    """Return the YAML text DVC's Hydra composition writes to params.yaml for these overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(str(config_dir.resolve()), version_base=None):
            config = hydra_compose(config_name="config", overrides=overrides)
        OmegaConf.resolve(config)
    except (HydraException, OmegaConfBaseException) as err:
        raise ParamsError(f"{config_dir}: cannot compose {' '.join(overrides) or 'the default'} "
                          f"({str(err).splitlines()[0]})") from None
    return OmegaConf.to_yaml(config)
