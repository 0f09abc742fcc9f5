"""Run the DVC pipeline in a temporary copy of the repo."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from stages.compose import compose
from tests.conftest import REPO

TINY_PARAMS = {
    "data": {"synthetic": {"n_train": 16, "n_val": 8, "image_size": 96}},
    "cls": {"epochs": 1, "batch_size": 8, "crop_size": 80, "resize_long": [80, 112]},
    "cams": {"scales": [1.0, 0.5], "batch_size": 8},
    "affinity": {"epochs": 1, "crop_size": 96, "resize_long": [80, 112]},
    "seg": {"epochs": 1, "crop_size": 80, "resize_long": [80, 112], "montage_images": 2},
}


def copy_repo(destination: Path, params: dict) -> Path:
    """Copy code, conf/, dvc.yaml and DVC config into a fresh git repo whose default profile is `params`.

    The overrides become conf/profile/test.yaml, the profile of the copy's conf/config.yaml, so that
    `dvc exp run -S ...` (which recomposes params.yaml from conf/) keeps them; params.yaml is composed.
    """
    destination.mkdir(parents=True, exist_ok=True)
    for name in ("stages", "wsss_core", "conf"):
        shutil.copytree(REPO / name, destination / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, destination / name)
    (destination / ".dvc").mkdir()
    shutil.copy(REPO / ".dvc" / "config", destination / ".dvc" / "config")
    profile = {"profile": "test", **params}
    (destination / "conf/profile/test.yaml").write_text("# @package _global_\n" + yaml.safe_dump(profile, sort_keys=False))
    config = destination / "conf/config.yaml"
    config.write_text(config.read_text().replace("  - profile: cpu\n", "  - profile: test\n"))
    recompose(destination)
    git(destination, "init", "-q")
    git(destination, "add", "-A")
    git(destination, "commit", "-qm", "init")
    return destination


def recompose(repo: Path, *overrides: str) -> None:
    """Write repo's params.yaml from its conf/ as `dvc exp run -S overrides...` would."""
    (repo / "params.yaml").write_text(compose(list(overrides), repo / "conf"))


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True)


def dvc(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the venv's dvc with the venv's python first on PATH; return the completed process."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "HF_HUB_OFFLINE": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    result = subprocess.run([os.path.join(bin_dir, "dvc"), *args], cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def deep_merge(base: dict, override: dict) -> dict:
    """Return base with override's keys replaced recursively."""
    merged = dict(base)
    for key, value in override.items():
        merged[key] = deep_merge(base[key], value) if isinstance(value, dict) else value
    return merged
