"""What every stage entrypoint shares: params loading, one-line errors, curves, placeholders."""
from __future__ import annotations

import contextlib
import functools
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import typer
import yaml
from dvclive import Live

from stages.artifacts import OUTPUTS, PARAMS_FILE
from wsss_core.cams.store import write_placeholder_store
from wsss_core.checkpoint import save_placeholder_checkpoint
from wsss_core.config import Params, parse_params
from wsss_core.distributed import is_main, launched_by_torchrun
from wsss_core.errors import ParamsError, WsssError
from wsss_core.io import atomic_path, write_json
from wsss_core.methods import method_params
from wsss_core.pipeline import skip_reason


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
    try:
        mapping = yaml.load(path.read_text(), Loader=_Yaml12Loader)
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    return parse_params(mapping, method_params(), source=str(path))


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
    """Return a Typer app whose only command is `function` (for `python -m stages.<name>`)."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(function)
    return app


def ran_under_torchrun(module: str, nproc: int) -> bool:
    """Return False when this process is to do the stage's work: nproc is 1, or torchrun started it.

    Otherwise run `torchrun --standalone --nproc_per_node=nproc -m module` with this process's arguments,
    wait for it and return True; a failed run is a WsssError (each rank has printed its own error).
    """
    if nproc == 1 or launched_by_torchrun():
        return False
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", module, *sys.argv[1:]]
    status = subprocess.run(command).returncode
    if status:
        raise WsssError(f"{module}: torchrun with dist.nproc={nproc} processes failed (exit status {status})")
    return True


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


def skipped(stage: str, params: Params) -> bool:
    """If `stage` does no work with these params (wsss_core.pipeline), write its outputs as placeholders.

    Returns True when it did: a store with no image, a label folder holding only SKIPPED.txt, a
    checkpoint {'skipped': why}, metrics {'miou': null, 'per_class': {}, 'skipped': why}, curves with
    no step; each says why.
    """
    reason = skip_reason(stage, params.pseudo)
    if reason is None:
        return False
    for path, kind in OUTPUTS[stage].items():
        write_placeholder(path, kind, reason)
    typer.echo(f"{stage}: skipped ({reason}); wrote placeholders")
    return True


def write_placeholder(path: Path, kind: str, reason: str) -> None:
    """Write the placeholder of one output of a given kind (see stages.artifacts.OUTPUTS)."""
    if kind == "store":
        write_placeholder_store(path, reason)
    elif kind == "checkpoint":
        save_placeholder_checkpoint(path, reason)
    elif kind == "metrics":
        write_json(path, {"miou": None, "per_class": {}, "skipped": reason})
    elif kind in ("folder", "curves"):
        with atomic_path(path, folder=True) as staging:
            (staging / "SKIPPED.txt").write_text(reason + "\n")
            if kind == "curves":
                (staging / "metrics.json").write_text(json.dumps({"skipped": reason}) + "\n")
                (staging / "plots" / "metrics").mkdir(parents=True)
    else:
        raise ValueError(f"{path}: no placeholder for outputs of kind {kind!r}")
