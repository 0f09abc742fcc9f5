"""Segmentation inference: multi-scale + flip averaging, optional dense CRF, scoring, checkpoints."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from wsss_core.config import CrfParams
from wsss_core.crf import dense_crf
from wsss_core.data.dataset import Dataset
from wsss_core.data.transforms import normalize
from wsss_core.errors import DataError
from wsss_core.metrics import ConfusionMatrix
from wsss_core.models.deeplab import build_segmenter

SEG_CHECKPOINT_KEYS = ("arch", "backbone", "output_stride", "decoder_channels")  # seg params that shape the network
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


@torch.no_grad()
def predict_probabilities(model: nn.Module, image: torch.Tensor, scales: Sequence[float] = (1.0,),
                          flip: bool = False) -> torch.Tensor:
    """Return softmax probabilities [C, H, W] for a normalised image [3, H, W], averaged over passes.

    One pass per scale (the image resized by it, bilinear) and, with flip, per mirrored copy;
    each pass's logits are resized back to H x W before the softmax.
    """
    model.eval()
    height, width = image.shape[-2:]
    total = None
    for scale in scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        scaled = image[None] if size == (height, width) else F.interpolate(
            image[None], size=size, mode="bilinear", align_corners=False)
        batch = torch.cat([scaled, scaled.flip(-1)]) if flip else scaled  # [1 or 2, 3, h, w]
        with torch.autocast(image.device.type, enabled=image.device.type == "cuda"):
            logits = model(batch).float()
        if flip:
            logits = torch.stack([logits[0], logits[1].flip(-1)])
        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        probabilities = logits.softmax(1).sum(0)
        total = probabilities if total is None else total + probabilities
    return total / (len(scales) * (2 if flip else 1))


def segment(model: nn.Module, image: np.ndarray, device: torch.device, scales: Sequence[float] = (1.0,),
            flip: bool = False, crf: CrfParams | None = None) -> np.ndarray:
    """Return uint8 labels [H, W] for a uint8 RGB image [H, W, 3]: argmax of the (CRF-refined) probabilities."""
    tensor = normalize(image, model.mean, model.std).to(device)
    probabilities = predict_probabilities(model, tensor, scales, flip).cpu().numpy()  # [C, H, W]
    if crf is not None:
        probabilities = dense_crf(image, probabilities, crf)
    return probabilities.argmax(0).astype(np.uint8)


def iterate_segmentations(model: nn.Module, dataset: Dataset, ids: list[str], device: torch.device,
                          scales: Sequence[float] = (1.0,), flip: bool = False, crf: CrfParams | None = None,
                          desc: str = "segment") -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Yield (id, image uint8 [H,W,3], predicted labels uint8 [H,W]) with a progress bar."""
    for image_id in tqdm(ids, desc=desc, unit="img"):
        image = dataset.read_image(image_id)
        yield image_id, image, segment(model, image, device, scales, flip, crf)


def score_split(model: nn.Module, dataset: Dataset, split: str, device: torch.device,
                scales: Sequence[float] = (1.0,), flip: bool = False, crf: CrfParams | None = None
                ) -> ConfusionMatrix:
    """Return the confusion matrix of the model's predictions against a split's ground truth (255 ignored), over
    the images that have a mask (all zeros when none has)."""
    matrix = ConfusionMatrix(len(dataset.class_names))
    for image_id, _, labels in iterate_segmentations(model, dataset, dataset.scored_ids(dataset.ids(split)), device,
                                                     scales, flip, crf, desc=f"score {split}"):
        matrix.update(labels, dataset.read_mask(image_id))
    return matrix


def segmenter_from_checkpoint(checkpoint: dict, source: str | Path) -> tuple[nn.Module, list[str]]:
    """Return (network in eval mode on CPU, class names) from a train_seg checkpoint dict read from source."""
    settings, class_names = checkpoint.get("params", {}).get("seg"), checkpoint.get("class_names")
    if not settings or not class_names:
        raise DataError(f"{source}: not a segmentation checkpoint (no seg params or class names)")
    model = build_segmenter(settings["arch"], settings["backbone"], len(class_names),
                            output_stride=settings["output_stride"], channels=settings.get("decoder_channels", 256))
    model.load_state_dict(checkpoint["model"])
    return model.eval(), list(class_names)


def list_images(paths: Sequence[str | Path]) -> list[Path]:
    """Return image files named directly or found (non-recursively) in folders, sorted per folder.

    A missing path, a folder without images, or two images with the same file stem is a DataError.
    """
    images = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            images += found
        elif path.is_file():
            images.append(path)
        else:
            raise DataError(f"{path}: no such image file or folder")
    repeated = sorted(stem for stem, count in Counter(p.stem for p in images).items() if count > 1)
    if repeated:
        raise DataError(f"several input images share the name {repeated[0]!r}; their outputs would collide")
    return images
