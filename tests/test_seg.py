"""Segmentation: loss, networks, multi-scale inference, scoring, checkpoints and `wsss predict`."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from stages.cli import app
from tests.fixtures import make_dataset
from wsss_core.checkpoint import save_checkpoint
from wsss_core.config import CrfParams
from wsss_core.crf import dense_crf
from wsss_core.data.palette import read_label_png
from wsss_core.data.transforms import normalize
from wsss_core.errors import DataError
from wsss_core.models.backbones import Backbone
from wsss_core.models.cam_net import CamNet
from wsss_core.models.deeplab import build_segmenter
from wsss_core.seg.infer import list_images, predict_probabilities, score_split, segment
from wsss_core.seg.training import segmentation_loss


def test_loss_ignores_void_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5)
    labels = torch.randint(0, 3, (2, 4, 5))
    labels[0, :2] = 255
    labels[1, :, 0] = 255
    valid = labels != 255
    picked = F.log_softmax(logits, 1).gather(1, labels.clamp(max=2)[:, None])[:, 0]  # [2, 4, 5]
    expected = -picked[valid].mean()
    assert segmentation_loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    changed = logits.clone()
    changed[0, :, :2] = 100.0  # logits of void pixels do not matter
    assert segmentation_loss(changed, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_loss_of_all_void_batch_is_zero_with_zero_gradient():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = segmentation_loss(logits, torch.full((1, 2, 2), 255))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0


@pytest.mark.parametrize("output_stride", [32, 16, 8])
def test_deeplabv3plus_logits_at_input_size_and_parameter_groups_partition(output_stride):
    model = build_segmenter("deeplabv3plus", "resnet18", 5, output_stride=output_stride).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 80))
    assert logits.shape == (2, 5, 64, 80)
    backbone, new = model.parameter_groups(10.0)
    assert (backbone.name, backbone.lr_mult, new.name, new.lr_mult) == ("backbone", 1.0, "new", 10.0)
    assert {id(p) for p in backbone.params} == {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in backbone.params}.isdisjoint(id(p) for p in new.params)
    assert len(backbone.params) + len(new.params) == len(list(model.parameters()))
    assert model.aspp.branches[1][0].dilation[0] == {32: 3, 16: 6, 8: 12}[output_stride]
    high = model.backbone.body.forward_intermediates(torch.zeros(1, 3, 64, 96), indices=[4], intermediates_only=True)[0]
    assert high.shape[-2:] == (64 // output_stride, 96 // output_stride)  # no dilation at 32


def test_torchvision_deeplabv3_logits_at_input_size():
    model = build_segmenter("deeplabv3_resnet50", "resnet18", 4).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 40, 48)).shape == (1, 4, 40, 48)


def test_backbone_initialised_from_classifier_checkpoint(tmp_path):
    torch.manual_seed(1)
    classifier = CamNet(Backbone("resnet18"), 6)
    save_checkpoint(tmp_path / "cls.pt", classifier, "cam", {"cls": {"backbone": "resnet18"}})
    model = build_segmenter("deeplabv3plus", "resnet18", 7, pretrained=str(tmp_path / "cls.pt"))
    for name, tensor in classifier.backbone.body.state_dict().items():
        assert torch.equal(model.backbone.body.state_dict()[name], tensor), name
    with pytest.raises(Exception, match="seg.pretrained"):
        build_segmenter("deeplabv3plus", "resnet50", 7, pretrained=str(tmp_path / "cls.pt"))


class PixelwiseNet(nn.Module):
    """A 1x1 conv: logits depend on each pixel alone, so flips and rescales commute with it."""

    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    def __init__(self, classes: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, classes, 1)

    def forward(self, images):
        return self.conv(images)


def test_single_scale_without_flip_equals_one_forward_pass():
    model = build_segmenter("deeplabv3plus", "resnet18", 3).eval()
    image = torch.randn(3, 48, 56)
    with torch.no_grad():
        expected = model(image[None]).softmax(1)[0]
    torch.testing.assert_close(predict_probabilities(model, image, [1.0], flip=False), expected)


def test_multiscale_flip_average_equals_explicit_loop():
    model = PixelwiseNet()
    image = torch.randn(3, 20, 30)
    passes = []
    with torch.no_grad():
        for scale in (1.0, 0.5, 1.5):
            scaled = F.interpolate(image[None], scale_factor=scale, mode="bilinear", align_corners=False)
            for flipped in (False, True):
                logits = model(scaled.flip(-1) if flipped else scaled)
                logits = logits.flip(-1) if flipped else logits
                passes.append(F.interpolate(logits, size=(20, 30), mode="bilinear", align_corners=False).softmax(1)[0])
    out = predict_probabilities(model, image, [1.0, 0.5, 1.5], flip=True)
    torch.testing.assert_close(out, torch.stack(passes).mean(0))
    torch.testing.assert_close(out.sum(0), torch.ones(20, 30))


def test_score_split_equals_numpy_confusion_matrix(tmp_path):
    dataset = make_dataset(tmp_path)
    dataset.splits["val"] = dataset.ids("train")
    model = PixelwiseNet(classes=4, seed=3)
    matrix = score_split(model, dataset, "val", torch.device("cpu")).matrix
    weight, bias = model.conv.weight[:, :, 0, 0].detach().numpy(), model.conv.bias.detach().numpy()
    expected = np.zeros((4, 4), np.int64)
    for image_id in dataset.ids("val"):
        pixels = normalize(dataset.read_image(image_id), model.mean, model.std).numpy()  # [3, H, W]
        prediction = (np.einsum("kc,chw->khw", weight, pixels) + bias[:, None, None]).argmax(0)
        truth = dataset.read_mask(image_id)
        for row in range(truth.shape[0]):
            for col in range(truth.shape[1]):
                if truth[row, col] != 255:
                    expected[truth[row, col], prediction[row, col]] += 1
    np.testing.assert_array_equal(matrix, expected)
    assert matrix.sum() == sum((dataset.read_mask(i) != 255).sum() for i in dataset.ids('val'))


def test_segment_returns_labels_of_image_size_with_and_without_crf():
    model = PixelwiseNet(classes=3)
    image = np.random.default_rng(0).integers(0, 255, (17, 23, 3), dtype=np.uint8)
    plain = segment(model, image, torch.device("cpu"))
    refined = segment(model, image, torch.device("cpu"), crf=CrfParams(iterations=3))
    assert plain.shape == refined.shape == (17, 23) and plain.dtype == np.uint8
    probabilities = predict_probabilities(model, normalize(image, model.mean, model.std)).numpy()  # [3, H, W]
    np.testing.assert_array_equal(plain, probabilities.argmax(0))
    np.testing.assert_array_equal(refined, dense_crf(image, probabilities, CrfParams(iterations=3)).argmax(0))


def test_predict_writes_a_palette_png_and_overlay_per_image(tmp_path):
    model = build_segmenter("deeplabv3plus", "resnet18", 3)
    checkpoint = tmp_path / "seg.pt"
    settings = {"arch": "deeplabv3plus", "backbone": "resnet18", "output_stride": 16}
    save_checkpoint(checkpoint, model, "cam", {"seg": settings}, class_names=["background", "a", "b"])
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"first": (40, 56), "second": (33, 21)}
    for name, (height, width) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / f"{name}.jpg")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["predict", str(folder), "--model", str(checkpoint), "--out", str(out),
                                      "--scale", "1.0", "--scale", "0.75", "--flip"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.png")) == ["first.png", "second.png"]
    for name, size in sizes.items():
        labels = read_label_png(out / f"{name}.png")
        assert labels.shape == size and labels.max() <= 2
        assert Image.open(out / f"{name}_overlay.jpg").size == size[::-1]
    missing = CliRunner().invoke(app, ["predict", str(tmp_path / "nope.jpg"), "--model", str(checkpoint)])
    assert missing.exit_code == 2 and "nope.jpg: no such image file or folder" in missing.output
    not_seg = tmp_path / "cls.pt"
    save_checkpoint(not_seg, CamNet(Backbone("resnet18"), 2), "cam", {"cls": {}})
    wrong = CliRunner().invoke(app, ["predict", str(folder), "--model", str(not_seg), "--out", str(out)])
    assert wrong.exit_code == 2 and "not a segmentation checkpoint" in wrong.output


def test_list_images_rejects_repeated_names_and_empty_folders(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder in ("a", "b"):
        Image.new("RGB", (4, 4)).save(tmp_path / folder / "x.png")
    assert list_images([tmp_path / "a"]) == [tmp_path / "a" / "x.png"]
    with pytest.raises(DataError, match="share the name 'x'"):
        list_images([tmp_path / "a", tmp_path / "b"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no images"):
        list_images([tmp_path / "empty"])
