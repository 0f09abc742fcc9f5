"""Stage `train_seg`: train the segmentation network on the pseudo masks; dvclive curves with val mIoU."""
from __future__ import annotations

from pathlib import Path

import typer

from stages._common import MANIFEST, PARAMS_FILE, load_params, log_epoch, reports_errors, single_command, training_curves
from stages.pseudo_masks import MASK_DIR
from wsss_core.checkpoint import save_checkpoint
from wsss_core.data.dataset import Dataset
from wsss_core.data.label_dir import check_label_dir
from wsss_core.models.deeplab import build_segmenter
from wsss_core.seg.training import SegmentationSet, train_segmenter
from wsss_core.seg.infer import score_split
from wsss_core.training import resolve_device, seed_everything

CHECKPOINT = Path("models/seg.pt")
LIVE_DIR = "dvclive/train_seg"


@reports_errors
def train_seg(params_file: Path = typer.Option(PARAMS_FILE, "--params", help="params.yaml to read")) -> None:
    """Train DeepLab on labels/pseudo (255 ignored); writes models/seg.pt."""
    params = load_params(params_file)
    settings = params.seg
    dataset = Dataset.load(MANIFEST)
    check_label_dir(MASK_DIR, dataset.ids("train"), "pseudo_masks")
    seed_everything(params.seed)
    device = resolve_device(params.device)
    model = build_segmenter(settings.arch, settings.backbone, len(dataset.class_names), settings.pretrained,
                            settings.output_stride)
    train_set = SegmentationSet(dataset, MASK_DIR, tuple(settings.resize_long), settings.crop_size,
                                model.mean, model.std, params.seed)
    with training_curves(LIVE_DIR) as live:

        def log(epoch: int, means: dict) -> None:
            if dataset.ids("val"):
                means["val_miou"] = score_split(model, dataset, "val", device).miou()
            log_epoch(live, epoch, means)

        train_segmenter(model, train_set, settings.epochs, settings.batch_size, settings.lr,
                        settings.new_layer_lr_mult, settings.weight_decay, settings.momentum, settings.poly_power,
                        device, params.seed, log)
    save_checkpoint(CHECKPOINT, model.cpu(), params.method, {"seg": settings.model_dump()},
                    class_names=dataset.class_names)
    typer.echo(f"saved {CHECKPOINT}")


app = single_command(train_seg)

if __name__ == "__main__":
    app()
