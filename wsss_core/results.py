"""Results as data: one run's headline numbers, runs grouped and aggregated over seeds (mean, std, n).

A *run record* is a JSON file: {'name', 'method', 'data', 'profile', 'seed', 'variant', 'control', 'command',
'commit', 'created', 'headline': {column: value}, 'per_class': {stage: {class: iou}}, 'seconds': {stage: s},
'cores', 'threads', 'learned': {name: value}} (the CPU cores the run could use and torch's threads: wall times
depend on them; 'learned', optional: the classifier's learned scalars such as attention gates). Runs that differ
only in their seed form one row of the results report. Nothing here knows DVC or reads params.yaml: the caller
hands in metrics dicts and run records.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from wsss_core.errors import DataError

# (column, metrics file stem, key path), in pipeline order. Scores are fractions in [0, 1].
HEADLINE_SOURCES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("cls_map_val", "train_cls", ("val_map",)),
    ("cls_map_train", "cam", ("classifier_map",)),
    ("cam", "cam", ("miou",)),
    ("cam_best", "cam", ("sweep", "best_miou")),
    ("cam_best_threshold", "cam", ("sweep", "best_threshold")),
    ("cam_auc", "cam", ("auc",)),
    ("cam_mean_peak", "cam", ("activation", "mean_peak")),
    ("refined", "cam_refined", ("miou",)),
    ("refined_best", "cam_refined", ("sweep", "best_miou")),
    ("refined_auc", "cam_refined", ("auc",)),
    ("refined_corr", "cam_refined", ("correlation_with_input",)),
    ("attention_object", "cam_refined", ("attention", "object_query_on_objects")),
    ("attention_background", "cam_refined", ("attention", "background_query_on_objects")),
    ("attention_grid", "cam_refined", ("attention", "object_token_share")),
    ("class_map_corr", "cam_refined", ("attention", "class_map_correlation")),
    ("rw", "rw", ("miou",)),
    ("rw_auc", "rw", ("auc",)),
    ("crf", "crf", ("miou",)),
    ("pseudo", "pseudo", ("miou",)),
    ("seg", "seg", ("miou",)),
    ("seg_onestep", "seg_onestep", ("miou",)),
    ("seg_rws_blend", "seg", ("test_time_blend", "miou")),
    ("train_all_bg", "cam", ("baselines", "all_background")),
    ("train_all_fg", "cam", ("baselines", "all_foreground")),
    ("val_all_bg", "seg", ("baselines", "all_background")),
    ("val_all_fg", "seg", ("baselines", "all_foreground")),
)
HEADLINE_COLUMNS = tuple(column for column, _, _ in HEADLINE_SOURCES)
# Files whose per-class IoU the report draws.
PER_CLASS_SOURCES = ("cam", "cam_refined", "rw", "pseudo", "seg")


def _lookup(document: dict | None, path: tuple[str, ...]):
    for key in path:
        if not isinstance(document, dict):
            return None
        document = document.get(key)
    return document if isinstance(document, (int, float)) and not isinstance(document, bool) else None


def headline(metrics: dict[str, dict]) -> dict[str, float | None]:
    """Return {column: value or None} from metrics documents keyed by file stem ('cam', 'seg', ...).

    A missing file, a placeholder (miou null) or a missing key gives None: never a made-up value.
    """
    return {column: _lookup(metrics.get(stem), path) for column, stem, path in HEADLINE_SOURCES}


def per_class(metrics: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Return {stem: {class: IoU}} of the PER_CLASS_SOURCES files that were scored (classes without IoU left out)."""
    result = {}
    for stem in PER_CLASS_SOURCES:
        document = metrics.get(stem) or {}
        values = {name: value for name, value in (document.get("per_class") or {}).items() if value is not None}
        if document.get("miou") is not None and values:
            result[stem] = values
    return result


def learned(metrics: dict[str, dict]) -> dict[str, float]:
    """Return the numeric scalars of train_cls's 'learned' (gates, gains, onsets; booleans and nested values left
    out), {} when there are none."""
    values = (metrics.get("train_cls") or {}).get("learned")
    if not isinstance(values, dict):
        return {}
    return {name: value for name, value in values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}


