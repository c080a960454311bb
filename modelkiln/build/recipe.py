"""The recipe of `kiln build`: one frozen dataclass per TOML section, read and checked before any work.

    recipe = load_recipe("recipes/vit-gpt2.toml")       # RecipeError (exit 2) naming a wrong key

Every key of every section is a field below; a wrong key, type or value is a RecipeError naming it and
the valid ones. Relative paths resolve against the recipe's folder.
"""

from __future__ import annotations

import json
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from modelkiln.errors import KilnError
from modelkiln.exporters.diffusion import Lora
from modelkiln.exporters.targets import get_target
from modelkiln.quantize.schemes import get_scheme, resolve_options
from modelkiln.registry import get_family

RECIPES_DIR = Path(__file__).parent.parent / "recipes"  # example recipes shipped with modelkiln
EXPORT_NAME = "fp32"  # folder of the export under artifacts/; no variant may take this name
VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a folder name on every platform


class RecipeError(KilnError):
    """The recipe is missing, not TOML, or has a wrong key or value; the message names it."""


# --- The recipe ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceRecipe:
    """[source]: the model to build."""

    model: str  # hub id, or a save_pretrained folder (a relative path resolves against the recipe file)
    family: str | None = None  # force a registry family; left out, it is detected from config.json
    allow_pickle: bool = False  # load .bin/.pt checkpoints (unpickling runs their code)
    trust_remote_code: bool = False  # run model code shipped with the checkpoint


@dataclass(frozen=True)
class ExportRecipe:
    """[export]: how the fp32 ONNX artifact is written."""

    opset: int = 18  # ONNX opset; 18 runs on onnxruntime >= 1.14 and TensorRT 10
    external_data: bool | None = None  # weights beside each graph; left out, decided by size (> 2 GB)
    lora: tuple[str, ...] = ()  # diffusion: "PATH[:SCALE]" LoRAs fused before export (relative to the recipe)
    max_sequence_length: int | None = None  # diffusion: T5 prompt length; left out, the family default
    without: tuple[str, ...] = ()  # diffusion: optional components left out (SD3: text_encoder_3)
    fuse_attention: bool = (
        True  # onnxruntime's MultiHeadAttention in the graphs that declare it; false: standard ops only
    )
    target: str = (
        "onnxruntime"  # what the graphs are for: onnxruntime, portable or tensorrt (`kiln export --target`)
    )


@dataclass(frozen=True)
class ValidateRecipe:
    """[validate]: the export against its PyTorch source; a failure fails the build."""

    enabled: bool = True  # false skips validation (the build can then only fail on quality gates)
    atol: float = 1e-4  # absolute tolerance per component output
    rtol: float = 1e-4  # relative part, times the largest reference magnitude
    beams: tuple[int, ...] = (1, 4)  # decoding modes compared token by token; 1 is greedy
    prompts: tuple[str, ...] = ()  # text prefixes compared besides unconditional captioning
    images: str | None = None  # folder of validation images (relative to the recipe); left out: drawn ones
    num_images: int = 8  # drawn images when no folder is given
    max_new_tokens: int = 16  # caption length compared end to end
    steps: int = 4  # diffusion: denoising steps per validation image
    height: int | None = None  # diffusion: validation image height; left out, the model's default
    width: int | None = None  # diffusion: validation image width; left out, the model's default
    min_psnr: float = 40.0  # diffusion: image PSNR vs diffusers below which validation fails


