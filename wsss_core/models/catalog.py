"""What the network families offer, without building anything: backbone names, sizes and the structural numbers
that params are validated against. No torch and no timm here, so that params, method checks and light stages
(`prepare`, the label stages) can read them without importing a network; each family's file imports its own
entries from here (the one copy).
"""
from __future__ import annotations

CNN_BACKBONES = ("resnet18", "resnet50", "resnet101", "resnest101e", "tf_efficientnet_lite0")
"""timm CNNs a CAM classifier, Multi-SA, AffinityNet or DeepLabV3+ is built on (models/backbones.py)."""

VIT_BACKBONES = ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224")
"""timm DeiTs MCTformer-V2 is built on (models/mctformer.py)."""
DEIT_DEPTH = 12
"""Blocks of every DeiT in VIT_BACKBONES."""

CONFORMER_SIZES = {  # the official sizes (github.com/pengzhiliang/Conformer) and a CPU size for tests
    "conformer_tiny_patch16": {"channel_ratio": 1, "embed_dim": 384, "num_heads": 6, "drop_path_rate": 0.1},
    "conformer_small_patch16": {"channel_ratio": 4, "embed_dim": 384, "num_heads": 6, "drop_path_rate": 0.1},
    "conformer_base_patch16": {"channel_ratio": 6, "embed_dim": 576, "num_heads": 9, "drop_path_rate": 0.1},
    "conformer_cpu": {"channel_ratio": 1, "embed_dim": 192, "num_heads": 3, "drop_path_rate": 0.0},
}
"""Conformer sizes by backbone name (models/conformer.py), for `transcam` and `conformer_ms`."""
CONFORMER_BACKBONES = tuple(CONFORMER_SIZES)
CONFORMER_DEPTH = 12
"""Blocks of every released Conformer."""

AGEN_CLS_BACKBONES = ("vgg16", "tf_efficientnet_lite0")
"""Backbones of AGEN's branch A, the classifier (cls.backbone; models/agen.py)."""
AGEN_SEG_BACKBONES = ("resnet38d", "tf_efficientnet_lite0")
"""Backbones of AGEN's branch B, the segmenter (methods.agen.model.seg_backbone)."""
AGEN_STAGE1_STRIDE = {"vgg16": 1, "resnet38d": 1, "tf_efficientnet_lite0": 2}
"""Stride of each AGEN backbone's first stage: sharing stage 1 alone needs equal ones."""
AGM_STAGES = (3, 4, 5)
"""The stages AGEN's AGMs and CoAMs can sit on."""
NEW_LAYER_INITS = ("normal", "xavier", "kaiming")
"""Initialisations of AGEN's new layers."""

MULTISA_MAX_LAYERS = 3
"""Taps Multi-SA can attend and stack (strides 8, 16 and the final features)."""
