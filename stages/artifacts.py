"""Every artifact path of the DAG, in one table: the stages read and write these names only.

dvc.yaml declares the same paths as each stage's outs, metrics and plots (tests/test_wiring.py
checks that they agree), so no stage imports another stage to learn a path.
"""
from __future__ import annotations

from pathlib import Path

PARAMS_FILE = Path("params.yaml")
PREPARED = Path("data/prepared")
MANIFEST = PREPARED / "dataset.json"

CLS_CHECKPOINT = Path("models/cls.pt")
CLS_CURVES = Path("dvclive/train_cls")
CLS_METRICS = Path("metrics/train_cls.json")
CAM_STORE = Path("cams/cams.h5")
EXPORT_SPEED = Path("metrics/export_speed.json")
CAM_METRICS = Path("metrics/cam.json")
CAM_SWEEP_PLOT = Path("plots/cam_sweep.json")
REFINED_STORE = Path("cams/cams_refined.h5")
REFINED_METRICS = Path("metrics/cam_refined.json")
AFFINITY_LABELS = Path("labels/affinity")
AFFINITY_LABEL_METRICS = Path("metrics/affinity_labels.json")
AFFINITY_CHECKPOINT = Path("models/affinity.pt")
AFFINITY_CURVES = Path("dvclive/train_affinity")
RW_STORE = Path("cams/cams_rw.h5")
RW_METRICS = Path("metrics/rw.json")
CRF_LABELS = Path("labels/crf")
CRF_METRICS = Path("metrics/crf.json")
PSEUDO_MASKS = Path("labels/pseudo")
PSEUDO_METRICS = Path("metrics/pseudo.json")
SEG_CHECKPOINT = Path("models/seg.pt")
SEG_CURVES = Path("dvclive/train_seg")
RWS_REPORT = Path("rws")
SEG_METRICS = Path("metrics/seg.json")
SEG_ONESTEP_METRICS = Path("metrics/seg_onestep.json")
SEG_PER_CLASS_PLOT = Path("plots/seg_per_class.json")
SEG_CONFUSION_PLOT = Path("plots/seg_confusion.png")
SEG_MONTAGE = Path("plots/seg_val.png")
SUMMARY_METRICS = Path("metrics/summary.json")
# The score files the summary reads (and `wsss collect` stores with a run).
SCORE_FILES = (CLS_METRICS, CAM_METRICS, REFINED_METRICS, AFFINITY_LABEL_METRICS, RW_METRICS, CRF_METRICS,
               PSEUDO_METRICS, SEG_METRICS, SEG_ONESTEP_METRICS)
# Not a DVC output: each stage run from its module appends {stage, seconds, finished} here (`wsss collect`).
STAGE_TIMES = Path("logs/stage_times.jsonl")

# What each stage writes, by kind: "folder" (label PNGs), "store" (HDF5 CAM store), "checkpoint",
# "metrics" (JSON with miou and per_class), "plot" (JSON or PNG), "curves" (a dvclive folder:
# metrics.json and plots/metrics/), "file" (any other JSON).
OUTPUTS: dict[str, dict[Path, str]] = {
    "prepare": {PREPARED: "folder"},
    "train_cls": {CLS_CHECKPOINT: "checkpoint", CLS_CURVES: "curves", CLS_METRICS: "file"},
    "export_cams": {CAM_STORE: "store", EXPORT_SPEED: "file"},
    "eval_cams": {CAM_METRICS: "metrics", CAM_SWEEP_PLOT: "plot"},
    "refine": {REFINED_STORE: "store", REFINED_METRICS: "metrics"},
    "affinity_labels": {AFFINITY_LABELS: "folder", AFFINITY_LABEL_METRICS: "metrics"},
    "train_affinity": {AFFINITY_CHECKPOINT: "checkpoint", AFFINITY_CURVES: "curves"},
    "random_walk": {RW_STORE: "store", RW_METRICS: "metrics"},
    "dcrf": {CRF_LABELS: "folder", CRF_METRICS: "metrics"},
    "pseudo_masks": {PSEUDO_MASKS: "folder", PSEUDO_METRICS: "metrics"},
    "train_seg": {SEG_CHECKPOINT: "checkpoint", SEG_CURVES: "curves", RWS_REPORT: "folder"},
    "evaluate": {SEG_METRICS: "metrics", SEG_ONESTEP_METRICS: "metrics", SEG_PER_CLASS_PLOT: "plot",
                 SEG_CONFUSION_PLOT: "plot", SEG_MONTAGE: "plot"},
    "summary": {SUMMARY_METRICS: "file"},
}