@dataclass(frozen=True)
class Spread:
    """n values' mean and sample standard deviation (std None for n = 1; mean None for n = 0)."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values) -> "Spread":
        values = [float(value) for value in values if value is not None and math.isfinite(value)]
        if not values:
            return cls(None, None, 0)
        mean = sum(values) / len(values)
        if len(values) == 1:
            return cls(mean, None, 1)
        return cls(mean, math.sqrt(sum((value - mean) ** 2 for value in values) / (len(values) - 1)), len(values))

    def text(self, scale: float = 100.0, digits: int = 1) -> str:
        """'54.1 ± 0.8 (n=3)', '54.1 (one run)', or 'not measured'; scores in % with scale 100."""
        if self.mean is None:
            return "not measured"
        if self.std is None:
            return f"{self.mean * scale:.{digits}f} (one run)"
        return f"{self.mean * scale:.{digits}f} ± {self.std * scale:.{digits}f} (n={self.n})"


@dataclass
class Row:
    """The runs of one (method, variant, data, profile): one row of the report."""

    method: str
    variant: str
    data: str
    profile: str
    runs: list[dict] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str, str, str]:
        return self.method, self.variant, self.data, self.profile

    def spread(self, column: str) -> Spread:
        return Spread.of(run["headline"].get(column) for run in self.runs)

    def on_seeds(self, seeds: set[int]) -> "Row":
        """Return this row with only the runs of the given seeds."""
        return Row(*self.key, runs=[run for run in self.runs if run["seed"] in seeds])

    def seconds(self, stage: str) -> Spread:
        return Spread.of(run.get("seconds", {}).get(stage) for run in self.runs)

    def learned(self) -> dict[str, Spread]:
        """Return {name: spread over the runs} of the learned scalars, names in the order the runs list them."""
        names = dict.fromkeys(name for run in self.runs for name in run.get("learned", {}))
        return {name: Spread.of(run.get("learned", {}).get(name) for run in self.runs) for name in names}

    @property
    def seeds(self) -> list[int]:
        return sorted(run["seed"] for run in self.runs)


RECORD_KEYS = ("name", "method", "data", "profile", "seed", "variant", "command", "commit", "headline")


def read_record(path: Path) -> dict:
    """Return the run record at path; a DataError naming the file and what is wrong otherwise."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"{path}: not a readable run record ({err})") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}: not a run record (a JSON object expected)")
    missing = [key for key in RECORD_KEYS if key not in record]
    if missing:
        raise DataError(f"{path}: run record without {', '.join(missing)}")
    if not isinstance(record["headline"], dict) or not isinstance(record["seed"], int):
        raise DataError(f"{path}: run record with a malformed headline or seed")
    return record


def fill_cached_seconds(seconds: dict[str, float], record: dict, earlier: dict, where: str) -> dict[str, float]:
    """Return seconds with the stage times of `earlier`, a record of the run that computed the stages this run
    restored from DVC's run cache, for the stages seconds lacks (its own times win), in earlier's stage order.

    earlier must be the same computation: the same method, data, profile and seed, and every headline value the
    two records both have equal (a DataError naming `where` otherwise)."""
    for key in ("method", "data", "profile", "seed"):
        if record[key] != earlier.get(key):
            raise DataError(f"{where}: {key} {earlier.get(key)!r}, this run's is {record[key]!r}")
    for column, value in record["headline"].items():
        other = earlier["headline"].get(column)
        if value is not None and other is not None and value != other:
            raise DataError(f"{where}: {column} {other}, this run's is {value}: not the same computation")
    return {**earlier.get("seconds", {}), **seconds}  # earlier's keys keep their place, this run's new ones follow


