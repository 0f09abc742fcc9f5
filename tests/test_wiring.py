"""The DAG's wiring: dvc.yaml's outs and deps against the artifact table and the code each stage imports."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from stages.artifacts import OUTPUTS
from tests.conftest import REPO

DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
# Modules that route data and report errors but compute no output: a change to them need not re-run stages.
PLUMBING = {
    "stages/_common.py": "params loading, one-line errors, dvclive folders, placeholder outputs",
    "stages/artifacts.py": "the path table (its paths are checked against dvc.yaml below)",
    "wsss_core/config.py": "param validation (param values are tracked by dvc.yaml's params)",
    "wsss_core/errors.py": "error classes",
    "wsss_core/io.py": "atomic writes",
    "wsss_core/checkpoint.py": "checkpoint reading and writing",
    "wsss_core/pool.py": "the process pool (results in job order whatever the worker count)",
}


def module_file(name: str) -> Path | None:
    """Return the repo file of a module of ours (package __init__ for a package), or None for a third-party one."""
    if not name.startswith(("wsss_core", "stages")):
        return None
    path = REPO / Path(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imported_files(path: Path) -> set[Path]:
    """Return the files of our modules that `path` imports (from X import Y: Y's file when Y is a module; a
    package __init__ that imports its modules with pkgutil.iter_modules imports every one of them)."""
    found = set()
    if path.name == "__init__.py" and "pkgutil.iter_modules(__path__)" in path.read_text():
        found |= set(path.parent.glob("*.py")) - {path}
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            file = module_file(name)
            if file is not None and file.is_file():
                found.add(file)
    return found


def is_plumbing(path: Path) -> bool:
    """Return True for a PLUMBING module or a package __init__ holding nothing but a docstring."""
    relative = str(path.relative_to(REPO))
    if relative in PLUMBING:
        return True
    body = ast.parse(path.read_text()).body
    return path.name == "__init__.py" and all(isinstance(node, ast.Expr) for node in body)


def import_closure(path: Path) -> set[Path]:
    """Return every non-plumbing file of ours that running `path` imports, directly or through others.

    Plumbing modules are neither listed nor followed: what they import serves routing and
    validation (e.g. the method registry, to validate params), not the stage's outputs.
    """
    seen, todo = set(), [path]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        if is_plumbing(current):
            continue
        todo.extend(imported_files(current))
        for parent in current.relative_to(REPO).parents:  # importing a.b.c runs a/__init__ and a/b/__init__
            init = REPO / parent / "__init__.py"
            if parent != Path(".") and init.is_file():
                todo.append(init)
    return {file for file in seen if not is_plumbing(file)}


def declared_outputs(stage: dict) -> set[str]:
    """Return the paths of a dvc.yaml stage's outs, metrics and plots (dvclive files as their folder)."""
    paths = set()
    for kind in ("outs", "metrics", "plots"):
        for entry in stage.get(kind, []):
            path = next(iter(entry)) if isinstance(entry, dict) else entry
            paths.add(path.split("/metrics.json")[0].split("/plots/metrics")[0] if path.startswith("dvclive/") else path)
    return paths


def test_every_stage_of_the_table_is_in_dvc_yaml_and_back():
    assert set(DVC_YAML) == set(OUTPUTS)


@pytest.mark.parametrize("stage", sorted(OUTPUTS))
def test_dvc_yaml_declares_exactly_the_table_outputs(stage):
    assert declared_outputs(DVC_YAML[stage]) == {str(path) for path in OUTPUTS[stage]}


@pytest.mark.parametrize("stage", sorted(OUTPUTS))
def test_deps_cover_the_code_the_stage_runs(stage):
    deps = [dep for dep in DVC_YAML[stage]["deps"]]
    assert DVC_YAML[stage]["cmd"] == f"python -m stages.{stage}"
    needed = {str(path.relative_to(REPO)) for path in import_closure(REPO / "stages" / f"{stage}.py")}
    missing = sorted(path for path in needed if not any(
        path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps))
    assert not missing, f"{stage} runs code dvc.yaml does not list as a dep: {missing}"


