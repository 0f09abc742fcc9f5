"""RWS (Rao et al., "Refined Weak Slice") as a way to train the segmentation network (spec
../shared/methods/rws.md, sections 3.1-3.8), over the tensor core in `seg/rws.py`.

`train_with_rws` splits the stage's budget (seg.epochs x steps per epoch) into: the global network on the
pseudo masks; then per round, Seg-Grad-CAM heatmaps of every train image and their windows, the threshold T,
the weak slices, a local network (a copy of the global one) trained on the weak-slice crops, the local
heatmaps and eqs. 5-7's blend strengths, and the global network trained again with each backbone stage's
output blended with the frozen local network's. Pseudo masks play the role of the paper's ground truth
(heatmap masking, slice IoU, the local labels).

Deviation (stated in docs/methods/rws.md): during the retraining, F^s comes from the frozen local network
run on the whole augmented crop (one forward per batch, the blend strengths transformed with the image like
its labels), not on each slice alone as the spec's on-the-fly path would; the local network's receptive
field then sees context outside the slice.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from wsss_core.config import RwsParams, SegParams
from wsss_core.data.dataset import Dataset
from wsss_core.data.label_dir import read_label_dir
from wsss_core.data.transforms import augment_with_maps, crop_all, normalize
from wsss_core.errors import DataError, ParamsError
from wsss_core.io import atomic_path, write_json
from wsss_core.seg.rws import (Box, Threshold, WindowScore, attention_threshold, curve_iou, local_slices,
                               select_weak_slices, sliding_windows, window_scores)
from wsss_core.seg.rws_blend import LAST_THRESHOLD, LOCAL_NETWORK, blended_forward, heatmaps, image_blend
from wsss_core.seg.training import SegmentationSet, segmentation_loss
from wsss_core.training import EpochSeededSet, batches_per_epoch, fit

EpochCallback = Callable[[int, dict], None]


def phase_steps(total: int, rws: RwsParams) -> tuple[int, int, int]:
    """Return (global steps, local steps per round, retraining steps per round) that sum to `total` over
    the rounds; the local and retraining shares are at least one step each."""
    local = max(1, round(total * rws.local_iteration_fraction))
    retrain = max(1, round(total * rws.retrain_iteration_fraction))
    first = total - rws.rounds * (local + retrain)
    if first < 1:
        raise DataError(f"seg.rws: {total} training steps leave none for the global network after "
                        f"{rws.rounds} round(s) of {local} local + {retrain} retraining steps (raise seg.epochs)")
    return first, local, retrain


@dataclass
class RwsRound:
    """What one round found: T (and per class), the windows scored, the weak slices, the mean global and local
    attention on the weak slices' class pixels (spec G1: per-slice normalisation inflates the local one), the
    seconds each part took, and the steps trained without blending when the round stopped RWS."""

    threshold: float
    threshold_per_class: dict[int, float]
    windows: int
    weak_slices: list[WindowScore]
    attention: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    plain_steps: int = 0
    curves: dict = field(default_factory=dict)  # {class: ClassCurve} of the automatic threshold
    shown: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # {id: {attention, beta}} to draw
    local: nn.Module | None = None  # the round's trained local network (None when the round did not blend)


@dataclass
class BlendMap:
    """An image's blend strengths beta [l, y1 - y0, x1 - x0] (float16) inside `box`, the union of its weak
    slices (0 outside it)."""

    box: Box
    beta: np.ndarray

    def full(self, height: int, width: int) -> np.ndarray:
        """Return beta [l, height, width] float32, zero outside the box."""
        y0, x0, y1, x1 = self.box
        beta = np.zeros((len(self.beta), height, width), np.float32)
        beta[:, y0:y1, x0:x1] = self.beta
        return beta


class SliceSet(EpochSeededSet):
    """The local network's data: (image [3, s, s], labels [s, s]) crops of the weak slices' windows, flipped
    at random, padded to the slice size (image 0, labels 255) where an image is smaller than a window."""

    def __init__(self, dataset: Dataset, label_dir: Path, slices: list[tuple[str, Box]], size: int, mean: tuple,
                 std: tuple, seed: int):
        super().__init__([image_id for image_id, _ in slices], seed)
        self.dataset, self.label_dir, self.slices, self.size = dataset, label_dir, slices, size
        self.mean, self.std = mean, std

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_id, (y0, x0, y1, x1) = self.slices[index]
        image = self.dataset.read_image(image_id)[y0:y1, x0:x1]
        labels = read_label_dir(self.label_dir, image_id)[y0:y1, x0:x1]
        if self.sample_rng(index).random() < 0.5:
            image, labels = image[:, ::-1], labels[:, ::-1]
        whole = (slice(None), slice(None))
        padded_image, padded_labels, _ = crop_all(image, labels, None, (whole, (slice(0, y1 - y0), slice(0, x1 - x0))),
                                                  self.size)
        return normalize(padded_image, self.mean, self.std), torch.from_numpy(padded_labels.astype("int64"))


class BlendSet(SegmentationSet):
    """SegmentationSet that also returns the blend strengths beta [l, S, S] transformed with the crop (zeros
    for images without weak slices); the random draws equal SegmentationSet's."""

    def __init__(self, dataset: Dataset, label_dir: Path, recipe: SegParams, mean: tuple, std: tuple, seed: int,
                 blend_maps: dict[str, BlendMap], layers: int):
        super().__init__(dataset, label_dir, recipe, mean, std, seed)
        self.blend_maps, self.layers = blend_maps, layers

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        image, labels = self.dataset.read_image(image_id), read_label_dir(self.label_dir, image_id)
        blend = self.blend_maps.get(image_id)
        image, labels, beta = augment_with_maps(image, labels, blend.full(*labels.shape) if blend else None,
                                                self.resize_long, self.crop_size, self.sample_rng(index))
        if beta is None:
            beta = np.zeros((self.layers, self.crop_size, self.crop_size), np.float32)
        return (normalize(image, self.mean, self.std), torch.from_numpy(labels.astype("int64")),
                torch.from_numpy(beta))