def group_runs(records: list[dict]) -> list[Row]:
    """Return the rows, runs that differ only in seed grouped, in a stable order (data, method, variant)."""
    rows: dict[tuple, Row] = {}
    for record in records:
        key = (record["method"], record["variant"], record["data"], record["profile"])
        rows.setdefault(key, Row(*key)).runs.append(record)
    for row in rows.values():
        seeds = [run["seed"] for run in row.runs]
        duplicated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
        if duplicated:
            names = [run["name"] for run in row.runs if run["seed"] == duplicated[0]]
            raise DataError(f"runs {', '.join(names)}: two records of {row.method} {row.variant or ''} on "
                            f"{row.data} with seed {duplicated[0]}")
        row.runs.sort(key=lambda run: run["seed"])
    return sorted(rows.values(), key=lambda row: (row.data != "synthetic", row.data, row.method != "cam",
                                                  row.method, row.variant))


def compare(a: Row, b: Row, column: str) -> str:
    """Return a sentence comparing column between two rows: the difference of the means and whether it lies
    inside the spread (|difference| <= the larger std, or either side has fewer than 2 runs)."""
    sa, sb = a.spread(column), b.spread(column)
    if sa.mean is None or sb.mean is None:
        return "not measured on both sides"
    difference = (sa.mean - sb.mean) * 100
    if sa.n < 2 or sb.n < 2:
        return f"{difference:+.1f} points (fewer than 2 seeds on a side: no claim)"
    spread = max(sa.std, sb.std) * 100
    verdict = "inside the spread: no difference" if abs(difference) <= spread else "outside the spread"
    return f"{difference:+.1f} points, largest std {spread:.1f}: {verdict}"


# The report's tables: (column, heading). Scores are shown in %, AUC and correlation as they are.
SCORE_TABLE = (("cls_map_val", "cls mAP (val)"), ("cam", "CAM @0.15"), ("cam_best", "CAM best"),
               ("refined", "refined"), ("rw", "RW"), ("crf", "CRF"), ("pseudo", "pseudo"), ("seg", "seg (val)"),
               ("seg_onestep", "one-step (val)"), ("seg_rws_blend", "RWS blended (val)"))
LOCALISATION_TABLE = (("cam_auc", "CAM AUC"), ("cam_best_threshold", "CAM best at"),
                      ("cam_mean_peak", "CAM mean peak (no GT)"),
                      ("refined_auc", "refined AUC"), ("refined_corr", "refined r(CAM)"), ("rw_auc", "RW AUC"),
                      ("cls_map_train", "cls mAP (train)"), ("train_all_bg", "all bg (train)"),
                      ("train_all_fg", "all fg (train)"), ("val_all_bg", "all bg (val)"),
                      ("val_all_fg", "all fg (val)"))
ATTENTION_TABLE = (("cam_best", "CAM best"), ("refined_best", "refined best"), ("cam_auc", "CAM AUC"),
                   ("refined_auc", "refined AUC"), ("attention_object", "object queries on objects"),
                   ("attention_background", "background queries on objects"), ("attention_grid", "objects' grid share"),
                   ("class_map_corr", "class maps r"))
UNSCALED = {"cam_auc", "cam_best_threshold", "cam_mean_peak", "refined_auc", "refined_corr", "rw_auc", "cls_map_val",
            "cls_map_train", "attention_object", "attention_background", "attention_grid", "class_map_corr"}
TIMED_STAGES = ("prepare", "train_cls", "export_cams", "eval_cams", "refine", "affinity_labels", "train_affinity",
                "random_walk", "dcrf", "pseudo_masks", "train_seg", "evaluate")


def row_label(row: Row) -> str:
    """'cam', 'cam · rws' (method · variant)."""
    return row.method + (f" · {row.variant}" if row.variant else "")


def cell(row: Row, column: str) -> str:
    spread = row.spread(column)
    return spread.text(1.0, 3) if column in UNSCALED else spread.text()


def _table(rows: list[Row], columns, first=("method", "data")) -> list[str]:
    lines = ["| " + " | ".join((*first, *(heading for _, heading in columns))) + " |",
             "|" + "---|" * (len(first) + len(columns))]
    for row in rows:
        lines.append("| " + " | ".join((row_label(row), row.data, *(cell(row, column) for column, _ in columns)))
                     + " |")
    return lines