@pytest.mark.parametrize("stage", sorted(OUTPUTS))
def test_deps_list_no_code_the_stage_does_not_run(stage):
    """A code dep outside the stage's import closure would re-run it for nothing (editing the synthetic generator
    re-ran the random walk through a scoring import it did not use)."""
    needed = {str(path.relative_to(REPO)) for path in import_closure(REPO / "stages" / f"{stage}.py")}
    unused = sorted(dep for dep in DVC_YAML[stage]["deps"] if dep.startswith("wsss_core")
                    and not any(path == dep or path.startswith(dep.rstrip("/") + "/") for path in needed))
    assert not unused, f"{stage} lists code it does not run as deps: {unused}"


@pytest.mark.parametrize("stage", sorted(OUTPUTS))
def test_stage_inputs_are_other_stages_outputs(stage):
    """Every non-code dep is an artifact some earlier stage writes (prepare's raw data come from data.source)."""
    written = {str(path) for outputs in OUTPUTS.values() for path in outputs} | {"${data.source}"}
    data = [dep for dep in DVC_YAML[stage]["deps"] if not dep.startswith(("stages/", "wsss_core"))]
    assert set(data) <= written, set(data) - written


def test_no_stage_imports_another_stage():
    for path in (REPO / "stages").glob("*.py"):
        if path.name in ("cli.py", "__init__.py"):
            continue
        others = {file.stem for file in imported_files(path) if file.parent.name == "stages"}
        assert others <= {"_common", "artifacts"}, (path.name, others)


def test_core_packages_below_methods_never_import_it():
    """cams/, affinity/, models/, data/ and seg/ take callables and arrays: methods compose them, not the reverse."""
    for package in ("cams", "affinity", "models", "data", "seg"):
        for path in (REPO / "wsss_core" / package).glob("*.py"):
            above = {str(file.relative_to(REPO)) for file in imported_files(path)
                     if file.parent.name == "methods" or file.parent.name == "stages"}
            assert not above, (str(path.relative_to(REPO)), above)


def documented_floors() -> dict[str, int]:
    """Return {package or module of wsss_core: floor} from docs/architecture.md's `floor N  a, b` lines."""
    floors = {}
    for line in (REPO / "docs/architecture.md").read_text().splitlines():
        words = line.split(maxsplit=2)
        if len(words) == 3 and words[0] == "floor" and words[1].isdigit():
            floors.update({name.strip(): int(words[1]) for name in words[2].split(",")})
    return floors


def test_every_core_import_goes_down_a_documented_floor():
    """Each import between wsss_core's packages and modules (function-level imports included) goes to a lower
    floor of docs/architecture.md's table: no import upwards, sideways or in a circle."""
    floors = documented_floors()
    core = REPO / "wsss_core"

    def unit(path: Path) -> str:
        parts = path.relative_to(core).parts
        return parts[0] if len(parts) > 1 else path.stem

    units = {unit(path) for path in core.rglob("*.py")} - {"__init__"}
    assert units <= set(floors), f"no documented floor for {sorted(units - set(floors))}"
    wrong = sorted(f"{path.relative_to(REPO)} imports {unit(file)}" for path in core.rglob("*.py")
                   for file in imported_files(path) if core in file.parents and unit(file) != unit(path)
                   and unit(path) != "__init__" and floors[unit(file)] >= floors[unit(path)])
    assert not wrong, wrong


def test_prepare_loads_no_network_and_no_crf():
    """`prepare` validates params (the method registry included) and reads data: importing it loads no network
    module, no timm and no pydensecrf (methods import their networks where they build them)."""
    import subprocess
    import sys

    script = "import sys, stages.prepare; print('\\n'.join(sorted(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.split()
    networks = [name for name in loaded if name.startswith("wsss_core.models.")
                and name not in ("wsss_core.models.catalog", "wsss_core.models.groups")]
    assert networks == [] and "timm" not in loaded and "pydensecrf" not in loaded, (networks, "timm" in loaded)
    assert "wsss_core.methods.agen" in loaded  # the registry is there: the test looks at the real import path


def test_no_core_file_knows_dvc():
    for path in (REPO / "wsss_core").rglob("*.py"):
        tree = ast.parse(path.read_text())
        modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not {m for m in modules if m.split(".")[0] in ("dvc", "dvclive", "yaml")}, path
