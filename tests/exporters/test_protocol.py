"""Every registered family's exporter module satisfies the declared exporter protocol, signatures included."""

from __future__ import annotations

import inspect

import pytest

from modelkiln.exporters.protocol import EXPORTER_PROTOCOLS, FamilyExporter
from modelkiln.registry import FAMILIES

VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def _members(protocol: type) -> list[str]:
    """The protocol's functions, inherited ones included (dunders are typing's machinery)."""
    return [name for name in dir(protocol) if not name.startswith("_")]


def _shape(parameter: inspect.Parameter) -> tuple:
    """What a caller relies on: required arguments by position (a module may name them, e.g. models for
    a pipeline), optional ones by name (trust_remote_code=...)."""
    required = parameter.default is parameter.empty
    return parameter.kind, required, None if required else parameter.name


def _mismatch(expected: inspect.Signature, found: inspect.Signature) -> str | None:
    """Why ``found`` cannot be called as ``expected`` is (None when it can)."""
    wanted = list(expected.parameters.values())[1:]  # without the protocol's self
    have = list(found.parameters.values())
    named = [p for p in wanted if p.kind not in VARIADIC]
    if [_shape(p) for p in named] != [_shape(p) for p in have[: len(named)]]:
        return f"takes {found}, the protocol {expected}"
    extra = have[len(named) :]
    takes_any = {p.kind for p in wanted if p.kind in VARIADIC}
    for parameter in extra:
        # Beyond the protocol's parameters: what its **options / **generation allow, with a default.
        if parameter.kind not in takes_any and parameter.default is parameter.empty:
            return f"takes {found}: {parameter.name} is not in the protocol {expected}"
    return None


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_exporter_module_satisfies_its_protocol(name):
    family = FAMILIES[name]
    exporter = family.load_exporter()
    protocol = EXPORTER_PROTOCOLS[family.task]
    assert isinstance(exporter, protocol), f"{family.exporter} lacks a member of {protocol.__name__}"
    for member in _members(protocol):
        expected = inspect.signature(getattr(protocol, member))
        problem = _mismatch(expected, inspect.signature(getattr(exporter, member)))
        assert problem is None, f"{family.exporter}.{member} {problem}"


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_load_model_takes_exactly_the_declared_export_options(name):
    family = FAMILIES[name]
    parameters = inspect.signature(family.load_exporter().load_model).parameters
    options = tuple(parameters)[2:]  # after source and trust_remote_code
    assert options == family.export_options, (
        f"{family.exporter}.load_model takes {options}; the registry declares {family.export_options}"
    )


def test_the_signature_check_catches_a_wrong_module():
    def load_model(path, remote=False): ...

    expected = inspect.signature(FamilyExporter.load_model)
    assert _mismatch(expected, inspect.signature(load_model)) is not None
