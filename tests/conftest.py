import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
VOC_MINI = REPO.parent / "shared" / "data" / "voc12-mini"


@pytest.fixture
def voc_mini() -> Path:
    """The shared 311-image VOC subset; tests using it skip when it is absent."""
    if not (VOC_MINI / "JPEGImages").is_dir():
        pytest.skip(f"{VOC_MINI} not present")
    return VOC_MINI
