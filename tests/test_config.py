import re
import subprocess
import sys
from itertools import product

import pytest
import yaml

from stages.compose import compose
from tests.conftest import REPO
from wsss_core.config import Params, Section, parse_params
from wsss_core.errors import ParamsError
from wsss_core.methods import MethodParams, RefineParams, method_params

METHODS = method_params()


def parse(mapping):
    return parse_params(mapping, METHODS)


def test_params_yaml_in_repo_is_valid_and_matches_defaults():
    params = parse(yaml.safe_load((REPO / "params.yaml").read_text()))
    assert params == parse({})
    assert params.methods["cam"] == METHODS["cam"]()


def test_params_yaml_is_the_composed_default():
    """params.yaml is what `dvc exp run` (Hydra composition of conf/) writes with no override."""
    assert yaml.safe_load(compose([], REPO / "conf")) == yaml.safe_load((REPO / "params.yaml").read_text())


def group_options(group: str) -> list[str]:
    return sorted(path.stem for path in (REPO / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize("method, data, profile", list(product(sorted(METHODS), group_options("data"),
                                                                  group_options("profile"))))
def test_every_composition_validates(method, data, profile):
    composed = yaml.safe_load(compose([f"method={method}", f"data={data}", f"profile={profile}"], REPO / "conf"))
    params = parse(composed)
    assert (params.method, params.profile) == (method, profile)
    assert params.data.name == {"synthetic": "synthetic", "tags": "tags", "coco": "coco"}.get(data, "voc")
    assert "${" not in yaml.safe_dump(composed)  # every interpolation resolved


def test_groups_override_the_base_and_each_other():
    mini = parse(yaml.safe_load(compose(["data=voc12-mini"], REPO / "conf")))
    assert mini.data.voc.root == "../shared/data/voc12-mini" and mini.cls.pretrained == "efficientnet_lite0"
    paper = parse(yaml.safe_load(compose(["data=voc12-mini", "profile=paper"], REPO / "conf")))
    assert paper.cams.scales == [1.0, 0.5, 1.5, 2.0] and paper.seg.arch == "deeplabv3_resnet101"
    assert paper.cls.backbone == "resnet50" and paper.cls.crop_size == 512  # conf/method_profile/cam_paper.yaml
    one_value = parse(yaml.safe_load(compose(["data=voc12-mini", "cls.lr=0.5"], REPO / "conf")))
    assert one_value.cls.lr == 0.5 and one_value.cls.backbone == "tf_efficientnet_lite0"


@pytest.mark.parametrize("overrides, source", [
    ([], "conf/data/synthetic.yaml"), (["data=voc12-mini"], "../shared/data/voc12-mini"),
    (["data=voc", "data.voc.root=/d/VOC2012"], "/d/VOC2012"), (["data=tags"], "data/tags"),
    (["data=tags", "data.tags.root=mine"], "mine")])
def test_each_data_preset_makes_its_root_the_prepare_stages_dependency(overrides, source):
    params = parse(yaml.safe_load(compose(overrides, REPO / "conf")))
    assert params.data.source == source
    assert "${data.source}" in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["prepare"]["deps"]


def test_agen_cpu_recipe_deviates_and_the_paper_profile_keeps_the_papers():
    def composed(*overrides: str):
        return parse(yaml.safe_load(compose(["method=agen", *overrides], REPO / "conf")))

    for cpu in (composed(), composed("data=voc12-mini")):
        model = cpu.methods["agen"].model
        assert (cpu.cls.optimizer, cpu.cls.lr, model.warm_start_epochs, model.new_layer_init, model.seed_mode,
                model.cam_normalisation, model.delta_top) == ("adamw", 1e-4, 3, "kaiming", "range_top", "relu_max", 0.3)
    paper = composed("data=voc12-mini", "profile=paper")
    model = paper.methods["agen"].model
    assert (paper.cls.optimizer, paper.cls.lr, model.warm_start_epochs, model.new_layer_init, model.seed_mode,
            model.cam_normalisation) == ("sgd", 0.001, 0, "normal", "value", "relu_max")


def test_multisa_recipe_per_profile_and_data_preset():
    def composed(*overrides: str):
        return parse(yaml.safe_load(compose(["method=multisa", *overrides], REPO / "conf")))

    synthetic, mini, paper = composed(), composed("data=voc12-mini"), composed("data=voc12-mini", "profile=paper")
    for params in (synthetic, mini, paper):  # the method's recipe and downstream (conf/method/multisa.yaml)
        assert params.cls.nesterov and params.cls.optimizer == "sgd" and params.cls.weight_decay == 1e-4
        assert (params.affinity.label_mode, params.affinity.irn_fg_threshold, params.affinity.irn_bg_threshold,
                params.rw.beta, params.crf.unary) == ("irn", 0.4, 0.1, 10.0, "labels")
    assert (synthetic.cls.lr, synthetic.cls.new_layer_lr_mult, synthetic.cls.backbone) == (0.001, 10.0, "resnet18")
    assert (mini.cls.lr, mini.cls.new_layer_lr_mult, mini.cls.backbone) == (0.01, 10.0, "tf_efficientnet_lite0")
    tap_norms = [params.methods["multisa"].model.tap_norm for params in (synthetic, mini, paper)]
    assert tap_norms == ["none", "bn_relu", "none"]  # Lite0's taps normalised; ResNet's are post-ReLU already
    assert (paper.cls.lr, paper.cls.new_layer_lr_mult, paper.cls.backbone, paper.cls.crop_size, paper.cls.epochs,
            paper.cls.batch_size, paper.rw.bg_mode, paper.crf.iterations) == (
        0.1, 10.0, "resnest101e", 512, 15, 8, "after_walk", 1)


def test_no_absolute_paths_in_the_configuration():
    for path in (REPO / "conf").rglob("*.yaml"):
        assert "/work/" not in path.read_text() and "\n  root: /" not in path.read_text(), path


def leaves(mapping: dict, prefix: tuple = ()) -> dict[tuple, object]:
    """{key path: value} of every non-mapping value (an empty mapping is a value) of a config file's mapping."""
    found = {}
    for key, value in (mapping or {}).items():
        if isinstance(value, dict) and value:
            found.update(leaves(value, prefix + (key,)))
        elif key != "defaults":
            found[prefix + (key,)] = value
    return found


@pytest.mark.parametrize("method_file", sorted(p.name for p in (REPO / "conf/method").glob("*.yaml")))
def test_a_method_file_holds_only_what_differs_from_the_defaults(method_file):
    """Every value of conf/method/<name>.yaml other than `method:` differs from conf/config.yaml's, or overrides a
    key that a data or profile file (composed before it) sets."""
    base = leaves(yaml.safe_load((REPO / "conf/config.yaml").read_text()))
    set_before = {key for group in ("data", "profile") for path in (REPO / "conf" / group).glob("*.yaml")
                  for key in leaves(yaml.safe_load(path.read_text()))}
    restated = [".".join(key) for key, value in leaves(yaml.safe_load((REPO / "conf/method" / method_file)
                                                                      .read_text())).items()
                if key != ("method",) and key in base and base[key] == value and key not in set_before]
    assert restated == [], f"{method_file} restates the defaults of {restated}"


def test_partial_mapping_fills_defaults():
    params = parse({"cls": {"epochs": 2}})
    assert params.cls.epochs == 2 and params.cls.lr == Params().cls.lr


def test_unknown_key_names_key_and_allowed_keys():
    with pytest.raises(ParamsError) as err:
        parse({"cls": {"epoch": 2}})
    message = str(err.value)
    assert "unknown key cls.epoch" in message and "epochs" in message and "\n" not in message


def test_unknown_top_level_section():
    with pytest.raises(ParamsError, match=r"unknown key clss \(allowed: method, profile, device"):
        parse({"clss": {}})


def test_wrong_type_names_key():
    with pytest.raises(ParamsError, match=r"cls\.epochs: .*integer.*'five'"):
        parse({"cls": {"epochs": "five"}})
    with pytest.raises(ParamsError, match=r"cams\.flip"):
        parse({"cams": {"flip": "yes"}})


def test_out_of_range_value_names_key():
    with pytest.raises(ParamsError, match=r"data\.synthetic\.part_fraction"):
        parse({"data": {"synthetic": {"part_fraction": 1.5}}})


def test_unknown_method_lists_registered_ones():
    with pytest.raises(ParamsError, match=re.escape(f"method 'foo' is not one of: {', '.join(METHODS)}")):
        parse({"method": "foo"})


def test_unknown_choice_lists_allowed():
    with pytest.raises(ParamsError, match=r"data\.name: .*'synthetic', 'voc', 'tags' or 'coco'"):
        parse({"data": {"name": "imagenet"}})


def test_not_a_mapping():
    with pytest.raises(ParamsError, match="expected a mapping"):
        parse([1, 2])


class GammaRefine(RefineParams):
    gamma: float = 1.0


class ToyParams(MethodParams):
    refine: GammaRefine = GammaRefine()


def test_method_sections_are_validated_by_their_own_model():
    registered = {**METHODS, "toy": ToyParams}
    params = parse_params({"method": "toy", "methods": {"toy": {"refine": {"gamma": 2.0}}}}, registered)
    assert params.method_section().refine.gamma == 2.0 and params.methods["cam"] == METHODS["cam"]()
    with pytest.raises(ParamsError, match=r"unknown key methods\.toy\.refine\.gama \(allowed: gamma\)"):
        parse_params({"methods": {"toy": {"refine": {"gama": 2.0}}}}, registered)  # inactive sections too
    with pytest.raises(ParamsError, match=r"methods\.toy\.refine\.gamma: Input should be a valid number"):
        parse_params({"methods": {"toy": {"refine": {"gamma": "x"}}}}, registered)
    with pytest.raises(ParamsError, match=re.escape(f"unknown key methods.nope (registered methods: "
                                                    f"{', '.join(registered)})")):
        parse_params({"methods": {"nope": {}}}, registered)
    assert isinstance(params.model_dump()["methods"]["toy"]["refine"], dict)
    assert params.model_dump()["methods"]["toy"]["refine"] == {"gamma": 2.0}
    assert issubclass(ToyParams, Section)


def test_stage_prints_one_line_error_and_exits_2(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("method: foo\n")
    result = subprocess.run([sys.executable, "-m", "stages.prepare", "--params", str(params)],
                            cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: {params}: method 'foo' is not one of: {', '.join(METHODS)}"]


def test_prepare_has_a_reader_for_every_data_source():
    from typing import get_args

    from stages.prepare import SOURCES
    from wsss_core.config import DataParams

    assert set(SOURCES) == set(get_args(DataParams.model_fields["name"].annotation))


def test_the_synthetic_spec_is_the_section_with_data_seed_and_only_for_the_synthetic_source():
    from wsss_core.config import DataParams
    from wsss_core.data.sources import SyntheticParams, SyntheticSpec

    data = DataParams(seed=7, synthetic=SyntheticParams(n_train=20, image_size=64))
    spec = data.synthetic_spec()
    assert type(spec) is SyntheticSpec and spec.seed == 7
    assert {key: value for key, value in spec.model_dump().items() if key != "seed"} == data.synthetic.model_dump()
    assert DataParams(name="voc").synthetic_spec() is None


def test_wsss_compose_writes_what_dvc_would_and_refuses_unknown_groups(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from stages.compose import app

    monkeypatch.chdir(REPO)
    result = CliRunner().invoke(app, ["data=voc12-mini", "cls.lr=0.5", "--out", str(tmp_path / "p.yaml")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p.yaml").read_text() == compose(["data=voc12-mini", "cls.lr=0.5"], REPO / "conf")
    result = CliRunner().invoke(app, ["method=nope", "--out", str(tmp_path / "q.yaml")])
    assert result.exit_code == 2 and "cannot compose method=nope (In 'config': Could not find 'method/nope')" \
        in result.stderr and not (tmp_path / "q.yaml").exists()
    result = CliRunner().invoke(app, ["cls.lr=-1", "--out", str(tmp_path / "r.yaml")])  # composes, fails validation
    assert result.exit_code == 2 and "with cls.lr=-1: cls.lr: Input should be greater than 0, got -1" in result.stderr
    assert not (tmp_path / "r.yaml").exists()


def test_the_composed_default_spells_out_every_knob():
    """conf/config.yaml lists every param of the models, so params.yaml shows each one (no hidden default)."""
    composed = yaml.safe_load(compose([], REPO / "conf"))

    def missing(given: dict, full: dict, prefix: str = "") -> list[str]:
        found = []
        for key, value in full.items():
            if key not in given:
                found.append(prefix + key)
            elif isinstance(value, dict) and value:
                found += missing(given[key], value, f"{prefix}{key}.")
        return found

    assert missing(composed, parse({}).model_dump()) == []
