"""Stage `summary`: every stage's headline number in one small file, metrics/summary.json, for `dvc exp show`."""
from __future__ import annotations

import typer

from stages._common import read_score_files, reports_errors, single_command
from stages.artifacts import SUMMARY_METRICS
from wsss_core.io import write_json
from wsss_core.results import headline


@reports_errors
def summary() -> None:
    """Write metrics/summary.json: classifier mAP, CAM, refined, random walk, CRF, pseudo-mask and segmenter mIoU,
    AUCs and the trivial baselines (fractions in [0, 1]; null where the stage did not score)."""
    values = {column: None if value is None else round(value, 4)
              for column, value in headline(read_score_files()).items()}
    write_json(SUMMARY_METRICS, values)
    typer.echo(" ".join(f"{column} {value}" for column, value in values.items() if value is not None))


app = single_command(summary)

if __name__ == "__main__":
    app()
