"""CUDA paths (AMP training and export) against the CPU; skipped without a GPU, as in CI."""
from functools import partial

import numpy as np
import pytest
import torch

from tests.fixtures import make_dataset
from wsss_core.cams.infer import iterate_cams
from wsss_core.config import CamsParams, ClsParams
from wsss_core.methods.cam import CamMethod
from wsss_core.training import EpochSeededSet, fit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CLS = ClsParams(backbone="resnet18", output_stride=16, batch_size=4, epochs=1, lr=0.01)


def test_amp_export_on_cuda_matches_fp32_on_cpu(tmp_path):
    dataset = make_dataset(tmp_path, sizes=((96, 128),) * 3)
    torch.manual_seed(0)
    method, model = CamMethod(), CamMethod().build_classifier(CLS, 3, pretrained=False).eval()

    def export(device):
        cams = CamsParams(scales=[1.0, 0.5, 1.5], flip=True, batch_size=3)
        return {image_id: cam for image_id, cam, _, _, _, _ in iterate_cams(
            method.cam_hooks(model.to(device)), dataset, dataset.ids("train"), cams, device=device)}

    on_cpu, on_cuda = export(torch.device("cpu")), export(torch.device("cuda"))
    for image_id, cam in on_cpu.items():
        assert np.abs(on_cuda[image_id] - cam).max() < 0.03, image_id  # float16 autocast vs float32


class Batches(EpochSeededSet):
    def __init__(self):
        super().__init__([str(i) for i in range(8)], seed=0)
        self.images, self.labels = torch.randn(8, 3, 64, 64), (torch.rand(8, 3) < 0.5).float()

    def __getitem__(self, index):
        return {"images": self.images[index], "labels": self.labels[index]}


def test_amp_training_on_cuda_follows_the_cpu_run():
    """Two epochs of fit with AMP + GradScaler on CUDA end near the fp32 CPU weights and lower the loss alike."""
    runs = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        method = CamMethod()
        model = method.build_classifier(CLS.model_copy(update={"epochs": 2}), 3, pretrained=False)
        losses = []
        fit(model, Batches(), partial(method.training_loss, model), recipe=CLS.model_copy(update={"epochs": 2}),
            device=torch.device(device), seed=0, desc=device,
            on_epoch_end=lambda epoch, means: losses.append(means["loss"]))
        runs[device] = (model.cpu().classifier.weight.detach(), losses)
    (cpu_weight, cpu_losses), (cuda_weight, cuda_losses) = runs["cpu"], runs["cuda"]
    assert np.allclose(cpu_losses, cuda_losses, atol=0.02)
    assert (cpu_weight - cuda_weight).abs().max() < 0.02 * cpu_weight.abs().max()
