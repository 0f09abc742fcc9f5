"""The DAG's wiring: dvc.yaml's outs and deps against the artifact table and the code each stage imports."""
from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest
import yaml

from stages._common import compose
from stages.artifacts import OUTPUTS
from tests.conftest import REPO
from wsss_core.methods import REGISTRY

DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
# Modules that route data and report errors but compute no output: a change to them need not re-run stages.
PLUMBING = {
    "stages/_common.py": "params loading, one-line errors, dvclive folders",
    "stages/_run.py": "torchrun, shards and their merge, placeholder outputs",
    "stages/artifacts.py": "the path table (its paths are checked against dvc.yaml below)",
    "wsss_core/config.py": "param validation (param values are tracked by dvc.yaml's params)",
    "wsss_core/data/sources.py": "the data sources' params sections (validation, as config.py)",
    "wsss_core/sections.py": "the params sections' base class and number types",
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


@functools.cache
def imported_files(path: Path) -> frozenset[Path]:
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
    return frozenset(found)


def is_plumbing(path: Path) -> bool:
    """Return True for a PLUMBING module or a package __init__ holding nothing but a docstring."""
    relative = str(path.relative_to(REPO))
    if relative in PLUMBING:
        return True
    body = ast.parse(path.read_text()).body
    return path.name == "__init__.py" and all(isinstance(node, ast.Expr) for node in body)


METHODS_PACKAGE = REPO / "wsss_core/methods/__init__.py"


@functools.cache
def import_closure(path: Path, method: str | None = None) -> frozenset[Path]:
    """Return every non-plumbing file of ours that running `path` imports, directly or through others.

    Plumbing modules are neither listed nor followed: what they import serves routing and
    validation (e.g. the method registry, to validate params), not the stage's outputs. With a method
    name, the registry package counts as importing only `base.py` and that method's module: the other
    methods' modules only register themselves, and their code runs only when they are the method.
    """
    seen, todo = set(), [path]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        if is_plumbing(current):
            continue
        if current == METHODS_PACKAGE and method is not None:
            todo.extend([current.parent / "base.py", current.parent / f"{method}.py"])
            continue
        todo.extend(imported_files(current))
        for parent in current.relative_to(REPO).parents:  # importing a.b.c runs a/__init__ and a/b/__init__
            init = REPO / parent / "__init__.py"
            if parent != Path(".") and init.is_file():
                todo.append(init)
    return frozenset(file for file in seen if not is_plumbing(file))


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


@functools.cache
def method_code(method: str) -> dict[str, str]:
    """Return the `method_code` section params.yaml holds with `-S method=<method>`."""
    return yaml.safe_load(compose([f"method={method}"], REPO / "conf"))["method_code"]


def resolved_deps(stage: str, method: str) -> list[str]:
    """Return dvc.yaml's deps of stage with `${method_code.<slot>}` replaced as DVC does for the method."""
    code = method_code(method)
    return [re.sub(r"\$\{method_code\.(\w+)\}", lambda match: code[match.group(1)], dep)
            for dep in DVC_YAML[stage]["deps"]]


def covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


@pytest.mark.parametrize("stage", sorted(OUTPUTS))
@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_deps_cover_the_code_the_stage_runs(stage, method):
    """Each stage lists every file of ours it runs, for every method: the shared ones by name, the method's own
    through its `method_code` (tests/test_method_e2e.py runs the same check on the added `toy`)."""
    assert DVC_YAML[stage]["cmd"] == f"python -m stages.{stage}"
    needed = {str(path.relative_to(REPO)) for path in import_closure(REPO / "stages" / f"{stage}.py", method)}
    missing = sorted(path for path in needed if not covered(path, resolved_deps(stage, method)))
    assert not missing, f"{stage} with method {method} runs code dvc.yaml does not list as a dep: {missing}"


@pytest.mark.parametrize("stage", sorted(OUTPUTS))
def test_deps_list_no_code_the_stage_does_not_run(stage):
    """A code dep that no method's run of the stage imports would re-run it for nothing (editing the synthetic
    generator re-ran the random walk through a scoring import it did not use)."""
    unused = set.intersection(*(
        {dep for dep in resolved_deps(stage, method) if dep.startswith("wsss_core") and not any(
            covered(str(path.relative_to(REPO)), [dep])
            for path in import_closure(REPO / "stages" / f"{stage}.py", method))}
        for method in REGISTRY))
    assert not unused, f"{stage} lists code it does not run as deps: {sorted(unused)}"


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_method_code_names_only_the_methods_own_files(method):
    """A method's `method_code` files are ones its classifier's run imports (no other method's file)."""
    needed = {str(path.relative_to(REPO)) for path in import_closure(REPO / "stages/train_cls.py", method)}
    assert set(method_code(method).values()) <= needed


@pytest.mark.parametrize("stage", sorted(OUTPUTS))
def test_stage_inputs_are_other_stages_outputs(stage):
    """Every non-code dep is an artifact some earlier stage writes (prepare's raw data come from data.source)."""
    written = {str(path) for outputs in OUTPUTS.values() for path in outputs} | {"${data.source}"}
    data = [dep for dep in DVC_YAML[stage]["deps"] if not dep.startswith(("stages/", "wsss_core", "${method_code."))]
    assert set(data) <= written, set(data) - written


def test_no_stage_imports_another_stage():
    for path in (REPO / "stages").glob("*.py"):
        if path.name in ("cli.py", "__init__.py"):
            continue
        others = {file.stem for file in imported_files(path) if file.parent.name == "stages"}
        assert others <= {"_common", "_run", "artifacts"}, (path.name, others)


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
