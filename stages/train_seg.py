"""Stage `train_seg`: train the segmentation network on the pseudo masks; dvclive curves with val mIoU."""
from __future__ import annotations

import time
from pathlib import Path

import typer

from stages._common import load_params, log_epoch, reports_errors, single_command, training_curves
from stages._run import ran_under_torchrun
from stages.artifacts import MANIFEST, PARAMS_FILE, PSEUDO_MASKS, RWS_REPORT, SEG_CHECKPOINT, SEG_CURVES
from wsss_core.checkpoint import save_checkpoint
from wsss_core.data.dataset import Dataset
from wsss_core.data.label_dir import check_label_dir
from wsss_core.distributed import is_main, process_group
from wsss_core.errors import ParamsError
from wsss_core.models.deeplab import build_segmenter
from wsss_core.seg.infer import score_split
from wsss_core.seg.rws_training import train_with_rws, write_rws_report
from wsss_core.seg.training import SegmentationSet, train_segmenter
from wsss_core.training import resolve_device, seed_everything


@reports_errors
def train_seg(params_file: Path = typer.Option(PARAMS_FILE, "--params", help="params.yaml to read")) -> None:
    """Train DeepLab on labels/pseudo (255 ignored), with RWS when seg.rws.enabled; writes models/seg.pt and
    rws/ (RWS's thresholds, weak slices and a few heatmaps; with RWS off, the training time only).
    With dist.nproc > 1 it trains under torchrun (DDP, seg.batch_size the global batch); rank 0 writes."""
    params = load_params(params_file)
    settings = params.seg
    if settings.rws.enabled and params.dist.nproc > 1:
        raise ParamsError("seg.rws.enabled trains in one process: set dist.nproc to 1")
    if ran_under_torchrun("stages.train_seg", params.dist.nproc):
        return
    dataset = Dataset.load(MANIFEST)
    check_label_dir(PSEUDO_MASKS, dataset.ids("train"), "pseudo_masks")
    seed_everything(params.seed)
    model = build_segmenter(settings.arch, settings.backbone, len(dataset.class_names), settings.pretrained,
                            settings.output_stride, channels=settings.decoder_channels)
    started = time.perf_counter()
    with process_group(resolve_device(params.device), params.dist.backend) as device:
        with training_curves(SEG_CURVES) as live:

            scored_val = bool(dataset.scored_ids(dataset.ids("val")))

            def log(epoch: int, means: dict) -> None:
                if scored_val:  # a tag-only val split has nothing to score
                    means["val_miou"] = score_split(model, dataset, "val", device).miou()
                log_epoch(live, epoch, means)

            if settings.rws.enabled:
                rounds = train_with_rws(model, dataset, PSEUDO_MASKS, settings, device=device, seed=params.seed,
                                        on_epoch_end=log)
            else:
                train_set = SegmentationSet(dataset, PSEUDO_MASKS, settings, model.mean, model.std, params.seed)
                train_segmenter(model, train_set, settings, device=device, seed=params.seed, on_epoch_end=log)
                rounds = None
        if not is_main():
            return
    write_rws_report(RWS_REPORT, rounds, time.perf_counter() - started, "seg.rws.enabled is false")
    save_checkpoint(SEG_CHECKPOINT, model.cpu(), params.method, {"seg": settings.model_dump()},
                    class_names=dataset.class_names)
    typer.echo(f"saved {SEG_CHECKPOINT}")


app = single_command(train_seg)

if __name__ == "__main__":
    app()
