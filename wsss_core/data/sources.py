"""The params sections of the data sources (`data.synthetic`, `data.voc`, `data.tags`, `data.coco`): what each
reader takes. Schemas only, apart from the readers, so that the params (and every stage) do not depend on how a
source is read or generated."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from wsss_core.sections import Fraction, NonNegativeFloat, NonNegativeInt, PositiveInt, Seed, Section

MAX_SYNTHETIC_CLASSES = 8  # the generator's class names (data/synthetic.py: CLASS_NAMES)
DEFAULT_MAX_ANNOTATION_BYTES = 2**30
"""Annotation JSONs larger than this are refused before reading (COCO 2014's train file is about 330 MB)."""
MAX_POLYGON_VALUES = 200_000
"""Default of data.coco.max_polygon_values: numbers in one annotation's polygons (COCO's largest: a few thousand)."""
COORDINATE_MARGIN = 0.25
"""Default of data.coco.coordinate_margin: polygon coordinates may lie this fraction of the image's size outside it
(pycocotools clips them)."""


class SyntheticParams(Section):
    """The generator's knobs (`data.synthetic`); the seed comes from `data.seed` (`with_seed`)."""

    n_train: PositiveInt = 300
    n_val: PositiveInt = 60
    image_size: Annotated[int, Field(ge=64)] = 192  # square images, px
    num_classes: Annotated[int, Field(ge=5, le=MAX_SYNTHETIC_CLASSES)] = 6  # foreground classes K
    max_objects: PositiveInt = 3  # labelled objects per image: 1..max_objects
    max_distractors: NonNegativeInt = 2  # unlabelled bodies without a part per image: 0..max_distractors
    part_fraction: Annotated[float, Field(gt=0.0, lt=0.5)] = 0.10  # distinctive part area / whole object area
    void_width: NonNegativeInt = 2  # px of 255 drawn on the background around every labelled object
    water_class: NonNegativeInt = 2  # this class (1-based) is biased to appear with the water band; 0: no class is
    water_bias: Fraction = 0.8  # P(water band) for images with water_class; others: data/synthetic.py's WATER_BASE_RATE
    # Labelled bodies move this fraction of the way to their part's colour: weak evidence beyond the part.
    body_tint: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.25

    @model_validator(mode="after")
    def _classes_fit(self) -> "SyntheticParams":
        if self.n_train < self.num_classes:
            raise ValueError(f"n_train {self.n_train} < num_classes {self.num_classes} (every class appears in train)")
        if self.water_class > self.num_classes:
            raise ValueError(f"water_class {self.water_class} is not one of the {self.num_classes} classes (0: none)")
        return self

    def with_seed(self, seed: int) -> "SyntheticSpec":
        """Return the set these knobs and `seed` describe."""
        return SyntheticSpec(**self.model_dump(), seed=seed)


class SyntheticSpec(SyntheticParams):
    """One synthetic set: the knobs and the seed that draws every image (the same spec writes the same bytes)."""

    seed: Seed = 0


class VocParams(Section):
    """A VOC-layout folder (`data.voc`)."""

    # A folder in VOC layout; relative paths are from the repo root (where stages run).
    root: str = "../shared/data/voc12-mini"
    train_list: str = "ImageSets/Segmentation/train.txt"
    # Empty: carve `val_fraction` of the train ids (seeded) as val.
    val_list: str = ""
    val_fraction: Fraction = 0.2
    # Read train masks from SegmentationClassAug where present.
    use_aug: bool = False


class TagsParams(Section):
    """Your own images with image-level tags (`data.tags`; the layout is in this module's docstring)."""

    root: str = "data/tags"  # the folder holding images/ and the labels file; relative paths are from the repo root
    labels: str = "labels.csv"  # CSV `id,labels` or JSON {id: [names]}, relative to root
    classes: str = "classes.txt"  # read when it exists; else the labels file's names in first-seen order
    # Empty: carve `val_fraction` of the ids (seeded) as val.
    val_list: str = ""
    val_fraction: Fraction = 0.2


class CocoParams(Section):
    """MS COCO 2014, or any set in its format (`data.coco`; the layout and the rasterising rule are in this
    module's docstring)."""

    root: str = "data/coco"  # holding <split>/ image folders and annotations/instances_<split>.json
    train_split: str = "train2014"
    val_split: str = "val2014"
    # Optional id lists (files under root) restricting a split; empty: every labelled image of the split.
    train_list: str = ""
    val_list: str = ""
    # Keep images with no annotation (the papers drop them: 82,081 train / 40,137 val of 82,783 / 40,504).
    keep_unlabelled: bool = False
    # What crowd regions become in the masks: ignore (255), class (their category) or background (0).
    crowd: Literal["ignore", "class", "background"] = "ignore"
    # Rasterised masks are kept here (one subfolder per annotation content and rule), across prepare runs.
    mask_cache: str = "data/coco_masks"
    # Annotation JSONs larger than this many bytes are refused before reading (COCO 2014's train file: ~330 MB).
    max_annotation_bytes: PositiveInt = DEFAULT_MAX_ANNOTATION_BYTES
    # Numbers in one annotation's polygons at most, and how far (a fraction of the image's size) outside the
    # image a polygon coordinate may lie (check_segmentation).
    max_polygon_values: PositiveInt = MAX_POLYGON_VALUES
    coordinate_margin: NonNegativeFloat = COORDINATE_MARGIN