@dataclass(frozen=True)
class VariantRecipe:
    """[[variants]]: one quantized variant of the export, with its quality gates."""

    name: str  # folder under artifacts/ and the variant's label in reports
    scheme: str  # key of modelkiln.quantize.schemes.SCHEMES (see `kiln quantize --help`)
    options: dict[str, Any] = field(default_factory=dict)  # scheme options, e.g. {block_size = 64}
    components: tuple[str, ...] | None = None  # graphs to quantize; left out, the family's recipe
    exclude: tuple[str, ...] = ()  # fnmatch patterns of node names or module paths kept in fp32
    calibration_images: str | None = None  # folder for calibrated schemes (relative to the recipe)
    num_calibration: int = 8  # calibration images for calibrated schemes
    num_images: int = 16  # held-out drawn images the quality against the export is measured on
    num_prompts: int = 4  # diffusion: held-out prompts the image quality is measured on
    quality_steps: int = 4  # diffusion: denoising steps per quality image
    image_size: int | None = None  # diffusion: side of the quality images; left out, the model's default
    calibration_prompts: str | None = (
        None  # diffusion: prompt file for calibrated schemes (relative to the recipe)
    )
    calibration_steps: int = 8  # diffusion: denoising steps per calibration prompt
    # Shipped shapes text-to-image model: shapes prompts the prompt accuracy is measured on (None: all
    # 138); gate it with gates = { min_prompt_accuracy = 0.8 } (or min_prompt_accuracy_colour, ...).
    prompt_accuracy_prompts: int | None = None
    gates: dict[str, float] = field(default_factory=dict)  # min_<figure> / max_<figure> = limit


@dataclass(frozen=True)
class BenchRecipe:
    """[bench]: latency, memory, size and quality of the export and the variants vs PyTorch eager."""

    enabled: bool = False  # true runs `kiln bench` over every artifact that passed its gates
    threads: int = 2  # intra-op threads for every variant
    repeats: int = 5  # timed passes over the images
    warmup: int = 1  # untimed passes first
    images: int = 4  # drawn images per pass
    max_new_tokens: int = 16  # tokens every variant decodes
    measure_rss: bool = True  # peak memory per variant in a fresh subprocess
    plots: bool = True  # PNG plots when matplotlib is installed


@dataclass(frozen=True)
class Recipe:
    """A parsed, checked recipe with its paths resolved."""

    path: Path  # the recipe file (absolute); relative paths in it resolve against its folder
    source: SourceRecipe  # [source]
    export: ExportRecipe  # [export]
    validate: ValidateRecipe  # [validate]
    variants: tuple[VariantRecipe, ...]  # [[variants]], in build order
    bench: BenchRecipe  # [bench]