def per_class_tables(rows: list[Row], stage: str = "seg") -> list[str]:
    """One table per data set: each row's per-class IoU of `stage` (mean over its seeds, %), classes as columns
    in the order the first run lists them; rows without that stage's per-class scores are left out."""
    lines = []
    for data in dict.fromkeys(row.data for row in rows):
        scored = [row for row in rows if row.data == data and any(stage in run.get("per_class", {}) for run in row.runs)]
        if not scored:
            continue
        classes = list(next(run["per_class"][stage] for run in scored[0].runs if stage in run.get("per_class", {})))
        lines += [f"{data}:", "", "| method | n | " + " | ".join(classes) + " |", "|---|---|" + "---|" * len(classes)]
        for row in scored:
            means = [Spread.of(run.get("per_class", {}).get(stage, {}).get(name) for run in row.runs).mean
                     for name in classes]
            lines.append(f"| {row_label(row)} | {len(row.runs)} | "
                         + " | ".join("—" if mean is None else f"{100 * mean:.1f}" for mean in means) + " |")
        lines.append("")
    return lines


def learned_lines(rows: list[Row]) -> list[str]:
    """One line per row that stored learned scalars: each one's mean ± std over the seeds (3 decimals)."""
    return [f"- {row_label(row)}, {row.data}: " + "; ".join(f"{name} {spread.text(1.0, 3)}"
                                                          for name, spread in spreads.items())
            for row in rows if (spreads := row.learned())]


def attention_rows(rows: list[Row]) -> list[Row]:
    """Return the rows that recorded the refinement's attention statistics."""
    return [row for row in rows if row.spread("attention_object").mean is not None]


def headline_table(rows: list[Row]) -> list[str]:
    """The README's table: the pipeline's stages for every row, mean ± std over seeds (mIoU in %)."""
    return _table(rows, SCORE_TABLE)


def comparisons(rows: list[Row]) -> list[str]:
    """One line per row whose runs name a control ('control': a variant of the same method, data and
    profile): the difference of each stage's mean and whether it lies inside the spread, over the seeds both
    rows ran (same seeds, same data order and upstream stages), so that unpaired seeds never enter it."""
    by_key = {row.key: row for row in rows}
    lines = []
    for row in rows:
        controls = {run.get("control") for run in row.runs} - {None}
        for control in sorted(controls):
            other = by_key.get((row.method, control, row.data, row.profile))
            label = f"{row_label(row)} against {row.method}{f' · {control}' if control else ''} on {row.data}"
            if other is None:
                lines.append(f"- {label}: the control has no run")
                continue
            shared = set(row.seeds) & set(other.seeds)
            if not shared:
                lines.append(f"- {label}: no seed run on both sides")
                continue
            row_shared, other = row.on_seeds(shared), other.on_seeds(shared)
            parts = [f"{heading} {compare(row_shared, other, column)}" for column, heading in SCORE_TABLE
                     if row_shared.spread(column).mean is not None and other.spread(column).mean is not None
                     and row_shared.spread(column).mean != other.spread(column).mean]
            seeds = ", ".join(map(str, sorted(shared)))
            lines.append(f"- {label} (seeds {seeds}, n={len(shared)}): " + ("; ".join(parts) or
                                                                          "identical on every stage"))
    return lines


