"""Fidelity check against TransCAM's released code: its `Net` (network/conformer.py of a local clone of
github.com/liruiwen/TransCAM, imported from --reference, never copied here) and our Conformer-S with TransCAM's
switches, loaded with the same random state dict, on the same random images: the conv and transformer logits
and each of TransCAM's CAM modes (ours: `cam_and_attention` + `refine.attention.attention_refine`). Prints the
largest absolute difference relative to the largest value. Needs timm (its `timm.models.layers` alias).

    git clone https://github.com/liruiwen/TransCAM /tmp/TransCAM   # on a machine with network access
    python bench/transcam_reference.py --reference /tmp/TransCAM
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

from wsss_core.cams.attention import TRANSCAM_MODES, attention_refine
from wsss_core.models.conformer import TRANSCAM_SWITCHES, conformer_s

VOC_CLASSES = 21


def relative_difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Return max |ours - theirs| / max |theirs|."""
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="a local clone of liruiwen/TransCAM")
    parser.add_argument("--size", type=int, default=224, help="square input side (TransCAM needs square grids)")
    args = parser.parse_args()
    if not (args.reference / "network" / "conformer.py").is_file():
        parser.error(f"--reference {args.reference}: no network/conformer.py (not a TransCAM clone)")
    sys.path.insert(0, str(args.reference))
    reference = importlib.import_module("network.conformer")
    torch.manual_seed(0)
    theirs = reference.Net(patch_size=16, channel_ratio=4, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4,
                           qkv_bias=True, drop_rate=0.0, drop_path_rate=0.1, num_classes=VOC_CLASSES).eval()
    ours = conformer_s(VOC_CLASSES, **TRANSCAM_SWITCHES).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    images = torch.randn(2, 3, args.size, args.size)
    with torch.no_grad():
        conv, trans, _ = ours(images)
        cam_logits, attention = ours.cam_and_attention(images)
        print(f"Conformer-S (TransCAM), 2 random images at {args.size} px: max |ours - theirs| / max |theirs|")
        for mode in TRANSCAM_MODES:
            their_conv, their_trans, their_cams = theirs(mode, images)
            if mode == TRANSCAM_MODES[0]:
                print(f"conv logits {relative_difference(conv, their_conv):.1e}, "
                      f"transformer logits {relative_difference(trans, their_trans):.1e}")
            refined = attention_refine(cam_logits, attention.sum(0), mode)
            print(f"CAM mode {mode}: {relative_difference(refined, their_cams):.1e}")


if __name__ == "__main__":
    main()