def is_figure(value: Any) -> bool:
    """A quality figure a gate can test: a number (a bool is an int in Python, but not a figure)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Top-level tables: name -> (section class, whether it is an array of tables).
SECTIONS: dict[str, tuple[type, bool]] = {
    "source": (SourceRecipe, False),
    "export": (ExportRecipe, False),
    "validate": (ValidateRecipe, False),
    "variants": (VariantRecipe, True),
    "bench": (BenchRecipe, False),
}
# Lowest sensible value of numeric keys, whichever section holds them (lists: every item).
MINIMUMS: dict[str, float] = {
    "opset": 7,
    "atol": 0,
    "rtol": 0,
    "beams": 1,
    "num_images": 1,
    "max_new_tokens": 1,
    "num_calibration": 1,
    "threads": 1,
    "repeats": 1,
    "warmup": 0,
    "images": 1,
}
# What a TOML value must be, for error messages.
TYPE_NAMES: dict[type, str] = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def find_recipe(given: str | os.PathLike) -> Path:
    """A recipe file path, or the name of a shipped recipe (``shapes-captioner``)."""
    path = Path(given)
    if path.is_file():
        return path.absolute()
    shipped = RECIPES_DIR / f"{given}.toml"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.toml")))
    raise RecipeError(f"recipe {given} does not exist. Pass a .toml file, or a shipped recipe: {names}.")


def load_recipe(given: str | os.PathLike) -> Recipe:
    """Read, check and resolve a recipe; RecipeError names the wrong key and the valid ones."""
    try:
        import tomllib
    except ImportError:  # modelkiln itself runs on 3.10; the TOML reader came with 3.11
        raise KilnError("kiln build reads recipes with tomllib: run it on Python 3.11 or newer.") from None
    path = find_recipe(given)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path} is not valid TOML ({exc}). Fix the syntax at that line.") from None
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise RecipeError(f"{path}: unknown top-level key {unknown[0]!r}. Valid keys: {', '.join(SECTIONS)}.")
    if "source" not in data:
        raise RecipeError(f"{path} has no source section. Add one with model = HUB_ID or a folder.")
    sections = {name: _parse_section(name, data.get(name), path) for name in SECTIONS}
    recipe = Recipe(path=path, **sections)
    _check_recipe(recipe)
    return _resolve_paths(recipe)


# Messages name places as "section export" or "variants entry #2", never in TOML's brackets, which
# the terminal's markup would swallow.
def _parse_section(name: str, value: Any, path: Path) -> Any:
    cls, is_array = SECTIONS[name]
    if not is_array:
        return _parse_table(cls, {} if value is None else value, f"section {name}", path)
    if value is None:
        return ()
    if not isinstance(value, list):
        raise RecipeError(f"{path}: {name} must be an array of tables, one per entry. Got {_toml(value)}.")
    return tuple(_parse_table(cls, table, f"{name} entry #{i + 1}", path) for i, table in enumerate(value))


def _parse_table(cls: type, table: Any, where: str, path: Path) -> Any:
    """One section as its frozen dataclass; unknown, missing or mistyped keys are errors."""
    if not isinstance(table, dict):
        raise RecipeError(f"{path}: {where} must be a table, got {_toml(table)}.")
    valid = ", ".join(f.name for f in fields(cls))
    unknown = sorted(set(table) - {f.name for f in fields(cls)})
    if unknown:
        raise RecipeError(f"{path}: unknown key {unknown[0]!r} in {where}. Valid keys: {valid}.")
    missing = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    missing = [name for name in missing if name not in table]
    if missing:
        raise RecipeError(f"{path}: {where} needs the key {missing[0]!r}. Valid keys: {valid}.")
    hints = typing.get_type_hints(cls)
    return cls(
        **{key: _conform(value, hints[key], key, f"{key} in {where}", path) for key, value in table.items()}
    )


def _toml(value: Any) -> str:
    """A value as the recipe spells it (true, "64", [1, 4]), for messages."""
    return json.dumps(value, default=str)


def _conform(value: Any, hint: Any, key: str, where: str, path: Path) -> Any:
    """The TOML value as the field's type (arrays become tuples), checked against MINIMUMS."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):  # X | None: TOML has no null, so a value is an X
        return _conform(value, next(a for a in args if a is not type(None)), key, where, path)
    if origin is tuple:
        if not isinstance(value, list):
            raise RecipeError(
                f"{path}: {where} must be an array, e.g. [{_example(args[0])}], got {_toml(value)}."
            )
        return tuple(_conform(item, args[0], key, where, path) for item in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{path}: {where} must be a table, e.g. {{ key = value }}, got {_toml(value)}.")
        return {k: _conform(item, args[1], k, f"{k} of {where}", path) for k, item in value.items()}
    if hint is Any:
        return value
    # bool is an int in Python; `repeats = true` is a mistake, not 1.
    if type(value) is not hint and not (hint is float and type(value) is int):
        raise RecipeError(f"{path}: {where} must be {TYPE_NAMES[hint]}, got {_toml(value)}.")
    if key in MINIMUMS and value < MINIMUMS[key]:
        raise RecipeError(f"{path}: {where} must be at least {MINIMUMS[key]}, got {_toml(value)}.")
    return float(value) if hint is float else value


def _example(hint: type) -> str:
    return {int: "1, 4", str: '"a", "b"'}.get(hint, "...")


def _check_recipe(recipe: Recipe) -> None:
    """Checks across keys, made before any work: family, target, variant names, schemes, options, gates."""
    if recipe.source.family is not None:
        _reword(lambda: get_family(recipe.source.family), recipe.path, "family in section source")
    _reword(lambda: get_target(recipe.export.target), recipe.path, "target in section export")
    names = [variant.name for variant in recipe.variants]
    for index, variant in enumerate(recipe.variants):
        where = f"variants entry #{index + 1} ({variant.name})"
        if not VARIANT_NAME.match(variant.name) or variant.name == EXPORT_NAME:
            raise RecipeError(
                f"{recipe.path}: {where}: a name is letters, digits, '.', '_' or '-', and not "
                f"{EXPORT_NAME!r} (the export's folder). Rename it."
            )
        if names.count(variant.name) > 1:
            raise RecipeError(
                f"{recipe.path}: two variants are named {variant.name!r}. Give each its own name."
            )
        _reword(lambda v=variant: _check_options(v), recipe.path, where)
        _check_gates(variant, recipe.path, where)


def _reword(check: Callable[[], Any], path: Path, where: str) -> None:
    """Run a library check and say where in the recipe its complaint comes from."""
    try:
        check()
    except KilnError as exc:
        raise RecipeError(f"{path}: {where}: {exc}") from None


def _check_options(variant: VariantRecipe) -> None:
    scheme = get_scheme(variant.scheme)
    for key, value in variant.options.items():
        default = scheme.options.get(key)
        numeric = isinstance(default, float) and type(value) is int
        if key in scheme.options and type(value) is not type(default) and not numeric:
            raise KilnError(
                f"option {key} takes {TYPE_NAMES.get(type(default), 'a value')}, got {_toml(value)}."
            )
    resolve_options(scheme, variant.options)  # unknown options and out-of-range values


def _check_gates(variant: VariantRecipe, path: Path, where: str) -> None:
    for gate in variant.gates:
        bound, _, figure = gate.partition("_")
        if bound not in ("min", "max") or not figure:
            raise RecipeError(
                f"{path}: {where}: gate {gate!r} is neither min_<figure> nor max_<figure>. Write e.g. "
                "gates = { min_agreement = 0.95, max_empty_captions = 0 }."
            )


def _resolve_paths(recipe: Recipe) -> Recipe:
    """Relative paths in the recipe resolve against its folder, wherever kiln runs from."""
    base = recipe.path.parent
    images = _resolve_path(recipe.validate.images, base, "images in section validate", "folder")
    variants = tuple(
        replace(
            v,
            calibration_images=_resolve_path(v.calibration_images, base, f"variant {v.name}", "folder"),
            calibration_prompts=_resolve_path(v.calibration_prompts, base, f"variant {v.name}", "file"),
        )
        for v in recipe.variants
    )
    loras = tuple(_resolve_lora(text, base) for text in recipe.export.lora)
    return replace(
        recipe,
        source=replace(recipe.source, model=_resolve_model(recipe.source.model, base)),
        export=replace(recipe.export, lora=loras),
        validate=replace(recipe.validate, images=images),
        variants=variants,
    )


def _resolve_model(model: str, base: Path) -> str:
    local = base / Path(model).expanduser()
    # A hub id (org/name) stays as it is unless a folder of that name sits beside the recipe.
    if model.startswith((".", "/", "~")) or local.exists():
        return str(local.resolve())
    return model


def _resolve_lora(text: str, base: Path) -> str:
    lora = Lora.parse(text)
    return f"{(base / lora.path.expanduser()).resolve()}:{lora.scale}"


# What a path key must name: how to check it, and the message when it does not.
PATH_KINDS: dict[str, tuple[Callable[[Path], bool], str]] = {
    "file": (Path.is_file, "{where}: {given} is not a file (paths resolve against the recipe's folder)."),
    "folder": (
        Path.is_dir,
        "{where}: {resolved} is not a folder. Fix the path (relative to the recipe file).",
    ),
}


def _resolve_path(given: str | None, base: Path, where: str, kind: str) -> str | None:
    """``given`` resolved against the recipe's folder, checked to be a ``kind``; None stays None."""
    if given is None:
        return None
    resolved = (base / Path(given).expanduser()).resolve()
    check, message = PATH_KINDS[kind]
    if not check(resolved):
        raise RecipeError(message.format(where=where, given=given, resolved=resolved))
    return str(resolved)
