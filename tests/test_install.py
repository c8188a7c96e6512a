"""Honest installs (issue 20): every installed dependency satisfies what pyproject.toml declares, so a
declared minimum that is too low (an API from a later release) shows up as a version we could not have
tested against, and the pins mean what they say."""

from __future__ import annotations

import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _requirements() -> tuple[list[Requirement], list[Requirement]]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    deps = [Requirement(r) for r in project["dependencies"]]
    dev = [Requirement(r) for r in project["optional-dependencies"]["dev"]]
    return deps, dev


def test_installed_versions_satisfy_pyproject():
    deps, dev = _requirements()
    bad, missing = [], []
    for req, required in [*((r, True) for r in deps), *((r, False) for r in dev)]:
        try:
            got = Version(version(req.name))
        except PackageNotFoundError:
            if required:
                missing.append(req.name)
            continue
        if not req.specifier.contains(got, prereleases=True):
            bad.append(f"{req.name} {got} does not satisfy '{req.specifier}'")
    assert not missing, f"declared but not installed: {missing}"
    assert not bad, bad


@pytest.mark.parametrize(
    "name, minimum, why",
    [
        ("lightning", "2.6", "lightning.pytorch.callbacks.EMAWeightAveraging"),
        ("albumentations", "2.0.4", "albumentations.HEStain"),
    ],
)
def test_minimums_cover_the_apis_we_use(name, minimum, why):
    """The declared minimum is at least the release that introduced the API the code imports, and that API
    is really there in the installed release."""
    deps, _ = _requirements()
    (req,) = [r for r in deps if r.name == name]
    floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    assert floors and max(floors) >= Version(minimum), f"{name}{req.specifier} is below {minimum} ({why})"
    module, _, attr = why.rpartition(".")
    mod = pytest.importorskip(module)
    assert hasattr(mod, attr), why


def test_albumentations_stays_on_the_mit_line():
    """2.0.8 is the last MIT-licensed albumentations; 2.1+ (AlbumentationsX) is AGPL or commercial."""
    deps, _ = _requirements()
    (req,) = [r for r in deps if r.name == "albumentations"]
    assert not req.specifier.contains("2.1.0") and req.specifier.contains("2.0.8")
