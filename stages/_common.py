"""What every stage entrypoint shares: params loading, one-line errors, curves, placeholders."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
import typer
import yaml
from dvclive import Live

from stages.artifacts import OUTPUTS, PARAMS_FILE, SCORE_FILES, STAGE_TIMES
from wsss_core.cams.store import write_placeholder_store
from wsss_core.checkpoint import save_placeholder_checkpoint
from wsss_core.config import Params, parse_params
from wsss_core.data.dataset import Dataset
from wsss_core.data.label_dir import LabelDirWriter, merge_label_dirs
from wsss_core.distributed import barrier, is_main, launched_by_torchrun, parse_shard, process_group, shard_of, world
from wsss_core.errors import DataError, ParamsError, WsssError
from wsss_core.io import atomic_path, remove_path, shard_path, shard_paths, write_json
from wsss_core.methods import method_params
from wsss_core.pipeline import skip_reason
from wsss_core.training import resolve_device

SHARD_OPTION = typer.Option("", "--shard", help="i/n: do shard i of n only, writing each output beside itself as "
                            "<name>.shard-i-of-n (e.g. one task of a cluster's job array); merge them with --merge n")
MERGE_OPTION = typer.Option(0, "--merge", help="n: merge the n shards written with --shard into the outputs")


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


SAMPLE_BYTES = 1 << 20  # an input file's fingerprint reads its size and this many bytes at each end


def _file_sample(path: Path) -> bytes:
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(SAMPLE_BYTES)
        handle.seek(max(0, size - SAMPLE_BYTES))
        return f"{size}:".encode() + head + handle.read(SAMPLE_BYTES)


def shard_fingerprint(module: str, params: Params) -> str:
    """Return a digest of what a shard of `module` is made from: the params, and every artifact of the stages
    before it in the DAG (a file: its size and first and last MiB; a folder: its files' names and sizes). Shards
    of one run share it on any machine; a shard made with other params or other inputs does not."""
    stage = module.rsplit(".", 1)[1]
    digest = hashlib.sha256(f"{module}\n{params.model_dump_json()}".encode())
    for upstream in list(OUTPUTS)[:list(OUTPUTS).index(stage)]:
        for path in OUTPUTS[upstream]:
            if path.is_file():
                digest.update(str(path).encode() + _file_sample(path))
            elif path.is_dir():
                for file in sorted(p for p in path.rglob("*") if p.is_file()):
                    digest.update(f"{file}:{file.stat().st_size}".encode())
    return digest.hexdigest()


def shard_marker(module: str, index: int, count: int) -> Path:
    """Return the file that says shard `index` of `count` of the stage finished, and from what (its fingerprint)."""
    primary = next(iter(OUTPUTS[module.rsplit(".", 1)[1]]))
    return Path(f"{shard_path(primary, index, count)}.done")


def check_shards(module: str, params: Params, count: int) -> list[Path]:
    """Return the shards' markers after checking that all `count` shards finished from this run's params and
    inputs; a DataError naming the first shard that did not."""
    expected = shard_fingerprint(module, params)
    markers = [shard_marker(module, index, count) for index in range(count)]
    for index, marker in enumerate(markers):
        try:
            made_from = json.loads(marker.read_text())["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            raise DataError(f"{marker}: shard {index} of {count} is missing or did not finish (run it again)") from None
        if made_from != expected:
            raise DataError(f"{marker}: shard {index} of {count} was made with other params or inputs than this "
                            "merge (run every shard again)")
    return markers


def _checked_merge(module: str, params: Params, count: int, seconds: float | None,
                   combine: Callable[[int, float | None], None]) -> None:
    """combine(count, seconds) once check_shards passes, then remove the shards' markers."""
    markers = check_shards(module, params, count)
    combine(count, seconds)
    for marker in markers:
        remove_path(marker)


def run_sharded(module: str, params: Params, shard: str, merge: int,
                work: Callable[[int, int, torch.device], None], combine: Callable[[int, float | None], None]) -> None:
    """Run a per-image stage in one process, as dist.nproc ranks under torchrun, or as one `--shard i/n`.

    work(index, count, device) does shard `index` of `count`: with count 1 the whole stage, into its outputs;
    otherwise into shard_path(output, index, count) beside each. combine(count, seconds) merges `count` shards
    into the outputs and removes them; seconds is the sharded work's wall time under torchrun (rank 0 merges
    once every rank is done), None for `--merge n` after shards that ran apart. Each finished shard writes a
    marker with its shard_fingerprint; a merge first checks that every shard finished from the same params and
    inputs (check_shards), and removes the markers after.
    """
    if merge:
        if merge < 1:
            raise ParamsError(f"--merge {merge}: give the number of shards (at least 1)")
        _checked_merge(module, params, merge, None, combine)
        return
    if not shard and ran_under_torchrun(module, params.dist.nproc):
        return
    with process_group(resolve_device(params.device), params.dist.backend) as device:
        rank, size = world()
        if shard and size > 1:
            raise ParamsError("--shard does one shard in one process; under torchrun the ranks are the shards")
        index, count = parse_shard(shard) if shard else (rank, size)
        started = time.perf_counter()
        work(index, count, device)
        if count > 1:
            write_json(shard_marker(module, index, count), {"fingerprint": shard_fingerprint(module, params)})
        barrier()
        if count > 1 and size > 1 and rank == 0:
            _checked_merge(module, params, count, time.perf_counter() - started, combine)
        elif shard and count > 1:
            typer.echo(f"wrote shard {index} of {count}; once all are written: python -m {module} --merge {count}")


def run_label_stage(module: str, params: Params, shard: str, merge: int, dataset: Dataset, ids: list[str],
                    folder: Path, metrics: Path, write_labels: Callable[[list[str], LabelDirWriter], None],
                    summary: Callable[[dict], str]) -> None:
    """Run a stage whose output is a label folder scored into a metrics file, sharded as run_sharded says.

    write_labels(ids, writer) writes the label maps of some ids, in their order; summary(report) is the line
    echoed at the end. Shards take every n-th id and are merged (merge_label_dirs) into the one-pass folder
    and scores.
    """
    def finish(report: dict) -> None:
        write_json(metrics, report)
        typer.echo(summary(report))

    def work(index: int, count: int, device: torch.device) -> None:
        with LabelDirWriter(folder if count == 1 else shard_path(folder, index, count), dataset) as writer:
            write_labels(shard_of(ids, index, count), writer)
        if count == 1:
            finish(writer.report())

    def combine(count: int, seconds: float | None) -> None:
        parts = shard_paths(folder, count)
        with LabelDirWriter(folder, dataset) as writer:
            merge_label_dirs(parts, writer, ids)
        for part in parts:
            remove_path(part)
        finish(writer.report())

    run_sharded(module, params, shard, merge, work, combine)


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
    if is_main():  # under torchrun, rank 0 alone writes them
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
