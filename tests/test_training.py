"""The one training loop's recipe: parameter groups, optimizers, schedules, frozen BatchNorm."""
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from wsss_core.config import ClsParams, TrainRecipe
from wsss_core.errors import ParamsError
from wsss_core.models.groups import ParamGroup
from wsss_core.training import EpochSeededSet, batches_per_epoch, build_optimizer, fit, lr_factor


def test_poly_cosine_step_and_warmup_factors_by_hand():
    poly = TrainRecipe(schedule="poly", poly_power=1.0)
    assert [lr_factor(step, 100, 10, poly) for step in (0, 50, 99)] == [1.0, 0.5, pytest.approx(0.01)]
    cosine = TrainRecipe(schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, 100, 10, cosine) == pytest.approx(1.0)
    assert lr_factor(50, 100, 10, cosine) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(100, 100, 10, cosine) == pytest.approx(0.1)
    step = TrainRecipe(schedule="step", step_milestones=[2, 4], step_gamma=0.1)
    assert [lr_factor(s, 60, 10, step) for s in (19, 20, 39, 45)] == pytest.approx([1.0, 0.1, 0.1, 0.01])
    warm = TrainRecipe(schedule="poly", poly_power=1.0, warmup_epochs=1)
    assert [lr_factor(s, 110, 10, warm) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(10, 110, 10, warm) == 1.0 and lr_factor(60, 110, 10, warm) == pytest.approx(0.5)
    assert math.isclose(lr_factor(50, 100, 10, TrainRecipe()), 0.5 ** 0.9)  # the default: poly 0.9


def test_optimizer_groups_take_their_lr_multiplier_and_weight_decay_flag():
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    groups = [ParamGroup("backbone", list(net[0].parameters())),
              ParamGroup("new", [net[1].weight], 10.0), ParamGroup("gate", [net[1].bias], 10.0, weight_decay=False)]
    sgd = build_optimizer(groups, TrainRecipe(lr=0.1, weight_decay=1e-4, nesterov=True))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"]
    assert [(g["initial_lr"], g["weight_decay"]) for g in sgd.param_groups] == \
        [(0.1, 1e-4), (pytest.approx(1.0), 1e-4), (pytest.approx(1.0), 0.0)]
    adamw = build_optimizer(groups, TrainRecipe(optimizer="adamw", lr=1e-3, weight_decay=0.05))
    assert isinstance(adamw, torch.optim.AdamW) and [g["weight_decay"] for g in adamw.param_groups] == [0.05, 0.05, 0.0]


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))

    def forward(self, images):
        return self.head(self.backbone(images)).mean((2, 3))

    def parameter_groups(self, new_layer_lr_mult):
        return [ParamGroup("backbone", list(self.backbone.parameters())),
                ParamGroup("new", list(self.head.parameters()), new_layer_lr_mult)]


class Batches(EpochSeededSet):
    def __init__(self):
        super().__init__([str(i) for i in range(8)], seed=0)
        generator = torch.Generator().manual_seed(0)
        self.images, self.targets = torch.randn(8, 3, 8, 8, generator=generator), torch.randn(8, 2, generator=generator)

    def __getitem__(self, index):
        return self.images[index], self.targets[index]


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_freeze_bn_keeps_the_backbone_batchnorm_only(freeze_bn):
    torch.manual_seed(0)
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = ClsParams(epochs=2, batch_size=4, lr=0.1, freeze_bn=freeze_bn)

    def loss(batch):
        images, targets = batch
        return ((model(images) - targets) ** 2).mean(), {}

    fit(model, Batches(), loss, recipe=recipe, device=torch.device("cpu"), seed=0, desc="test")
    after = model.state_dict()
    backbone_bn = [k for k in before if k.startswith("backbone.1.") and "num_batches" not in k]
    assert all(torch.equal(before[k], after[k]) for k in backbone_bn) == freeze_bn
    assert not torch.equal(before["head.1.running_mean"], after["head.1.running_mean"])  # new layers' BN trains
    assert not torch.equal(before["backbone.0.weight"], after["backbone.0.weight"])  # the backbone convs train


def test_a_diverging_loss_stops_training_with_one_line():
    torch.manual_seed(0)
    model = TinyNet()
    epochs_done = []

    def loss(batch):
        images, targets = batch
        return ((model(images) - targets) ** 2).mean() * float("inf"), {}

    with pytest.raises(ParamsError, match=r"^train_x: the loss became (inf|nan) in epoch 1: training diverged; "
                                          r"lower the learning rate \(lr\) of this stage's params$"):
        fit(model, Batches(), loss, recipe=ClsParams(epochs=2, batch_size=4), device=torch.device("cpu"), seed=0,
            desc="train_x", on_epoch_end=lambda epoch, means: epochs_done.append(epoch))
    assert epochs_done == []


def test_batches_per_epoch_is_the_length_of_fits_loader():
    for count, expected in ((1, 1), (7, 1), (8, 1), (9, 1), (17, 2), (300, 37)):
        assert batches_per_epoch(count, 8) == expected == len(DataLoader(range(count), batch_size=8,
                                                                         drop_last=count > 8))


class Vector(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2))


@pytest.mark.parametrize(("clip", "expected"), [(0.0, [-0.3, -0.4]), (10.0, [-0.3, -0.4]), (1.0, [-0.06, -0.08])])
def test_grad_clip_norm_rescales_a_gradient_longer_than_it(clip, expected):
    # loss = 3 w0 + 4 w1: gradient (3, 4), norm 5; one SGD step at lr 0.1 without momentum or decay.
    model = Vector()
    recipe = ClsParams(epochs=1, batch_size=8, lr=0.1, momentum=0.0, weight_decay=0.0, grad_clip_norm=clip)
    fit(model, Batches(), lambda batch: ((model.weight * torch.tensor([3.0, 4.0])).sum(), {}), recipe=recipe,
        device=torch.device("cpu"), seed=0, desc="train_x", groups=[ParamGroup("new", [model.weight])], steps=1)
    assert model.weight.detach().tolist() == pytest.approx(expected, abs=1e-6)