def render_markdown(rows: list[Row]) -> str:
    """Return docs/results.md: the headline table, localisation and baselines, the attention statistics of the
    rows that have them, comparisons, times, provenance."""
    with_attention = attention_rows(rows)
    out = ["# Results", "",
           "Generated by `wsss report` from the run records in `results/runs/` (one JSON file per run, written by",
           "`wsss collect` after the run); do not edit by hand. mIoU in %, mean ± sample std over seeds with n;",
           "\"one run\" is a single seed; \"not measured\" means no run scored that stage. CAM, refined, RW, CRF and",
           "pseudo are scored on the train split (as the field reports seeds and pseudo masks), seg on val.",
           "\"CAM best\" is the mIoU at the best background threshold of a sweep tuned on ground truth (diagnostic",
           "only; \"CAM best at\" is that threshold).", "",
           "## Every stage", "", *headline_table(rows), "",
           "## Localisation and the trivial baselines", "",
           "AUC: mean over (image, present class) of the ROC AUC of the class map on its class's pixels against",
           "background pixels (0.5: no localisation, below: inverted). refined r(CAM): correlation of the refined",
           "maps with the CAMs. all bg / all fg: every pixel background, or every pixel the image's first tagged",
           "class: a score at these levels carries no localisation.", "",
           *_table(rows, LOCALISATION_TABLE), "",
           "## The refinement's assumption (methods that refine with attention)", "",
           "Shares of patch attention on object tokens (a token is an object token when more than half of its",
           "labelled pixels are foreground), from object queries and from background queries: an affinity gives the",
           "first more than the second, an evidence hub the second as much or more. class maps r: mean correlation",
           "of the present classes' class-to-patch maps on multi-class images (class-specific maps: low). A",
           "refinement that helps raises the AUC and does not lower the best mIoU.", "",
           *(_table(with_attention, ATTENTION_TABLE) if with_attention else ["- none recorded"]), "",
           "## Per-class IoU of the segmenter (val, mean over seeds, %)", "", *per_class_tables(rows),
           "## Learned scalars of the classifier", "",
           "What `train_cls` learned that the method's mechanism depends on (`metrics/train_cls.json` `learned`):",
           "attention gates (`beta_sa*`: 0 switches a block off, below 0 subtracts its context), CoAM gains, the",
           "seed onset step, coupling weights.", "", *(learned_lines(rows) or ["- none recorded"]), "",
           "## Comparisons with a control", "",
           "Each comparison takes the seeds both rows ran (a seed fixes the data order and the upstream stages). A",
           "difference is called inside the spread when it is no larger than the larger of the two standard",
           "deviations.", "", *(comparisons(rows) or ["- none recorded"]), "",
           "## Wall time per stage (s, mean over the runs that ran the stage; cached stages count as not measured)",
           "", "cores / threads: the CPU cores each run could use and torch's threads; a row that lists several mixes",
           "runs made under different limits, so its times are only indicative. timed sum: the sum of the row's",
           "stage means (a DAG's wall time when every stage is timed; less when some were cached).", "",
           "| method | data | cores / threads | timed sum | " + " | ".join(TIMED_STAGES) + " |",
           "|---|---|---|---|" + "---|" * len(TIMED_STAGES)]
    for row in rows:
        limits = sorted({f"{run.get('cores', '?')} / {run.get('threads', '?')}" for run in row.runs})
        means = [row.seconds(stage).mean for stage in TIMED_STAGES]
        timed = [mean for mean in means if mean is not None]
        out.append(f"| {row_label(row)} | {row.data} | {', '.join(limits)} | {f'{sum(timed):.0f}' if timed else '—'} | "
                   + " | ".join(_seconds(row.seconds(stage)) for stage in TIMED_STAGES) + " |")
    out += ["", "## How to reproduce each row", "", *reproduce_lines(rows)]
    return "\n".join(out) + "\n"


def reproduce_lines(rows: list[Row]) -> list[str]:
    """One line per row: its seeds, commits and command (the seed as N)."""
    lines = []
    for row in rows:
        commits = sorted({run["commit"] for run in row.runs})
        command = re.sub(r"-S seed=\d+", "-S seed=N", row.runs[0]["command"])
        lines.append(f"- **{row_label(row)}, {row.data}, profile {row.profile}** (N = {', '.join(map(str, row.seeds))};"
                     f" commit {', '.join(commits)}): `{command}`")
    return lines


def _seconds(spread: Spread) -> str:
    return "—" if spread.mean is None else f"{spread.mean:.0f}"


BLOCK_BEGIN = "<!-- results:begin (generated by `wsss report` from docs/results.md; do not edit) -->"
BLOCK_END = "<!-- results:end -->"


