"""TensorRT optimization profiles: the min/opt/max shape of every dynamic graph input.

A profile is derived from the manifest's named dynamic axes and the family's declared ranges
(registry ``Family.profile_ranges``), and any input can be overridden whole::

    profiles = derive_profiles(manifest)       # {"unet": {"sample": {"min": [1,4,32,32], "opt": ..., "max": ...}}}
    profiles = derive_profiles(manifest, [parse_profile("unet:sample=1x4x64x64,2x4x64x64,2x4x96x96")])
    shapes_option(profiles["unet"], "min")     # "sample:1x4x32x32,timestep:1,..." (onnxruntime's TensorRT EP)

TensorRT builds an engine for the shapes a profile covers; a shape outside it is refused at run time,
and onnxruntime's TensorRT provider without profiles rebuilds its engine for every new shape.
"""

from __future__ import annotations

import ast
import operator
from dataclasses import dataclass

from modelkiln.errors import KilnError
from modelkiln.manifest import Manifest, TensorSpec
from modelkiln.registry import get_family

LEVELS = ("min", "opt", "max")
_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
}

Profile = dict[str, dict[str, list[int]]]  # input name -> {"min": shape, "opt": shape, "max": shape}


@dataclass(frozen=True)
class ProfileOverride:
    """One ``--profile COMPONENT:INPUT=MIN,OPT,MAX`` from the command line."""

    component: str  # graph name in the manifest
    input: str  # graph input name
    shapes: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # min, opt, max


def size(expression: int | str, runtime: dict, where: str) -> int:
    """An int, or an expression of ints, + - * // and keys of the manifest's runtime config."""
    if isinstance(expression, int):
        return expression

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and isinstance(runtime.get(node.id), int):
            return runtime[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        raise KilnError(
            f"{where}: profile size {expression!r} is not ints, + - * // and integer keys of the "
            f"manifest's runtime config ({', '.join(k for k, v in runtime.items() if isinstance(v, int))})."
        )

    return value(ast.parse(expression, mode="eval").body)


def _axis_range(family: str, ranges: dict, component: str, spec: TensorSpec, axis: str, runtime: dict):
    declared = ranges.get(f"{component}:{axis}", ranges.get(axis))
    if declared is None:
        raise KilnError(
            f"family {family} declares no profile range for axis {axis!r} of {component}:{spec.name}. "
            f"Pass --profile {component}:{spec.name}=MIN,OPT,MAX (shapes like 1x77)."
        )
    where = f"family {family}, axis {axis}"
    return [size(expression, runtime, where) for expression in declared]


def _derived(manifest: Manifest, component: str, spec: TensorSpec) -> dict[str, list[int]]:
    family = get_family(manifest.family)
    shapes = {level: [] for level in LEVELS}
    for dim in spec.shape:
        if isinstance(dim, int):
            sizes = [dim, dim, dim]
        else:
            sizes = _axis_range(family.name, family.profile_ranges, component, spec, dim, manifest.runtime)
        for level, value in zip(LEVELS, sizes, strict=True):
            shapes[level].append(value)
    return shapes


def _checked(override: ProfileOverride, spec: TensorSpec) -> dict[str, list[int]]:
    where = f"--profile {override.component}:{override.input}"
    for shape in override.shapes:
        fixed_ok = all(isinstance(d, str) or d == s for d, s in zip(spec.shape, shape, strict=False))
        if len(shape) != len(spec.shape) or not fixed_ok:
            raise KilnError(
                f"{where}: shape {'x'.join(map(str, shape))} does not fit the input's shape {spec.shape} "
                "(same rank, fixed sizes as they are)."
            )
    if not all(a <= b <= c for a, b, c in zip(*override.shapes, strict=True)):
        raise KilnError(f"{where}: every size must satisfy MIN <= OPT <= MAX.")
    return {level: list(shape) for level, shape in zip(LEVELS, override.shapes, strict=True)}


def derive_profiles(manifest: Manifest, overrides: list[ProfileOverride] = ()) -> dict[str, Profile]:
    """Component -> its dynamic inputs' min/opt/max shapes (inputs of fixed shape need no profile)."""
    given = {(o.component, o.input): o for o in overrides}
    for component, name in given:
        spec = manifest.components.get(component)
        if spec is None or name not in [tensor.name for tensor in spec.inputs]:
            raise KilnError(
                f"--profile {component}:{name}: no such input. Inputs: "
                + "; ".join(
                    f"{c}: {', '.join(t.name for t in s.inputs)}" for c, s in manifest.components.items()
                )
            )
    profiles = {}
    for component, spec in manifest.components.items():
        dynamic = [tensor for tensor in spec.inputs if any(isinstance(d, str) for d in tensor.shape)]
        profiles[component] = {
            tensor.name: _checked(given[(component, tensor.name)], tensor)
            if (component, tensor.name) in given
            else _derived(manifest, component, tensor)
            for tensor in dynamic
        }
    return profiles


def parse_profile(text: str) -> ProfileOverride:
    """``"unet:sample=1x4x32x32,2x4x64x64,8x4x96x96"`` -> a ProfileOverride (MIN,OPT,MAX shapes)."""
    target, sep, shapes = text.partition("=")
    component, colon, name = target.partition(":")
    parts = shapes.split(",")
    try:
        parsed = tuple(tuple(int(d) for d in part.split("x")) for part in parts)
    except ValueError:
        parsed = ()
    if not (sep and colon and component and name and len(parsed) == 3):
        raise KilnError(
            f"--profile {text!r}: expected COMPONENT:INPUT=MIN,OPT,MAX with shapes like 1x4x64x64, e.g. "
            "unet:sample=1x4x32x32,2x4x64x64,8x4x96x96."
        )
    return ProfileOverride(component, name, parsed)


def shapes_option(profile: Profile, level: str) -> str:
    """One level of a component's profile as onnxruntime's TensorRT EP takes it: ``a:1x3,b:2x4``."""
    return ",".join(f"{name}:{'x'.join(map(str, shapes[level]))}" for name, shapes in profile.items())
