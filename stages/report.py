"""`wsss collect` and `wsss report`: results as data, never typed.

`wsss collect` stores the workspace's finished run (its params' method, data, profile and seed, every score
file's headline numbers and per-class IoU, each stage's wall time with the cores and torch threads it had, the
git commit and the command) as one
JSON record in results/runs/. `wsss report` groups the records by (method, variant, data, profile), aggregates
the seeds (mean, std, n) and writes docs/results.md, the offline page docs/results.html and the README's
results block.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import torch
import typer
import yaml

from stages._common import load_params, read_score_files, reports_errors
from stages.artifacts import OUTPUTS, PARAMS_FILE, STAGE_TIMES
from wsss_core.errors import DataError
from wsss_core.io import atomic_path, write_json
from wsss_core.results import ROWS_BEGIN, fill_cached_seconds, group_runs, headline, learned, per_class, read_record, \
    readme_block, render_html, render_markdown, replace_block, replace_rows_blocks

RUNS_DIR = Path("results/runs")
RESULTS_MD = Path("docs/results.md")
RESULTS_HTML = Path("docs/results.html")
README = Path("README.md")
METHOD_PAGES = Path("docs/methods")


def stage_seconds(since: float) -> dict[str, float]:
    """Return {stage: seconds} of the stages that finished at or after `since` (Unix time), the last run of each."""
    seconds: dict[str, float] = {}
    if not STAGE_TIMES.is_file():
        return seconds
    for line in STAGE_TIMES.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
            if entry["finished"] >= since:
                seconds[str(entry["stage"])] = float(entry["seconds"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a killed process: that stage's time is not measured
    return seconds


def data_label(params) -> str:
    """Return the data a run used: 'synthetic', or the reader's root folder name ('voc12-mini', 'VOC2012', ...)."""
    if params.data.name == "synthetic":
        return "synthetic"
    return Path(getattr(params.data, params.data.name).root).resolve().name or params.data.name


def git_commit() -> str:
    """Return HEAD's short hash, with '+changes' when tracked code or configuration differs from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--", "wsss_core", "stages", "conf", "dvc.yaml"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+changes" if changed else "")


def _paths(entries) -> list[str]:
    """Return the paths of a dvc.yaml deps/outs/metrics/plots list (an entry is a path or {path: options})."""
    return [next(iter(entry)) if isinstance(entry, dict) else str(entry) for entry in entries or []]


def stale_stages(out_of_date: set[str], dvc_yaml: dict) -> set[str]:
    """Return the stages whose outputs do not belong to the workspace's params: those `dvc status` lists
    (out_of_date) and every stage downstream of one (a partial `dvc exp run eval_cams` leaves the later stages'
    committed outputs, and their score files, from another run; their own lock entries still agree)."""
    stages = dvc_yaml.get("stages", {})
    outs = {name: _paths(stage.get("outs")) + _paths(stage.get("metrics")) + _paths(stage.get("plots"))
            for name, stage in stages.items()}
    stale = set(out_of_date) & set(stages)
    grew = True
    while grew:
        stale_outs = [path for name in stale for path in outs[name]]
        grown = {name for name, stage in stages.items() if name not in stale
                 and any(dep == out or dep.startswith(out.rstrip("/") + "/") for dep in _paths(stage.get("deps"))
                         for out in stale_outs)}
        stale |= grown
        grew = bool(grown)
    return stale


def workspace_stale_stages() -> set[str]:
    """Return stale_stages() of the workspace (`dvc status` against dvc.yaml); empty outside a DVC pipeline."""
    dvc_yaml = Path("dvc.yaml")
    if not dvc_yaml.is_file():
        return set()
    try:
        status = subprocess.run(["dvc", "status", "--json"], capture_output=True, text=True, check=True).stdout
        out_of_date = {name.rsplit(":", 1)[-1] for name in json.loads(status or "{}")}
    except (OSError, subprocess.CalledProcessError, ValueError) as err:
        raise DataError(f"dvc status failed ({err}): cannot tell which score files belong to this run") from None
    return stale_stages(out_of_date, yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")))


@reports_errors
def collect(
    command: str = typer.Option(..., "--command", help="the command that made the run, e.g. "
                                "\"dvc exp run -S seed=1\" (stored with the record: the report shows it)"),
    variant: str = typer.Option("", "--variant", help="what sets this run apart from the method's preset (e.g. "
                                "'rws'); runs that differ only in seed share it"),
    control: str = typer.Option(None, "--control", help="the variant of the same method, data and profile to "
                                "compare with ('' for the plain preset)"),
    name: str = typer.Option("", "--name", help="record name (default <data>-<method>[-<variant>]-seed<seed>)"),
    since: float = typer.Option(0.0, "--since", help="Unix time the run started: stage times finished before "
                                "it (cached stages) are not stored"),
    times_from: Path = typer.Option(None, "--times-from", help="the record of the run that computed the stages "
                                    "this one restored from DVC's run cache: their times are kept (checked: the "
                                    "same method, data, profile, seed and shared scores)"),
    runs: Path = typer.Option(RUNS_DIR, "--runs", help="folder of run records"),
    params_file: Path = typer.Option(PARAMS_FILE, "--params", help="params.yaml of the run"),
) -> None:
    """Store the workspace's finished run as a record in results/runs/ for `wsss report`."""
    params = load_params(params_file)
    metrics = read_score_files()
    for stage in sorted(workspace_stale_stages()):
        for path in OUTPUTS.get(stage, {}):
            if metrics.pop(path.stem, None) is not None:
                typer.echo(f"left out {path}: stage {stage} is not up to date with {params_file} (a partial run)")
    values = headline(metrics)
    if all(value is None for value in values.values()):
        raise DataError("metrics/: no score file of a finished run (run `dvc repro` or `dvc exp run` first)")
    data = data_label(params)
    name = name or "-".join(filter(None, (data, params.method, variant))) + f"-seed{params.seed}"
    record = {"name": name, "method": params.method, "data": data, "profile": params.profile,
              "seed": params.seed, "variant": variant, "control": control, "command": " ".join(command.split()),
              "commit": git_commit(), "created": time.strftime("%Y-%m-%d %H:%M:%S"), "headline": values,
              "per_class": per_class(metrics), "seconds": stage_seconds(since), "cores": len(os.sched_getaffinity(0)),
              "threads": torch.get_num_threads(), "learned": learned(metrics)}
    if times_from is not None:
        record["seconds"] = fill_cached_seconds(record["seconds"], record, read_record(times_from), str(times_from))
    path = runs / f"{name}.json"
    write_json(path, record)
    typer.echo(f"wrote {path}")


