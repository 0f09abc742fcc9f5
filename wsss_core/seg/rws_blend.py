"""RWS's blending (spec ../shared/methods/rws.md, sections 3.1, 3.3-3.4 and 3.7): a network's heatmaps on an
image, the blend strengths of its weak slices from the local network's heatmaps, the forward with each stage's
output blended with the local network's, and `RwsBlendedSegmenter`, the blending at test time. Used by the training
(`seg/rws_training.py`) and by `evaluate` (`seg.eval_rws_blend`)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from wsss_core.config import RwsParams
from wsss_core.data.palette import VOID
from wsss_core.seg.rws import (StageRecorder, WindowScore, blend_weights, class_attention_maps, pool_to_grid,
                               select_weak_slices, sliding_windows, window_scores)

LOCAL_NETWORK = "local.pt"  # in the RWS folder: the last blending round's local network (a state dict)
LAST_THRESHOLD = "threshold"  # report.json's key of that round's T


def heatmaps(model: nn.Module, image: torch.Tensor, labels: np.ndarray, rws: RwsParams
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (A [l, H, W] float32 on the CPU, logits [K, H, W]) of one image (`class_attention_maps`)."""
    maps, logits = class_attention_maps(model, image, torch.from_numpy(labels.astype("int64"))[None],
                                        pixels=rws.cam_pixels)
    return maps[0].float().cpu(), logits[0]


def image_blend(model: nn.Module, local: nn.Module, image: torch.Tensor, labels: np.ndarray,
                slices: list[WindowScore], rws: RwsParams) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Return (beta [l, H, W], the global network's A [l, H, W], the sums of the global and the local last-stage
    attention on the slices' class pixels and their count) of one image [1, 3, H, W] and its labels [H, W]: the
    local network's A^s on each weak slice alone for the slice's class only (3.3 item 3), then eqs. 3-7 and the
    owner rule (`blend_weights`)."""
    attention, _ = heatmaps(model, image, labels, rws)
    local_maps, sums = [], np.zeros(3)
    for score in slices:
        y0, x0, y1, x1 = score.box
        window = labels[y0:y1, x0:x1]
        only_class = np.where(window == score.cls, window, VOID)
        local_maps.append(heatmaps(local, image[..., y0:y1, x0:x1], only_class, rws)[0])
        inside = torch.from_numpy(window == score.cls)
        sums += [attention[-1, y0:y1, x0:x1][inside].sum(), local_maps[-1][-1][inside].sum(), inside.sum()]
    beta = blend_weights(attention, [score.box for score in slices], local_maps, eps=rws.epsilon,
                         no_omega=not rws.use_omega, no_lambda=not rws.use_lambda,
                         lambda_constant=rws.lambda_constant, layers=rws.layers).beta
    return beta, attention, sums


def blended_forward(model: nn.Module, local: nn.Module, images: torch.Tensor, beta: torch.Tensor,
                    strides: list[int]) -> torch.Tensor:
    """Return the model's logits with each stage's output F_i replaced by (1 - beta_i) F_i + beta_i F^s_i, beta
    [B, l, H, W] averaged over each stage's stride blocks, F^s the frozen local network's on the same images;
    a plain forward where beta is 0 throughout."""
    if not beta.any():
        return model(images)
    with torch.no_grad(), StageRecorder(local.stage_modules()) as recorder:
        local(images)
    local_features = recorder.features()

    def blend(index: int, output: torch.Tensor) -> torch.Tensor:
        if not beta[:, index].any():
            return output
        strength = pool_to_grid(beta[:, index], strides[index], tuple(output.shape[-2:]))[:, None]  # [B, 1, h, w]
        return ((1 - strength) * output + strength * local_features[index]).to(output.dtype)

    with StageRecorder(model.stage_modules(), blend):
        return model(images)


class RwsBlendedSegmenter(nn.Module):
    """The global network with RWS's blending at test time: the spec's optional variant (3.7, our extrapolation;
    the paper's protocol, and `evaluate`'s headline, is the plain network). forward(images [B, 3, H, W]) ->
    logits [B, K, H, W]: per image the network's own prediction stands in for the labels (its heatmaps and class
    regions), the windows whose class attention is below the training's T are the weak slices (attention only:
    without labels there is no slice IoU), the local network's heatmaps on them give eqs. 3-7's strengths, and
    the blended forward gives the logits; an image without weak slices gets the plain logits. Counts the input
    images it blended in `blended_inputs` (each scale and flip of a val image is one input)."""

    def __init__(self, model: nn.Module, local: nn.Module, rws: RwsParams, threshold: float):
        super().__init__()
        self.model, self.local, self.rws, self.threshold = model.eval(), local.eval(), rws, threshold
        self.mean, self.std, self.strides = model.mean, model.std, model.stage_strides()
        self.blended_inputs = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        rws, outputs = self.rws, []
        for image in images.split(1):
            with torch.no_grad():
                prediction = self.model(image)[0].argmax(0).cpu().numpy().astype(np.uint8)
            attention, logits = heatmaps(self.model, image, prediction, rws)
            windows = sliding_windows(*prediction.shape, size=rws.slice_size, stride=rws.slice_stride)
            scores = window_scores("test", attention[-1].numpy(), prediction, prediction, windows,
                                   min_coverage=rws.min_class_fraction, region=rws.attention_region)
            weak = select_weak_slices(scores, self.threshold, rule="attention", max_per_image=rws.max_slices_per_image)
            if not weak:
                outputs.append(logits[None])
                continue
            beta = image_blend(self.model, self.local, image, prediction, weak, rws)[0]
            with torch.no_grad():
                outputs.append(blended_forward(self.model, self.local, image, beta[None].to(image.device) * rws.beta,
                                               self.strides))
            self.blended_inputs += 1
        return torch.cat(outputs)
