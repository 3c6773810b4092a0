"""Installed as released (`pip install .`, no extras), every command works: the packages only the
extras bring (test, demo, bench) are made unimportable in a fresh process tree, Ray's workers
included, which then runs `segpipe --help`, segments the real scene, trains a network on it and
evaluates."""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# In every Python 3.11 virtual environment, whatever the project asks for.
VENV_PACKAGES = {"pip", "setuptools", "wheel"}


def runtime_distributions() -> set[str]:
    """segpipe (no extras) and everything its dependencies pull in, transitively, with the extras
    they ask of each other (ray[train])."""
    found, seen, todo = {"segpipe"}, set(), [("segpipe", "")]
    while todo:
        name, extra = todo.pop()
        try:
            requirements = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue  # a dependency for another platform
        for text in requirements:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
                continue
            dependency = canonicalize_name(requirement.name)
            found.add(dependency)
            for wanted in ("", *requirement.extras):
                if (dependency, wanted) not in seen:
                    seen.add((dependency, wanted))
                    todo.append((dependency, wanted))
    return found


def extras_only_modules() -> set[str]:
    """Top-level modules installed here that no runtime distribution provides."""
    runtime = runtime_distributions() | VENV_PACKAGES
    return {module for module, distributions in metadata.packages_distributions().items()
            if not module.startswith("_") and not {canonicalize_name(d) for d in distributions} & runtime}


SITECUSTOMIZE = '''
import sys

BLOCKED = {blocked!r}


class NotInstalled:
    """As if the extras were never installed: importing one of their modules finds nothing."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: not a runtime dependency)", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())

import importlib.util

_find_spec = importlib.util.find_spec


def find_spec(name, package=None):
    """Asked whether a blocked package is there (torch asks so of onnx), the answer of a machine
    without it: None, not an error."""
    if name.partition(".")[0] in BLOCKED:
        return None
    return _find_spec(name, package)


importlib.util.find_spec = find_spec
'''

SCRIPT = '''
import importlib, sys

import ray

from flows.cli import main

for name in {probes!r}:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        pass
    else:
        sys.exit(f"{{name}} imported: the block does not work")

try:
    main(["--help"])
except SystemExit as exc:
    assert exc.code == 0, exc.code
try:
    main(["bench", "--help"])
except SystemExit as exc:
    assert exc.code == 0, exc.code
code = main(["segment", sys.argv[1], "--model", "s2-cloud", "--out", sys.argv[2], "--workers", "1"])
assert code == 0, code
code = main(["train", "--images", sys.argv[1], "--labels", sys.argv[3], "--architecture", "unet_padded",
             "--architecture-options", "base_features=4,depth=2", "--bands", "3,2,1", "--tile", "64", "--batch", "2",
             "--epochs", "1", "--steps-per-epoch", "2", "--validation-tiles", "2", "--out", sys.argv[4]])
assert code == 0, code
code = main(["evaluate", sys.argv[2] + "/sentinel2_scene/labels.tif", "--reference", sys.argv[3]])
assert code == 0, code


@ray.remote(num_cpus=0)
def worker_imports(names):
    found = []
    for name in names:
        try:
            importlib.import_module(name)
            found.append(name)
        except ModuleNotFoundError:
            pass
    return found


assert ray.get(worker_imports.remote({probes!r})) == [], "a Ray worker imported a blocked module"
print("all commands worked without the extras")
'''


def test_extras_are_not_needed_to_segment(sentinel_scene, tmp_path):
    blocked = extras_only_modules()
    probes = sorted({"pytest", "monai", "stardist", "xrspatial", "geopandas", "moto"} & blocked)
    assert len(probes) == 6, f"these test-only packages should be blocked but are runtime: {probes}"
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(blocked=sorted(blocked)))
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "PYTHONPATH")}
    env.update(PYTHONPATH=str(site), RAY_USAGE_STATS_ENABLED="0", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    out = tmp_path / "out"
    # Labels for the training command: the scene's brightest tenth, on its grid.
    with rasterio.open(sentinel_scene) as scene:
        red = scene.read(3)
        profile = {**scene.profile, "count": 1, "dtype": "uint8", "nodata": None}
    labels = tmp_path / "bright.tif"
    with rasterio.open(labels, "w", **profile) as dst:
        dst.write((red > np.percentile(red, 90)).astype(np.uint8), 1)
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(probes=probes), str(sentinel_scene), str(out),
                           str(labels), str(tmp_path / "model")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert "all commands worked without the extras" in done.stdout
    assert (out / "sentinel2_scene" / "labels.tif").is_file()
    assert (out / "sentinel2_scene" / "preview.png").is_file()
    assert (tmp_path / "model" / "card.yaml").is_file() and (tmp_path / "model" / "metrics.png").is_file()


@pytest.mark.parametrize("module", ["flows.cli", "flows.archive_flow", "flows.deploy", "segworkers.actors"])
def test_no_product_module_loads_the_benchmarks(module, tmp_path):
    """Only `segpipe bench` loads flows.benchmarks."""
    script = (f"import sys, {module}\n"
              "loaded = sorted(m for m in sys.modules if m.startswith('flows.benchmarks'))\n"
              "assert not loaded, loaded\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_model_zoo_has_no_import_cycle():
    """The families import `register` from the registry, a leaf; only the package's __init__
    imports the families."""
    models = Path(__file__).resolve().parents[1] / "segworkers" / "models"
    for path in models.glob("*.py"):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert "segworkers.models" not in imported, f"{path.name} imports its own package"
        assert not any(node.module == "segworkers" for node in ast.walk(tree)
                       if isinstance(node, ast.ImportFrom)), f"{path.name} imports from segworkers"
    registry = ast.parse((models / "registry.py").read_text())
    assert not [node for node in ast.walk(registry) if isinstance(node, ast.ImportFrom)
                and (node.module or "").startswith("segworkers")], "the registry must be a leaf"