def readme_block(rows: list[Row]) -> str:
    """Return the README's generated block: the headline table of docs/results.md, between the markers."""
    return "\n".join([BLOCK_BEGIN, *headline_table(rows), BLOCK_END])


def replace_block(text: str, block: str, where: str) -> str:
    """Return text with the part between BLOCK_BEGIN and BLOCK_END replaced by block; DataError without markers."""
    start, end = text.find(BLOCK_BEGIN), text.find(BLOCK_END)
    if start < 0 or end < start:
        raise DataError(f"{where}: no results block (add the lines {BLOCK_BEGIN!r} and {BLOCK_END!r})")
    return text[:start] + block + text[end + len(BLOCK_END):]


# A method page's generated block: the rows a selector names, e.g. `cam,multisa/*` (`method` is the method's
# plain row, `method/variant` one variant, `method/*` all of its rows).
ROWS_BEGIN = re.compile(r"<!-- results:rows (\S+) \(generated by `wsss report`; do not edit\) -->")
ROWS_END = "<!-- results:rows:end -->"


def select_rows(rows: list[Row], selector: str) -> tuple[list[Row], list[str]]:
    """Return the rows a selector names, in the report's order, and the selector's tokens that name no row."""
    tokens = [token.partition("/") for token in selector.split(",")]
    matches = {(method, variant): [row for row in rows if row.method == method and variant in ("*", row.variant)]
               for method, _, variant in tokens}
    chosen = {id(row) for found in matches.values() for row in found}
    unmatched = [f"{method}/{variant}" if variant else method for (method, variant), found in matches.items()
                 if not found]
    return [row for row in rows if id(row) in chosen], unmatched


def rows_block(rows: list[Row], selector: str) -> list[str]:
    """Return a method page's generated block (markers included): the selected rows' stages, localisation and
    trivial baselines, the attention statistics of the rows that have them, the segmenter's per-class IoU, the
    classifier's learned scalars, their comparisons with their controls, and the command of each row."""
    chosen, unmatched = select_rows(rows, selector)
    selected = {id(row) for row in chosen}
    own_comparisons = comparisons(chosen) if chosen else []
    with_attention, per_class_lines, learned_scalars = attention_rows(chosen), per_class_tables(chosen), \
        learned_lines(chosen)
    return [f"<!-- results:rows {selector} (generated by `wsss report`; do not edit) -->", "",
            "mIoU in %, mean ± sample std over seeds (n), from [the results report](../results.md):", "",
            *_table(chosen, SCORE_TABLE), "", *_table(chosen, LOCALISATION_TABLE), "",
            *(["The refinement's assumption (attention shares on object tokens, class maps' correlation; see the "
               "results report):", "", *_table(with_attention, ATTENTION_TABLE), ""] if with_attention else []),
            *(["The segmenter's per-class IoU (val, mean over seeds, %):", "", *per_class_lines]
              if per_class_lines else []),
            *(["The classifier's learned scalars (mean ± std over seeds):", "", *learned_scalars, ""]
              if learned_scalars else []),
            *(own_comparisons or ["- no comparison with a control stored"]), "",
            *reproduce_lines([row for row in rows if id(row) in selected]),
            *(f"- {token}: no run stored" for token in unmatched), "", ROWS_END]


def replace_rows_blocks(text: str, rows: list[Row], where: str) -> str:
    """Return a page with each of its generated row blocks rewritten from rows; DataError for a block without
    its end marker."""
    out, position = [], 0
    for begin in ROWS_BEGIN.finditer(text):
        if begin.start() < position:
            continue
        end = text.find(ROWS_END, begin.end())
        if end < 0:
            raise DataError(f"{where}: results block {begin.group(1)!r} without {ROWS_END!r}")
        out += [text[position:begin.start()], "\n".join(rows_block(rows, begin.group(1)))]
        position = end + len(ROWS_END)
    return "".join(out) + text[position:]