def _read(dataset: Dataset, label_dir: Path, image_id: str, model: nn.Module, device: torch.device
          ) -> tuple[torch.Tensor, np.ndarray]:
    """Return (normalised image [1, 3, H, W] on device, its pseudo mask [H, W] uint8)."""
    image = normalize(dataset.read_image(image_id), model.mean, model.std)[None].to(device)
    return image, read_label_dir(label_dir, image_id)


def window_records(model: nn.Module, dataset: Dataset, label_dir: Path, rws: RwsParams, device: torch.device
                   ) -> list[WindowScore]:
    """Return every window's scores (3.1-3.2) of the global network on the train images at their own size: the
    last stage's Seg-Grad-CAM on each class's pixels of the window, and the window IoU."""
    model.eval()
    scores = []
    for image_id in tqdm(dataset.ids("train"), desc="rws heatmaps", unit="img"):
        image, labels = _read(dataset, label_dir, image_id, model, device)
        attention, logits = heatmaps(model, image, labels, rws)
        windows = sliding_windows(*labels.shape, size=rws.slice_size, stride=rws.slice_stride)
        scores += window_scores(image_id, attention[-1].numpy(), logits.argmax(0).cpu().numpy(), labels, windows,
                                min_coverage=rws.min_class_fraction, region=rws.attention_region)
    return scores


