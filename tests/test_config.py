import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO
from wsss_core.config import Params, parse_params
from wsss_core.errors import ParamsError


def test_params_yaml_in_repo_is_valid_and_matches_defaults():
    params = parse_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    assert params == Params()


def test_partial_mapping_fills_defaults():
    params = parse_params({"cls": {"epochs": 2}})
    assert params.cls.epochs == 2 and params.cls.lr == Params().cls.lr


def test_unknown_key_names_key_and_allowed_keys():
    with pytest.raises(ParamsError) as err:
        parse_params({"cls": {"epoch": 2}})
    message = str(err.value)
    assert "unknown key cls.epoch" in message and "epochs" in message and "\n" not in message


def test_unknown_top_level_section():
    with pytest.raises(ParamsError, match=r"unknown key clss \(allowed: method, device"):
        parse_params({"clss": {}})


def test_wrong_type_names_key():
    with pytest.raises(ParamsError, match=r"cls\.epochs: .*integer.*'five'"):
        parse_params({"cls": {"epochs": "five"}})
    with pytest.raises(ParamsError, match=r"cams\.flip"):
        parse_params({"cams": {"flip": "yes"}})


def test_out_of_range_value_names_key():
    with pytest.raises(ParamsError, match=r"data\.synthetic\.part_fraction"):
        parse_params({"data": {"synthetic": {"part_fraction": 1.5}}})


def test_unknown_method_lists_allowed():
    with pytest.raises(ParamsError, match=r"method 'foo' is not one of: cam"):
        parse_params({"method": "foo"})


def test_unknown_choice_lists_allowed():
    with pytest.raises(ParamsError, match=r"data\.name: .*'synthetic' or 'voc'"):
        parse_params({"data": {"name": "coco"}})


def test_missing_voc_root_names_key(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ParamsError, match=r"data\.voc\.root: directory not found: .*nowhere"):
        parse_params({"data": {"name": "voc", "voc": {"root": str(missing)}}})


def test_not_a_mapping():
    with pytest.raises(ParamsError, match="expected a mapping"):
        parse_params([1, 2])


def test_stage_prints_one_line_error_and_exits_2(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("method: foo\n")
    result = subprocess.run([sys.executable, "-m", "stages.prepare", "--params", str(params)],
                            cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: {params}: method 'foo' is not one of: cam"]


def test_param_sections_mirror_core_defaults():
    """Core settings objects and their params sections must not drift apart."""
    from dataclasses import asdict

    from wsss_core.config import CrfParams, SyntheticParams
    from wsss_core.data.synthetic import SyntheticSpec
    from wsss_core.refine.crf import CrfSettings

    assert asdict(CrfSettings()) == CrfParams().model_dump(exclude={"workers"})
    spec = asdict(SyntheticSpec())
    assert SyntheticParams().model_dump() == {key: spec[key] for key in SyntheticParams.model_fields}
    assert set(spec) - set(SyntheticParams.model_fields) == {"seed"}  # seed comes from data.seed