def extract_block(text: str) -> str | None:
    """Return the README's generated block (markers included), or None without one."""
    start, end = text.find(BLOCK_BEGIN), text.find(BLOCK_END)
    return None if start < 0 or end < start else text[start:end + len(BLOCK_END)]


def _svg_bars(labels: list[str], spreads: list[Spread], *, width: int = 560, bar: int = 16,
              references: dict[str, float] | None = None) -> str:
    """Return an inline SVG of horizontal bars (mean in %, a whisker of ± std) with dashed reference lines."""
    left, scale = 150, (width - 200) / 100
    height = bar * len(labels) + 14 + 14 * len(references or {})
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11" '
             f'font-family="sans-serif">']
    for index, (label, spread) in enumerate(zip(labels, spreads)):
        y = 4 + index * bar
        parts.append(f'<text x="{left - 6}" y="{y + bar - 5}" text-anchor="end">{_escape(label)}</text>')
        if spread.mean is None:
            parts.append(f'<text x="{left + 4}" y="{y + bar - 5}" fill="#888">not measured</text>')
            continue
        value = spread.mean * 100
        parts.append(f'<rect x="{left}" y="{y + 2}" width="{max(value, 0) * scale:.1f}" height="{bar - 4}" '
                     f'fill="#4c78a8"/>')
        if spread.std is not None:
            low, high = (value - spread.std * 100) * scale, (value + spread.std * 100) * scale
            parts.append(f'<line x1="{left + low:.1f}" x2="{left + high:.1f}" y1="{y + bar / 2}" y2="{y + bar / 2}" '
                         f'stroke="#222"/>')
        end = max(value, 0) + (spread.std or 0) * 100  # the label starts past the whisker
        parts.append(f'<text x="{left + end * scale + 6:.1f}" y="{y + bar - 5}">{_escape(spread.text())}</text>')
    bottom = 4 + bar * len(labels)
    for index, (name, value) in enumerate((references or {}).items()):  # one text line each, so none overlaps
        x = left + value * 100 * scale
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="2" y2="{bottom + 14 * index + 4}" stroke="#c44" '
                     f'stroke-dasharray="3,3"/><text x="{x + 2:.1f}" y="{bottom + 14 * index + 14}" fill="#c44">'
                     f'{_escape(name)} {value * 100:.1f}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def render_html(rows: list[Row]) -> str:
    """Return a self-contained page (inline SVG, no script, nothing fetched): per row the stages' bars with the
    trivial baselines as dashed lines, and per-class IoU of each scored stage (mean over seeds)."""
    body = ["<h1>wsss results</h1><p>Generated by <code>wsss report</code> from <code>results/runs/</code>. mIoU in %, "
            "mean ± std over seeds; dashed lines: all-background and all-foreground on the train split.</p>"]
    for row in rows:
        references = {name: row.spread(column).mean for name, column in (("all bg", "train_all_bg"),
                                                                         ("all fg", "train_all_fg"))
                      if row.spread(column).mean is not None}
        body.append(f"<h2>{_escape(row_label(row))} · {_escape(row.data)} · {_escape(row.profile)} "
                    f"(seeds {', '.join(map(str, row.seeds))})</h2>")
        body.append(_svg_bars([heading for _, heading in SCORE_TABLE if heading != "cls mAP (val)"],
                              [row.spread(column) for column, heading in SCORE_TABLE if heading != "cls mAP (val)"],
                              references=references))
        stages = [stem for stem in PER_CLASS_SOURCES if any(stem in run.get("per_class", {}) for run in row.runs)]
        for stem in stages:
            classes = list(next(run["per_class"][stem] for run in row.runs if stem in run.get("per_class", {})))
            spreads = [Spread.of(run.get("per_class", {}).get(stem, {}).get(name) for run in row.runs)
                       for name in classes]
            body.append(f"<h3>per-class IoU: {_escape(stem)}</h3>" + _svg_bars(classes, spreads))
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>wsss results</title>"
            "<style>body{font-family:sans-serif;max-width:900px;margin:auto}h2{margin-top:2em}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")
