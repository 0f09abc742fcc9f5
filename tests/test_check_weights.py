"""`wsss check-weights` loads the files an experiment names with the stages' own loaders."""
import timm
import torch
from typer.testing import CliRunner

from stages.cli import app


def test_check_weights_loads_a_good_file_and_names_a_bad_one(tmp_path):
    good = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), good)
    result = CliRunner().invoke(app, ["check-weights", f"cls.pretrained={good}", f"affinity.pretrained={good}"])
    assert result.exit_code == 0, result.output
    assert f"classifier (cam, resnet18): {good} loaded" in result.output
    assert f"AffinityNet (resnet18): {good} loaded" in result.output
    foreign = tmp_path / "foreign.pth"
    torch.save({"unrelated.weight": torch.zeros(3)}, foreign)
    refused = CliRunner().invoke(app, ["check-weights", f"cls.pretrained={foreign}"])
    assert refused.exit_code == 2 and str(foreign) in refused.output and len(refused.output.strip().splitlines()) == 1
    missing = CliRunner().invoke(app, ["check-weights", "profile=paper", "method=mct"])
    assert missing.exit_code == 2
    assert "weights/deit_small_patch16_224.pth: weights file (cls.pretrained) not found" in missing.output