def read_records(runs: Path, skip_bad: bool) -> list[dict]:
    """Return every record in runs/*.json; a bad one is a DataError naming it, or with skip_bad a warning."""
    if not runs.is_dir():
        raise DataError(f"{runs}: no run records (store runs with `wsss collect`)")
    records = []
    for path in sorted(runs.glob("*.json")):
        try:
            records.append(read_record(path))
        except DataError as err:
            if not skip_bad:
                raise
            typer.secho(f"skipped: {err}", err=True, fg=typer.colors.YELLOW)
    if not records:
        raise DataError(f"{runs}: no run records (store runs with `wsss collect`)")
    return records


@reports_errors
def report(
    runs: Path = typer.Option(RUNS_DIR, "--runs", help="folder of run records (`wsss collect`)"),
    out: Path = typer.Option(RESULTS_MD, "--out", help="the Markdown report"),
    html: Path = typer.Option(RESULTS_HTML, "--html", help="the offline HTML page (inline SVG, no script)"),
    readme: Path = typer.Option(README, "--readme", help="README whose results block is rewritten"),
    pages: Path = typer.Option(METHOD_PAGES, "--pages", help="folder of method pages whose generated row blocks "
                               "(`<!-- results:rows SELECTOR ... -->`) are rewritten"),
    check: bool = typer.Option(False, "--check", help="write nothing; exit 1 when a file differs from the records"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="leave out unreadable records with a warning"),
) -> None:
    """Write docs/results.md, docs/results.html, the README's results block and the method pages' row blocks
    from the run records."""
    rows = group_runs(read_records(runs, skip_bad))
    if not readme.is_file():
        raise DataError(f"{readme}: not found")
    wanted = {out: render_markdown(rows), html: render_html(rows),
              readme: replace_block(readme.read_text(encoding="utf-8"), readme_block(rows), str(readme))}
    for page in sorted(pages.glob("*.md")) if pages.is_dir() else []:
        text = page.read_text(encoding="utf-8")
        if ROWS_BEGIN.search(text):
            wanted[page] = replace_rows_blocks(text, rows, str(page))
    if check:
        stale = [str(path) for path, text in wanted.items()
                 if not path.is_file() or path.read_text(encoding="utf-8") != text]
        if stale:
            typer.secho(f"out of date with {runs}: {', '.join(stale)} (run `wsss report`)", err=True,
                        fg=typer.colors.RED)
            raise typer.Exit(1)
        typer.echo(f"{', '.join(map(str, wanted))} match {runs}")
        return
    for path, text in wanted.items():
        with atomic_path(path) as temporary:
            Path(temporary).write_text(text, encoding="utf-8")
    typer.echo(f"wrote {', '.join(map(str, wanted))} from {sum(len(r.runs) for r in rows)} runs in {len(rows)} rows")
