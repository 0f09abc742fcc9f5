"""Stage `train_affinity`: train AffinityNet on the affinity labels; dvclive curves."""
from __future__ import annotations

from pathlib import Path

import typer

from stages._common import MANIFEST, PARAMS_FILE, load_params, log_epoch, reports_errors, single_command, training_curves
from stages.affinity_labels import LABEL_DIR
from wsss_core.checkpoint import save_checkpoint
from wsss_core.data.dataset import Dataset
from wsss_core.data.label_dir import check_label_dir
from wsss_core.models.affinity_net import AffinityNet
from wsss_core.refine.affinity_training import AffinitySet, train_affinity_net
from wsss_core.training import resolve_device, seed_everything

CHECKPOINT = Path("models/affinity.pt")
LIVE_DIR = "dvclive/train_affinity"


@reports_errors
def train_affinity(params_file: Path = typer.Option(PARAMS_FILE, "--params", help="params.yaml to read")) -> None:
    """Train AffinityNet (PSA's loss) on labels/affinity; writes models/affinity.pt."""
    params = load_params(params_file)
    settings = params.affinity
    dataset = Dataset.load(MANIFEST)
    check_label_dir(LABEL_DIR, dataset.ids("train"), "affinity_labels")
    seed_everything(params.seed)
    model = AffinityNet(settings.backbone, settings.pretrained)
    if settings.freeze_backbone:
        model.freeze_backbone()
    train_set = AffinitySet(dataset, LABEL_DIR, settings.radius, settings.crop_size, tuple(settings.resize_long),
                            model.mean, model.std, params.seed)
    with training_curves(LIVE_DIR) as live:
        train_affinity_net(model, train_set, settings.epochs, settings.batch_size, settings.lr,
                           settings.new_layer_lr_mult, settings.weight_decay, settings.momentum,
                           resolve_device(params.device), params.seed,
                           lambda epoch, parts: log_epoch(live, epoch, parts))
    save_checkpoint(CHECKPOINT, model.cpu(), "affinity", {"affinity": settings.model_dump()})
    typer.echo(f"saved {CHECKPOINT}")


app = single_command(train_affinity)

if __name__ == "__main__":
    app()
