"""Stage `train_affinity`: train AffinityNet on the affinity labels; dvclive curves."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import typer

from stages._common import load_params, log_epoch, reports_errors, single_command, training_curves
from stages._run import ran_under_torchrun, skipped
from stages.artifacts import AFFINITY_CHECKPOINT, AFFINITY_CURVES, AFFINITY_LABELS, MANIFEST, PARAMS_FILE
from wsss_core.affinity.affinity_training import AffinitySet, train_affinity_net
from wsss_core.checkpoint import save_checkpoint
from wsss_core.data.dataset import Dataset
from wsss_core.data.label_dir import check_label_dir
from wsss_core.distributed import is_main, process_group
from wsss_core.models.affinity_net import AffinityNet
from wsss_core.training import resolve_device, seed_everything


@reports_errors
def train_affinity(params_file: Path = typer.Option(PARAMS_FILE, "--params", help="params.yaml to read")) -> None:
    """Train AffinityNet (PSA's loss) on labels/affinity; writes models/affinity.pt. With dist.nproc > 1 it
    trains under torchrun (DDP, affinity.batch_size the global batch); rank 0 writes."""
    params = load_params(params_file)
    if skipped("train_affinity", params) or ran_under_torchrun("stages.train_affinity", params.dist.nproc):
        return
    settings = params.affinity
    dataset = Dataset.load(MANIFEST)
    check_label_dir(AFFINITY_LABELS, dataset.ids("train"), "affinity_labels")
    seed_everything(params.seed)
    model = AffinityNet(settings.backbone, settings.pretrained, dilated=settings.dilated)
    if settings.freeze_backbone:
        model.freeze_backbone()
    train_set = AffinitySet(dataset, AFFINITY_LABELS, settings, model.mean, model.std, params.seed)
    with process_group(resolve_device(params.device), params.dist.backend) as device:
        with training_curves(AFFINITY_CURVES) as live:
            train_affinity_net(model, train_set, settings, device=device, seed=params.seed,
                               on_epoch_end=partial(log_epoch, live))
        if not is_main():
            return
    save_checkpoint(AFFINITY_CHECKPOINT, model.cpu(), "affinity", {"affinity": settings.model_dump()})
    typer.echo(f"saved {AFFINITY_CHECKPOINT}")


app = single_command(train_affinity)

if __name__ == "__main__":
    app()
