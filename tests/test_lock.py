"""The lock (constraints.txt) against pyproject.toml: every package lorafit declares is pinned, to a version inside its
declared range, and each pin is exact, so README command 1 installs the same thing on every machine and every week."""

from __future__ import annotations

import re

import pytest
from conftest import REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
from packaging.requirements import Requirement  # noqa: E402
from packaging.utils import canonicalize_name  # noqa: E402
from packaging.version import Version  # noqa: E402


def pins(path) -> dict[str, Version]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;#]+)", line)
        assert m, f"{path.name}: {line!r} is not an exact pin (name==version)"
        name = canonicalize_name(m.group(1))
        assert name not in out, f"{path.name} pins {name} twice"
        out[name] = Version(m.group(2))
    return out


def declared() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra]
    return reqs


def test_every_declared_package_is_pinned_inside_its_range():
    lock = pins(REPO / "constraints.txt")
    for req in declared():
        name = canonicalize_name(req.name)
        assert name in lock, f"constraints.txt does not pin {req.name} (pyproject.toml asks for {req})"
        assert req.specifier.contains(lock[name], prereleases=True), (
            f"constraints.txt pins {req.name}=={lock[name]}, outside pyproject.toml's {req.specifier}")


def test_the_readme_and_ci_install_from_the_lock():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    command1 = next(line for line in readme.splitlines() if line.startswith("python3 -m venv .venv"))
    assert "-c constraints.txt" in command1
    assert command1 in ci  # CI runs README command 1 verbatim


def test_the_gpu_stack_record_is_exact_and_inside_the_ranges_it_must_meet():
    gpu = pins(REPO / "constraints-gpu.txt")
    for req in declared():
        name = canonicalize_name(req.name)
        if name in gpu:  # torch, transformers, peft, ... as on the box
            assert req.specifier.contains(gpu[name], prereleases=True), (
                f"the GPU box has {req.name}=={gpu[name]}, outside pyproject.toml's {req.specifier}")
