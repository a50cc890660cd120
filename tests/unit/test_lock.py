"""The lock files (requirements/*.txt, from `make lock`) still match pyproject.toml: a dependency
added or re-ranged there without `make lock` fails here, not in the image build."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def locked(name: str) -> dict[str, str]:
    """Package -> pinned version, from requirements/NAME.txt."""
    pins: dict[str, str] = {}
    for line in (ROOT / "requirements" / f"{name}.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            [spec] = req.specifier
            assert spec.operator == "==", f"{line}: not pinned"
            pins[canonicalize_name(req.name)] = spec.version
    return pins


@pytest.mark.parametrize(
    ("lock", "requirements"),
    [
        ("runtime", PROJECT["dependencies"]),
        ("test", PROJECT["dependencies"] + PROJECT["optional-dependencies"]["test"]),
    ],
)
def test_every_declared_dependency_is_locked_within_its_range(lock: str, requirements: list[str]) -> None:
    pins = locked(lock)
    for line in requirements:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in requirements/{lock}.txt: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements/{lock}.txt has {req.name}=={pins[name]}, outside {req.specifier}: run `make lock`"
        )


def test_the_test_lock_carries_the_runtime_versions() -> None:
    runtime, test = locked("runtime"), locked("test")
    assert {name: test.get(name) for name in runtime} == runtime
