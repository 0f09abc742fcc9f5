"""Stage `random_walk`: propagate the refined CAMs with AffinityNet's transition matrix (PSA).

Sharded like export_cams: dist.nproc > 1 runs the ranks under torchrun, `--shard i/n` one shard (its store
and its confusion matrix beside the outputs), `--merge n` merges them; the merged store and scores equal one
process's.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import typer

from stages._common import load_params, reports_errors, single_command
from stages._run import MERGE_OPTION, SHARD_OPTION, run_sharded, skipped
from stages.artifacts import AFFINITY_CHECKPOINT, MANIFEST, PARAMS_FILE, REFINED_STORE, RW_METRICS, RW_STORE
from wsss_core.affinity.propagate import iterate_random_walk
from wsss_core.cams.labels import argmax_labels
from wsss_core.cams.store import CamStore, CamStoreWriter, merge_stores
from wsss_core.checkpoint import load_checkpoint
from wsss_core.data.dataset import Dataset
from wsss_core.errors import DataError
from wsss_core.io import remove_path, shard_path, shard_paths, write_json
from wsss_core.metrics import (ConfusionMatrix, class_map_aucs, dataset_baselines, describe_miou, mean_or_none,
                               scored_report)
from wsss_core.models.affinity_net import AffinityNet


@reports_errors
def random_walk(params_file: Path = typer.Option(PARAMS_FILE, "--params", help="params.yaml to read"),
                shard: str = SHARD_OPTION, merge: int = MERGE_OPTION) -> None:
    """Write cams/cams_rw.h5 ('cam' and 'background' maps) and metrics/rw.json (argmax mIoU)."""
    params = load_params(params_file)
    if skipped("random_walk", params):
        return
    rw, affinity = params.rw, params.affinity
    dataset = Dataset.load(MANIFEST)
    ids = dataset.ids("train")

    def finish(confusion: np.ndarray, aucs: list[float]) -> None:
        report = scored_report(confusion, dataset.class_names, len(dataset.scored_ids(ids)))
        if report["miou"] is not None:
            report.update(auc=mean_or_none(aucs), baselines=dataset_baselines(dataset, ids))
        write_json(RW_METRICS, report)
        typer.echo(f"random walk: {describe_miou(report)} -> {RW_STORE}")

    def work(index: int, count: int, device: torch.device) -> None:
        checkpoint = load_checkpoint(AFFINITY_CHECKPOINT, "affinity",
                                     {"affinity": {"backbone": affinity.backbone, "dilated": affinity.dilated}})
        model = AffinityNet(affinity.backbone, dilated=affinity.dilated)
        model.load_state_dict(checkpoint["model"])
        confusion, aucs = ConfusionMatrix(dataset.num_classes + 1), []
        with CamStore(REFINED_STORE) as store:
            store.check_covers(ids)
            attrs = {"method": str(store.attr("method")), "stride": AffinityNet.stride,
                     "class_names": dataset.class_names,
                     "params": {"rw": rw.model_dump(), "affinity": affinity.model_dump()}}
            with CamStoreWriter(RW_STORE if count == 1 else shard_path(RW_STORE, index, count), attrs) as writer:
                for image_id, scores, keys in iterate_random_walk(model, store, dataset, ids, rw, device=device,
                                                                  shard=(index, count)):
                    writer.write(image_id, scores[1:], keys, {"background": scores[0]})
                    if dataset.has_mask(image_id):
                        mask = dataset.read_mask(image_id)
                        confusion.update(argmax_labels(scores, keys), mask)
                        # scored at the store's precision: the AUC then follows the artifact, which is the same
                        # in one process, under torchrun and in shards (float32 noise below it moves ties)
                        aucs += class_map_aucs(scores[1:].astype(np.float16), keys, mask)
        if count == 1:
            finish(confusion.matrix, aucs)
        else:
            write_json(shard_path(RW_METRICS, index, count), {"confusion": confusion.matrix.tolist(), "auc": aucs})

    def combine(count: int, seconds: float | None) -> None:
        stores, matrices = shard_paths(RW_STORE, count), shard_paths(RW_METRICS, count)
        total, aucs = np.zeros((dataset.num_classes + 1,) * 2, dtype=np.int64), []
        for path in matrices:
            try:
                part = json.loads(path.read_text())
                total += np.asarray(part["confusion"], dtype=np.int64)
                aucs += [float(value) for value in part["auc"]]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise DataError(f"{path}: missing or unreadable shard confusion matrix ({err})") from None
        merge_stores(stores, RW_STORE, ids)
        for path in stores + matrices:
            remove_path(path)
        finish(total, aucs)

    run_sharded("stages.random_walk", params, shard, merge, work, combine)


app = single_command(random_walk)

if __name__ == "__main__":
    app()
