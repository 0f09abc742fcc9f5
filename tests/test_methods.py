"""The method contract, for every registered method and the test-only `toy` (timm's habit: one
parametrized suite over the registry), and the refine loop the base class owns."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from tests.fixtures import make_dataset
from tests.toy_method import ToyMethod
from wsss_core.cams.infer import export_cams
from wsss_core.cams.store import CamStore
from wsss_core.checkpoint import save_checkpoint
from wsss_core.config import CamsParams, ClsParams, parse_params
from wsss_core.errors import ParamsError
from wsss_core.methods import REGISTRY, get_method, method_params, register_method
from wsss_core.methods.cam import CamMethod

CLS = ClsParams(backbone="resnet18", output_stride=16)  # the CNN methods' (the ViT methods take their first backbone)


@pytest.fixture(params=[*sorted(REGISTRY), "toy"])
def method(request, monkeypatch):
    if request.param == "toy":
        monkeypatch.setitem(REGISTRY, "toy", ToyMethod)
    return REGISTRY[request.param]()


@pytest.fixture
def cls(method):
    return CLS if CLS.backbone in method.backbones else CLS.model_copy(update={"backbone": method.backbones[0]})


@pytest.fixture
def model(method, cls):
    torch.manual_seed(0)
    return method.build_classifier(cls, 3, pretrained=False).eval()


def test_network_exposes_normalisation_stride_and_groups_that_partition_its_parameters(method, model):
    assert len(model.mean) == len(model.std) == 3 and all(s > 0 for s in model.std)
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        cams = method.cam_maps(model, images)["cam"]
    assert cams.shape == (2, 3, 64 // model.cam_stride, 96 // model.cam_stride) and (cams >= 0).all()
    groups = model.parameter_groups(10.0)
    members = [id(p) for group in groups for p in group.params]
    assert len(members) == len(set(members)) and set(members) == {id(p) for p in model.parameters()}
    assert any(group.name == "backbone" and group.lr_mult == 1.0 for group in groups)
    assert any(group.lr_mult == 10.0 for group in groups)  # new layers take the new-layer multiplier


def test_training_loss_is_finite_with_float_parts_and_trains_every_group(method, model):
    model.train()
    batch = {"images": torch.randn(2, 3, 64, 64), "labels": torch.tensor([[1.0, 0, 1], [0, 1, 0]]),
             "rgb": torch.zeros(2, 64, 64, 3, dtype=torch.uint8)}
    loss, parts = method.training_loss(model, batch)
    assert loss.ndim == 0 and torch.isfinite(loss) and all(isinstance(v, float) for v in parts.values())
    loss.backward()
    for group in model.parameter_groups(10.0):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in group.params), group.name


def test_export_refine_and_raw_maps_round_trip(method, model, tmp_path):
    dataset = make_dataset(tmp_path)
    ids = dataset.ids("train")
    store_path, refined_path = tmp_path / "cams.h5", tmp_path / "refined.h5"
    export_cams(method.cam_hooks(model), dataset, ids, store_path, {"method": method.name},
                CamsParams(scales=[1.0], flip=True, batch_size=2), device=torch.device("cpu"))
    with CamStore(store_path) as store:
        for image_id in ids:
            image = dataset.read_image(image_id)
            keys = np.asarray(dataset.labels[image_id])
            raw = store.read_raw(image_id)
            with torch.no_grad():
                expected = method.raw_maps(model, _normalised_views(image, model))
            assert set(raw) == set(expected) == set(store.raw_names)
            for name, value in expected.items():
                layout, grid = store.raw_layout(image_id, name)
                assert layout == "views," + value.layout and grid == tuple(value.grid)
                np.testing.assert_allclose(raw[name], value.values.numpy(), atol=2e-3, rtol=2e-3)
            if method.has_segmenter:
                seg, seg_keys = store.read(image_id, "seg")
                assert seg.shape == (len(keys) + 1, *image.shape[:2]) and seg_keys.tolist() == keys.tolist()
                # softmax probabilities of [background, keys]: absent classes take the rest of the mass
                assert seg.min() >= 0 and seg.sum(0).max() <= 1 + 2e-3
    method.refine_cams(store_path, refined_path, ids)
    with CamStore(refined_path) as refined, CamStore(store_path) as source:
        for image_id in ids:
            cam, keys = refined.read(image_id)
            assert cam.shape == source.read(image_id)[0].shape and 0 <= cam.min() and cam.max() <= 1
            assert keys.tolist() == dataset.labels[image_id]
        if not method.refines:  # a pass-through is the same file (hard link), raw maps included
            assert refined_path.stat().st_ino == store_path.stat().st_ino
        else:
            assert refined.raw_names == [] and refined.attr("refined_by") == method.name


def _normalised_views(image: np.ndarray, model) -> torch.Tensor:
    """The two views export stores for one image: normalised image, then its mirror image."""
    from wsss_core.data.transforms import normalize

    tensor = normalize(image, model.mean, model.std)[None]
    return torch.cat([tensor, tensor.flip(-1)])


def test_checkpoint_rebuilds_strictly_and_refuses_other_model_params(method, model, cls, tmp_path):
    path = tmp_path / "cls.pt"
    save_checkpoint(path, model, method.name, method.checkpoint_params(cls), class_names=["bg", "a", "b", "c"])
    rebuilt = method.load_classifier(path, cls, 3)
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    with pytest.raises(ParamsError, match=r"trained with cls.output_stride=16, params say 8"):
        method.load_classifier(path, cls.model_copy(update={"output_stride": 8}), 3)


def test_segmenter_gives_background_plus_class_logits(method, model):
    branch = method.segmenter(model)
    assert (branch is not None) == method.has_segmenter
    if branch is not None:
        with torch.no_grad():
            logits = branch(torch.randn(1, 3, 64, 64))
        assert logits.shape[:2] == (1, 4) and hasattr(branch, "mean") and hasattr(branch, "std")


def test_toy_model_param_changes_the_network_and_is_checked_on_load(monkeypatch, tmp_path):
    monkeypatch.setitem(REGISTRY, "toy", ToyMethod)
    narrow = ToyMethod(ToyMethod.Params(model={"width": 4}))
    model = narrow.build_classifier(CLS, 3, pretrained=False)
    assert model.squeeze.out_channels == 4
    save_checkpoint(tmp_path / "c.pt", model, "toy", narrow.checkpoint_params(CLS))
    with pytest.raises(ParamsError, match=r"methods.toy=\{'model': \{'width': 4\}\}, params say \{'model': \{'width': 8\}\}"):
        ToyMethod().load_classifier(tmp_path / "c.pt", CLS, 3)


def test_registry_is_the_one_list_of_names():
    assert set(method_params()) == set(REGISTRY) and "cam" in REGISTRY
    with pytest.raises(ValueError, match="registered twice"):
        register_method(CamMethod)


def test_export_source_needs_a_segmentation_branch(monkeypatch):
    with pytest.raises(ParamsError, match=r"pseudo.source: export needs a method with a segmentation branch; "
                                          r"method 'cam' has none"):
        get_method(parse_params({"pseudo": {"source": "export"}}, method_params()))
    monkeypatch.setitem(REGISTRY, "toy", ToyMethod)
    params = parse_params({"method": "toy", "pseudo": {"source": "export"},
                           "methods": {"toy": {"refine": {"power": 2.0}}}}, method_params())
    method = get_method(params)
    assert isinstance(method, ToyMethod) and method.params.refine.power == 2.0
