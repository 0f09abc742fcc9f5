"""How a stage runs its work: under torchrun, in shards (--shard / --merge) with their checks and merge, the label
stages' shared runner, and placeholder outputs for a stage with nothing to do."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import typer

from stages.artifacts import OUTPUTS
from wsss_core.cams.store import write_placeholder_store
from wsss_core.checkpoint import save_placeholder_checkpoint
from wsss_core.config import Params
from wsss_core.data.dataset import Dataset
from wsss_core.data.label_dir import LabelDirWriter, merge_label_dirs
from wsss_core.distributed import barrier, is_main, launched_by_torchrun, parse_shard, process_group, shard_of, world
from wsss_core.errors import DataError, ParamsError, WsssError
from wsss_core.io import atomic_path, remove_path, shard_path, shard_paths, write_json
from wsss_core.pipeline import skip_reason
from wsss_core.training import resolve_device

SHARD_OPTION = typer.Option("", "--shard", help="i/n: do shard i of n only, writing each output beside itself as "
                            "<name>.shard-i-of-n (e.g. one task of a cluster's job array); merge them with --merge n")


MERGE_OPTION = typer.Option(0, "--merge", help="n: merge the n shards written with --shard into the outputs")


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
