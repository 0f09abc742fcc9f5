"""Stage `train_cls`: train the method's multi-label classifier; loss, its parts and val mAP to dvclive."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import typer

from stages._common import load_params, log_epoch, reports_errors, single_command, training_curves
from stages._run import ran_under_torchrun
from stages.artifacts import CLS_CHECKPOINT, CLS_CURVES, CLS_METRICS, MANIFEST, PARAMS_FILE
from wsss_core.cams.classifier import train_classifier
from wsss_core.checkpoint import save_checkpoint
from wsss_core.data.dataset import Dataset
from wsss_core.distributed import is_main, process_group
from wsss_core.io import write_json
from wsss_core.methods import get_method
from wsss_core.training import resolve_device, seed_everything


@reports_errors
def train_cls(params_file: Path = typer.Option(PARAMS_FILE, "--params", help="params.yaml to read")) -> None:
    """Train the classifier of `method` on the prepared train split; writes models/cls.pt and, in
    metrics/train_cls.json, the last epoch's val mAP and the method's learned scalars (e.g. gates).
    With dist.nproc > 1 it trains under torchrun (DDP, cls.batch_size the global batch); rank 0 writes."""
    params = load_params(params_file)
    if ran_under_torchrun("stages.train_cls", params.dist.nproc):
        return
    dataset = Dataset.load(MANIFEST)
    method = get_method(params)
    seed_everything(params.seed)
    model = method.build_classifier(params.cls, dataset.num_classes)
    warm_start = method.warm_start(model, params.cls)
    last: dict[str, float] = {}
    with process_group(resolve_device(params.device), params.dist.backend) as device:
        with training_curves(CLS_CURVES) as live:
            def on_epoch_end(epoch: int, values: dict[str, float]) -> None:
                last.update(values, **method.learned_values(model))
                log_epoch(live, epoch, last)

            train_classifier(model, partial(method.training_loss, model), partial(method.class_scores, model),
                             dataset, params.cls, device=device, seed=params.seed, on_epoch_end=on_epoch_end,
                             warm_start=warm_start)
        if not is_main():
            return
    save_checkpoint(CLS_CHECKPOINT, model.cpu(), params.method, method.checkpoint_params(params.cls),
                    class_names=dataset.class_names)
    val_map = last.get("val_map", float("nan"))
    write_json(CLS_METRICS, {"method": params.method, "epochs": params.cls.epochs,
                             "warm_start_epochs": warm_start.recipe.epochs if warm_start else 0,
                             "val_map": val_map if val_map == val_map else None,  # NaN (no val split): null
                             "learned": method.learned_values(model)})
    typer.echo(f"saved {CLS_CHECKPOINT}")


app = single_command(train_cls)

if __name__ == "__main__":
    app()
