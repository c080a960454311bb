"""The README's two set-up commands, .ci/run and the pinned constraints agree with each other.

CI runs .ci/run on a fresh machine; a user runs the README. Both install through constraints.txt, so
a dependency's new release cannot change what either gets without a commit that re-pins and re-tests.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
INSTALL = 'pip install -c constraints.txt -e ".[test]"'


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, sep, version = line.strip().partition("==")
        if sep:
            pins[canonicalize_name(name)] = version
    return pins


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", setup, flags=re.S)


def test_readme_has_exactly_two_setup_commands_through_the_constraints():
    demo, tests = _readme_commands()
    assert "-c constraints.txt" in demo and "kiln demo" in demo
    assert INSTALL in tests and tests.endswith("python -m pytest -q")
    for command in (demo, tests):
        assert command.startswith("python3 -m venv .venv && . .venv/bin/activate && ")


def test_ci_runs_the_readme_test_command_in_a_fresh_venv():
    script = (ROOT / ".ci" / "run").read_text()
    assert "rm -rf .venv" in script and "python3 -m venv .venv" in script
    assert INSTALL.replace("pip install", "pip install -q") in script
    assert script.rstrip().endswith("python -m pytest -q")


def test_every_declared_dependency_is_pinned_inside_its_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"]]
    for extra in ("export", "bnb", "bench", "test"):
        declared += project["optional-dependencies"][extra]
    pins = _pins()
    for text in declared:
        requirement = Requirement(text)
        if requirement.name == "modelkiln":
            continue
        pinned = pins.get(canonicalize_name(requirement.name))
        assert pinned is not None, f"{requirement.name} is declared but not pinned in constraints.txt"
        assert requirement.specifier.contains(pinned, prereleases=True), f"{requirement.name}=={pinned}"


def _installed_closure(root: str, extras: set[str]) -> dict[str, str]:
    """Installed distributions that ``root[extras]`` needs, transitively: name -> version."""
    found, seen, todo = {}, set(), [(root, frozenset(extras))]
    while todo:
        name, wanted = todo.pop()
        if (canonicalize_name(name), wanted) in seen:
            continue
        seen.add((canonicalize_name(name), wanted))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional dependency for another platform or Python
        found[canonicalize_name(name)] = dist.version
        environments = [{"extra": extra} for extra in wanted or {""}]
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or any(requirement.marker.evaluate(e) for e in environments):
                todo.append((requirement.name, frozenset(requirement.extras)))
    return found


def test_this_environment_is_the_pinned_one():
    # Everything modelkiln[test] pulls in, transitively, is pinned, at the version installed: the lock
    # is complete, and this run tests what the README's commands install.
    pins = _pins()
    for name, version in _installed_closure("modelkiln", {"test"}).items():
        if name == "modelkiln":
            continue
        assert name in pins, f"{name} {version} is installed but not pinned in constraints.txt"
        assert version.split("+")[0] == pins[name], f"{name}: {version} installed, {pins[name]} pinned"