def blend_maps(model: nn.Module, local: nn.Module, dataset: Dataset, label_dir: Path, weak: list[WindowScore],
               rws: RwsParams, device: torch.device) -> tuple[dict[str, BlendMap], dict, dict[str, float]]:
    """Return ({id: BlendMap} of the images with weak slices, {id: {attention, beta}} of the first
    rws.show_images of them, the mean global and local attention on the slices' class pixels).

    Per image: the global network's A (float32) again and `image_blend`.
    """
    model.eval()
    local.eval()
    by_image: dict[str, list[WindowScore]] = {}
    for score in weak:
        by_image.setdefault(score.image, []).append(score)
    maps, shown, sums = {}, {}, np.zeros(3)
    for image_id, slices in tqdm(by_image.items(), desc="rws blend maps", unit="img"):
        image, labels = _read(dataset, label_dir, image_id, model, device)
        beta, attention, image_sums = image_blend(model, local, image, labels, slices, rws)
        beta = beta.numpy()
        sums += image_sums
        union = (min(s.box[0] for s in slices), min(s.box[1] for s in slices), max(s.box[2] for s in slices),
                 max(s.box[3] for s in slices))
        maps[image_id] = BlendMap(union, beta[:, union[0]:union[2], union[1]:union[3]].astype(np.float16))
        if len(shown) < rws.show_images:
            shown[image_id] = {"attention": attention.numpy(), "beta": beta}
    pixels = max(sums[2], 1)
    return maps, shown, {"global_mean": float(sums[0] / pixels), "local_mean": float(sums[1] / pixels)}


def _curve_threshold(scores: list[WindowScore], rws: RwsParams) -> Threshold | None:
    """Return the attention/IoU curves' threshold (Fig. 2), or None when rws.threshold sets T by hand and the
    windows are too few for curves; a DataError when T must come from the curves and cannot."""
    try:
        return attention_threshold(scores, bins=rws.slope_bins, min_count=rws.min_windows_per_bin,
                                   slope=rws.slope_threshold)
    except ValueError as error:
        if rws.threshold and rws.select_rule == "attention":
            return None
        raise DataError(f"seg.rws: {error}; set seg.rws.threshold to choose T by hand (select_rule: attention)"
                        ) from None


def train_with_rws(model: nn.Module, dataset: Dataset, label_dir: Path, recipe: SegParams, *, device: torch.device,
                   seed: int, on_epoch_end: EpochCallback = lambda epoch, means: None) -> list[RwsRound]:
    """Train `model` (a segmenter with stage_modules() and stage_strides()) with RWS on the pseudo masks in
    label_dir within recipe.epochs epochs' worth of steps; return what each round found.

    A round that finds no weak slice, or whose count fell by less than rws.stop_fraction from the previous
    round's (3.8), ends RWS: the steps left train the global network without blending. on_epoch_end gets the
    global network's epochs counted across its phases (the local network's are not reported).
    """
    rws = recipe.rws
    strides = model.stage_strides()
    if max(rws.layers) > len(strides):
        raise ParamsError(f"seg.rws.layers {rws.layers}: the segmenter has {len(strides)} stages")
    train_set = SegmentationSet(dataset, label_dir, recipe, model.mean, model.std, seed)
    total = recipe.epochs * batches_per_epoch(len(train_set), recipe.batch_size)
    first, local_steps, retrain_steps = phase_steps(total, rws)
    steps_left = total - first
    epochs_done = [0]

    def report(epoch: int, means: dict) -> None:
        epochs_done[0] += 1
        on_epoch_end(epochs_done[0], means)

    def plain_loss(batch):
        images, labels = batch
        return segmentation_loss(model(images), labels), {}

    fit(model, train_set, plain_loss, recipe=recipe, device=device, seed=seed, desc="rws global", steps=first,
        on_epoch_end=report)
    rounds: list[RwsRound] = []
    for round_index in range(rws.rounds):
        round_seed = seed + round_index + 1
        started = time.perf_counter()
        scores = window_records(model, dataset, label_dir, rws, device)
        found = _curve_threshold(scores, rws)
        threshold = rws.threshold or found.value
        bounds = curve_iou(found, threshold) if rws.select_rule == "attention_and_iou" else None
        weak = select_weak_slices(scores, threshold, rule=rws.select_rule, iou_bounds=bounds,
                                  max_per_image=rws.max_slices_per_image)
        found_round = RwsRound(threshold, found.per_class if found else {}, len(scores), weak,
                               curves=found.curves if found else {},
                               seconds={"heatmaps": time.perf_counter() - started})
        rounds.append(found_round)
        previous = len(rounds[-2].weak_slices) if len(rounds) > 1 else None
        if not weak or (previous is not None and len(weak) > (1 - rws.stop_fraction) * previous):
            found_round.plain_steps = steps_left
            fit(model, SegmentationSet(dataset, label_dir, recipe, model.mean, model.std, round_seed), plain_loss,
                recipe=recipe, device=device, seed=round_seed, desc="rws plain", steps=steps_left,
                on_epoch_end=report)
            break
        started = time.perf_counter()
        local = copy.deepcopy(model)
        slices = SliceSet(dataset, label_dir, local_slices(weak), rws.slice_size, model.mean, model.std, round_seed)
        fit(local, slices, lambda batch: (segmentation_loss(local(batch[0]), batch[1]), {}), recipe=recipe,
            device=device, seed=round_seed, desc=f"rws local {round_index + 1}", steps=local_steps)
        found_round.seconds["local"] = time.perf_counter() - started
        started = time.perf_counter()
        maps, found_round.shown, found_round.attention = blend_maps(model, local, dataset, label_dir, weak, rws,
                                                                    device)
        for parameter in local.parameters():
            parameter.requires_grad_(False)
        found_round.local = local
        blend_set = BlendSet(dataset, label_dir, recipe, model.mean, model.std, round_seed, maps, len(strides))

        def blended_loss(batch):
            images, labels, beta = batch
            return segmentation_loss(blended_forward(model, local, images, beta * rws.beta, strides), labels), {}

        fit(model, blend_set, blended_loss, recipe=recipe, device=device, seed=round_seed,
            desc=f"rws retrain {round_index + 1}", steps=retrain_steps, on_epoch_end=report)
        found_round.seconds["retrain"] = time.perf_counter() - started
        steps_left -= local_steps + retrain_steps
    return rounds


