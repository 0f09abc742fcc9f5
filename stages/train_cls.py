"""Stage `train_cls`: train the method's multi-label classifier; log curves with dvclive."""
from __future__ import annotations

from pathlib import Path

import typer

from stages._common import MANIFEST, PARAMS_FILE, load_params, reports_errors, single_command, training_curves
from wsss_core.cams.classifier import EpochResult, train_classifier
from wsss_core.checkpoint import save_checkpoint
from wsss_core.data.dataset import Dataset
from wsss_core.methods import get_method
from wsss_core.training import resolve_device, seed_everything

CHECKPOINT = Path("models/cls.pt")
LIVE_DIR = "dvclive/train_cls"


@reports_errors
def train_cls(params_file: Path = typer.Option(PARAMS_FILE, "--params", help="params.yaml to read")) -> None:
    """Train the classifier of `method` on the prepared train split; writes models/cls.pt."""
    params = load_params(params_file)
    dataset = Dataset.load(MANIFEST)
    method = get_method(params.method)
    seed_everything(params.seed)
    model = method.build_classifier(params.cls, dataset.num_classes)
    device = resolve_device(params.device)
    with training_curves(LIVE_DIR) as live:

        def log(result: EpochResult) -> None:
            live.log_metric("loss", result.loss)
            live.log_metric("val_map", result.val_map)
            live.next_step()
            typer.echo(f"epoch {result.epoch}: loss {result.loss:.4f}, val mAP {result.val_map:.4f}")

        train_classifier(method, model, dataset, params.cls, device, params.seed, log)
    save_checkpoint(CHECKPOINT, model.cpu(), params.method, {"cls": params.cls.model_dump()},
                    class_names=dataset.class_names)
    typer.echo(f"saved {CHECKPOINT}")


app = single_command(train_cls)

if __name__ == "__main__":
    app()
