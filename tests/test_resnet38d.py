import pytest
import torch
import torch.nn.functional as F

from wsss_core.errors import ParamsError
from wsss_core.models.resnet38d import ResNet38d, load_resnet38d_weights

WIDE_BLOCKS = ("b2", "b2_1", "b2_2", "b3", "b3_1", "b3_2", "b4", "b4_1", "b4_2", "b4_3", "b4_4", "b4_5",
               "b5", "b5_1", "b5_2")
PSA_ORDER = ("conv1a",) + WIDE_BLOCKS + ("b6", "b7")
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
PSA_PARAMETERS = 105_070_912  # sum of numel over psa's network.resnet38d.Net().parameters()


def psa_keys() -> set[str]:
    """The state dict keys of PSA's network/resnet38d.py Net (plus num_batches_tracked)."""
    def bn(name):
        return {f"{name}.{p}" for p in BN}

    keys = {"conv1a.weight"} | bn("bn7")
    for block in WIDE_BLOCKS:  # the first block of each stage changes the shape: it has a 1x1 shortcut
        keys |= bn(f"{block}.bn_branch2a") | bn(f"{block}.bn_branch2b1")
        keys |= {f"{block}.conv_branch2a.weight", f"{block}.conv_branch2b1.weight"}
        keys |= {f"{block}.conv_branch1.weight"} if "_" not in block else set()
    for block in ("b6", "b7"):
        keys |= bn(f"{block}.bn_branch2a") | bn(f"{block}.bn_branch2b1") | bn(f"{block}.bn_branch2b2")
        keys |= {f"{block}.conv_branch{b}.weight" for b in ("2a", "2b1", "2b2", "1")}
    return keys


def randomised(width: float = 1 / 16, seed: int = 0) -> ResNet38d:
    """A ResNet38d in eval mode with random BN statistics and affine parameters."""
    torch.manual_seed(seed)
    model = ResNet38d(width).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    return model


def test_full_width_state_dict_is_psas():
    with torch.device("meta"):
        model = ResNet38d()
    state = model.state_dict()
    assert set(state) == psa_keys() and len(state) == 228
    shapes = {"conv1a.weight": (64, 3, 3, 3), "b2.conv_branch1.weight": (128, 64, 1, 1),
              "b3.conv_branch2a.weight": (256, 128, 3, 3), "b4_5.conv_branch2b1.weight": (512, 512, 3, 3),
              "b5.conv_branch2a.weight": (512, 512, 3, 3), "b5.conv_branch2b1.weight": (1024, 512, 3, 3),
              "b5.conv_branch1.weight": (1024, 512, 1, 1), "b5_2.bn_branch2a.running_var": (1024,),
              "b6.conv_branch2a.weight": (512, 1024, 1, 1), "b6.conv_branch2b1.weight": (1024, 512, 3, 3),
              "b6.conv_branch2b2.weight": (2048, 1024, 1, 1), "b6.conv_branch1.weight": (2048, 1024, 1, 1),
              "b7.conv_branch2b1.weight": (2048, 1024, 3, 3), "b7.bn_branch2b2.weight": (2048,),
              "b7.conv_branch1.weight": (4096, 2048, 1, 1), "bn7.weight": (4096,), "bn7.running_mean": (4096,)}
    assert {key: tuple(state[key].shape) for key in shapes} == shapes
    assert sum(p.numel() for p in model.parameters()) == PSA_PARAMETERS
    assert model.stage_channels == (64, 128, 256, 512, 1024, 4096)
    assert (model.b5.conv_branch2a.dilation, model.b5.conv_branch2b1.dilation) == ((1, 1), (2, 2))
    assert model.b7.conv_branch2b1.dilation == (4, 4) and model.b7.conv_branch2b1.padding == (4, 4)
    assert (model.b6.dropout_2b1.p, model.b7.dropout_2b2.p) == (0.3, 0.5)


def test_width_rounds_every_channel_count():
    model = ResNet38d(0.1)
    assert model.stage_channels == (6, 13, 26, 51, 102, 410)
    assert model.b7.conv_branch2a.weight.shape == (102, 205, 1, 1)  # in 205, out 410 // 4
    assert model.b7.conv_branch2b1.weight.shape == (205, 102, 3, 3)  # out 410 // 2


def test_stage_shapes_and_strides():
    model = randomised()
    assert model.stage_channels == (4, 8, 16, 32, 64, 256)
    features, shapes = torch.randn(1, 3, 65, 65), []
    with torch.no_grad():
        for stage in model.stages():
            features = stage(features)
            shapes.append(tuple(features.shape))
    assert shapes == [(1, 4, 65, 65), (1, 8, 33, 33), (1, 16, 17, 17), (1, 32, 9, 9), (1, 64, 9, 9), (1, 256, 9, 9)]
    assert features.min() >= 0  # top ends in BN-ReLU


def test_stages_are_views_composing_psas_forward():
    model = randomised()
    keys = list(model.state_dict())
    stages = model.stages()
    assert list(model.state_dict()) == keys  # the views register nothing on the network
    assert stages[2][0] is model.b3 and stages[5][2] is model.bn7
    assert {id(p) for s in stages for p in s.parameters()} == {id(p) for p in model.parameters()}
    images = torch.randn(2, 3, 33, 29)
    with torch.no_grad():
        expected = images
        for name in PSA_ORDER:
            expected = getattr(model, name)(expected)
        expected = F.relu(model.bn7(expected))
        composed = images
        for stage in stages:
            composed = stage(composed)
        assert torch.equal(composed, expected) and torch.equal(model(images), expected)
    assert expected.shape == (2, 256, 5, 4)


def test_psa_file_round_trips_and_skips_the_classifier(tmp_path):
    source = randomised(seed=1)
    state = {f"module.{key}": value for key, value in source.state_dict().items()
             if not key.endswith("num_batches_tracked")}  # PSA's files predate num_batches_tracked
    state["module.fc8.weight"] = torch.zeros(20, 256, 1, 1)  # res38_cls.pth's VOC classifier
    path = tmp_path / "res38_cls.pth"
    torch.save({"state_dict": state}, path)
    target = ResNet38d(1 / 16)
    assert load_resnet38d_weights(target, path, "seg.pretrained") == ["fc8.weight"]
    loaded = target.state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(loaded[key], value) or key.endswith("num_batches_tracked"), key
    target.load_state_dict(source.state_dict(), strict=True)


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.update({"b4_2.conv_branch2a.weight": torch.zeros(32, 16, 3, 3)}),
     r"'b4_2.conv_branch2a.weight' is \[32, 16, 3, 3\] in the file, ResNet-38d needs \[32, 32, 3, 3\]"),
    (lambda s: s.pop("b6.conv_branch1.weight"), r"missing key 'b6.conv_branch1.weight' \(1 missing, 0 unexpected\)"),
    (lambda s: s.update({"f8_3.weight": torch.zeros(1)}), r"unexpected key 'f8_3.weight' \(0 missing, 1 unexpected\)"),
])
def test_a_file_that_does_not_fit_is_one_line_naming_key_file_and_tensor(tmp_path, edit, message):
    state = ResNet38d(1 / 16).state_dict()
    edit(state)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ParamsError, match=r"^seg\.pretrained: .*bad\.pth.*" + message) as error:
        load_resnet38d_weights(ResNet38d(1 / 16), path, "seg.pretrained")
    assert "\n" not in str(error.value)