def write_rws_report(folder: Path, rounds: list[RwsRound] | None, train_seconds: float, reason: str = "") -> None:
    """Write the RWS folder atomically: report.json (per round T, T_c, window and weak-slice counts, the mean
    attention on them, the steps trained without blending, seconds; train_seconds, the whole training's time,
    with or without RWS; `threshold`, the T of the last round that blended, or null), and of that round:
    slices.json (its weak slices), curve.json (its attention/IoU curves, a DVC plot), heatmaps.npz
    ('<id>/attention' [l, H, W] and '<id>/beta' [l, H, W] of a few images) and local.pt (its local network's
    state dict, for `seg.eval_rws_blend`). rounds None: RWS was off (reason says why)."""
    with atomic_path(folder, folder=True) as staging:
        if rounds is None:
            write_json(staging / "report.json", {"enabled": False, "skipped": reason, "train_seconds": train_seconds})
            return
        last = next((r for r in reversed(rounds) if not r.plain_steps), rounds[-1])  # the last round that blended
        write_json(staging / "report.json", {
            "enabled": True, "train_seconds": train_seconds,
            LAST_THRESHOLD: last.threshold if last.local is not None else None, "rounds": [
                {"threshold": r.threshold,
                 "threshold_per_class": {str(c): t for c, t in r.threshold_per_class.items()},
                 "windows": r.windows, "weak_slices": len(r.weak_slices),
                 "images_with_weak_slices": len({w.image for w in r.weak_slices}),
                 "attention_on_weak_slices": r.attention, "steps_without_blending": r.plain_steps,
                 "seconds": r.seconds} for r in rounds]})
        if last.local is not None:
            torch.save({key: value.cpu() for key, value in last.local.state_dict().items()}, staging / LOCAL_NETWORK)
        write_json(staging / "slices.json", {"threshold": last.threshold, "slices": [
            {"image": w.image, "box": list(w.box), "class": w.cls, "attention": w.attention, "iou": w.iou}
            for w in last.weak_slices]})
        write_json(staging / "curve.json", {"curve": [
            {"class": c, "attention": float(centre), "iou": float(iou), "windows": int(count)}
            for c, curve in last.curves.items()
            for centre, iou, count in zip(curve.centres, curve.mean_iou, curve.counts) if count]})
        np.savez_compressed(staging / "heatmaps.npz", **{f"{image_id}/{name}": array.astype(np.float16)
                                                         for image_id, maps in last.shown.items()
                                                         for name, array in maps.items()})
