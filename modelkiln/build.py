"""`kiln build RECIPE.toml`: one declarative recipe in; artifacts, their reports and a summary out.

A recipe names the source model, the export options, how strictly to validate against PyTorch, the
quantized variants with their quality gates, and whether to benchmark. ``run_build`` runs the steps::

    recipe = load_recipe("recipes/vit-gpt2.toml")       # RecipeError (exit 2) naming a wrong key
    summary = run_build(recipe, Path("build/vit-gpt2"))
    summary["passed"]                                   # False: validation or a quality gate failed

The build directory holds ``artifacts/fp32`` (the export) and ``artifacts/<variant>``, ``reports/``
(validation, one quality report per variant, the benchmark), ``summary.json``, ``summary.md`` and
``.kiln/steps`` (the step cache). Each step is keyed by a hash of its inputs (its settings, the parent
artifact's hash, the source files' hash, the tool versions): an unchanged step logs "cached" and
touches nothing. Artifacts hold no timestamps or build-directory paths, so two clean builds of one
recipe are byte-identical; benchmark timings are measurements and naturally differ.

The steps call the generic export, validate, quantize and bench APIs only; nothing here depends on
the model family.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from modelkiln.errors import KilnError, ValidationFailedError
from modelkiln.manifest import artifact_hash, read_manifest, require_intact, sha256_file

RECIPES_DIR = Path(__file__).parent / "recipes"  # example recipes shipped with modelkiln
CACHE_VERSION = 1  # bump when a step's meaning changes, so older cache records stop matching
EXPORT_NAME = "fp32"  # folder of the export under artifacts/; no variant may take this name
STEPS_DIR = Path(".kiln") / "steps"  # one JSON record per step: its key and its result
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
    """Checks across keys, made before any work: family, variant names, schemes, options, gates."""
    from modelkiln.registry import get_family

    if recipe.source.family is not None:
        _reword(lambda: get_family(recipe.source.family), recipe.path, "family in section source")
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
    from modelkiln.quantize.schemes import get_scheme, resolve_options

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
    images = _resolve_folder(recipe.validate.images, base, "images in section validate")
    variants = tuple(
        replace(
            v,
            calibration_images=_resolve_folder(v.calibration_images, base, f"variant {v.name}"),
            calibration_prompts=_resolve_file(v.calibration_prompts, base, f"variant {v.name}"),
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
    from modelkiln.exporters.diffusion import Lora

    lora = Lora.parse(text)
    return f"{(base / lora.path.expanduser()).resolve()}:{lora.scale}"


def _resolve_file(file: str | None, base: Path, where: str) -> str | None:
    if file is None:
        return None
    resolved = (base / Path(file).expanduser()).resolve()
    if not resolved.is_file():
        raise RecipeError(f"{where}: {file} is not a file (paths resolve against the recipe's folder).")
    return str(resolved)


def _resolve_folder(folder: str | None, base: Path, where: str) -> str | None:
    if folder is None:
        return None
    resolved = (base / Path(folder).expanduser()).resolve()
    if not resolved.is_dir():
        raise RecipeError(f"{where}: {resolved} is not a folder. Fix the path (relative to the recipe file).")
    return str(resolved)


# --- The build ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Build:
    """One run of a recipe: where it writes and what every step key shares."""

    recipe: Recipe  # what to build
    out: Path  # build directory (absolute)
    source_sha256: str  # hash of the source's weight and side files (config, tokenizer, processor)
    weights_sha256: str  # the source weights' hash, as manifests record it
    tools: dict[str, str]  # library versions; a new version re-runs every step
    log: Callable[[str], None]  # progress lines
    statuses: dict[str, str] = field(default_factory=dict)  # step id -> "built" or "cached", in run order

    @property
    def export_dir(self) -> Path:
        return self.out / "artifacts" / EXPORT_NAME


def default_out(recipe: Recipe) -> Path:
    """Where `kiln build` writes without --out: build/<recipe name> in the current folder."""
    return Path("build") / recipe.path.stem


def _claim(out: Path) -> None:
    """Refuse to write into a folder that is neither empty nor an earlier build (its files would be pruned)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / STEPS_DIR).is_dir())):
        raise KilnError(
            f"{out} exists and is not a kiln build directory. Choose another --out (kiln build owns it "
            "and removes outputs the recipe no longer has)."
        )
    (out / STEPS_DIR).mkdir(parents=True, exist_ok=True)


def _fingerprint(source) -> str:
    """sha256 over the source's weight and side files: a changed tokenizer re-exports too."""
    from modelkiln.exporters.source import SIDE_FILES

    side = sorted({p.relative_to(source.path).as_posix() for g in SIDE_FILES for p in source.path.rglob(g)})
    digest = hashlib.sha256(source.weights_sha256.encode())
    for name in side:
        digest.update(f"{name}\0{sha256_file(source.path / name)}\n".encode())
    return digest.hexdigest()


def _start(recipe: Recipe, out: Path, log: Callable[[str], None]) -> Build:
    from modelkiln.exporters.export import tool_versions
    from modelkiln.exporters.source import resolve_source

    log(f"hashing the source {recipe.source.model}")
    source = resolve_source(recipe.source.model, allow_pickle=recipe.source.allow_pickle)
    out = out.absolute()
    _claim(out)  # after the source resolved, so a mistyped hub id leaves no empty build folder
    weights = source.weights_sha256
    build = Build(recipe, out, _fingerprint(source), weights, tool_versions(), log)
    _prune(build)
    return build


def _expected(build: Build) -> set[str]:
    """Every top-level entry of artifacts/, reports/ and .kiln/steps this recipe produces."""
    recipe = build.recipe
    names = [EXPORT_NAME, *(v.name for v in recipe.variants)]
    expected = {f"artifacts/{name}" for name in names}
    expected |= {f"reports/quantize-{v.name}.json" for v in recipe.variants}
    steps = ["export", *(f"variant-{v.name}" for v in recipe.variants)]
    if recipe.validate.enabled:
        expected.add("reports/validation.json")
        steps.append("validate")
    if recipe.bench.enabled:
        expected.add("reports/bench")
        steps.append("bench")
    return expected | {(STEPS_DIR / f"{step}.json").as_posix() for step in steps}


def _prune(build: Build) -> None:
    """Remove what the recipe no longer makes (a dropped variant, an interrupted export's staging folder)."""
    expected = _expected(build)
    for folder in ("artifacts", "reports", STEPS_DIR.as_posix()):
        for entry in sorted((build.out / folder).glob("*")) + sorted((build.out / folder).glob(".*")):
            if entry.relative_to(build.out).as_posix() not in expected:
                build.log(f"removing {entry.relative_to(build.out)} (not in the recipe any more)")
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()


# --- The step cache -----------------------------------------------------------------------------------


def _hash_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _key(build: Build, step: str, config: dict, parents: dict[str, str]) -> str:
    """A step's cache key: its settings, its inputs' hashes, the source and the tool versions."""
    return _hash_json(
        {
            "cache_version": CACHE_VERSION,
            "step": step,
            "config": config,
            "parents": parents,
            "source": build.source_sha256,
            "tools": build.tools,
        }
    )


def _write_text(path: Path, text: str) -> None:
    """Write atomically, and not at all when unchanged, so a cached re-run leaves every mtime alone."""
    if path.is_file() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _to_json(value: Any) -> str:
    return json.dumps(value, indent=2) + "\n"


def _run_step(
    build: Build, step: str, key: str, work: Callable[[], dict], intact: Callable[[dict], bool]
) -> dict:
    """The recorded result when the key matches and the outputs are still there; else run and record."""
    record_path = build.out / STEPS_DIR / f"{step}.json"
    recorded = _recorded(record_path, key)
    if recorded is not None and intact(recorded):
        build.log(f"{step}: cached")
        build.statuses[step] = "cached"
        return recorded
    record_path.unlink(missing_ok=True)  # a half-done step must not look cached after a crash
    build.log(f"{step}: running")
    started = time.perf_counter()
    result = work()
    _write_text(record_path, _to_json({"key": key, "result": result}))
    build.log(f"{step}: done in {time.perf_counter() - started:.1f} s")
    build.statuses[step] = "built"
    return result


def _recorded(path: Path, key: str) -> dict | None:
    """The result a step record holds for this key; None when there is none, or it is for other inputs."""
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):  # none yet, or cut short by a crash: run the step
        return None
    return record.get("result") if isinstance(record, dict) and record.get("key") == key else None


def _artifact_intact(build: Build, result: dict) -> bool:
    """The artifact the record names is there with the recorded content (every file present)."""
    directory = build.out / result["artifact"]
    try:
        manifest = read_manifest(directory)
        require_intact(directory, manifest, hashes=False)  # hashing GBs on every run would defeat caching
    except KilnError:
        return False
    return artifact_hash(manifest) == result["artifact_sha256"]


def _folder_sha256(folder: str | None) -> str | None:
    """Content hash of an image folder, so edited images re-run the steps that read them."""
    if folder is None:
        return None
    root = Path(folder)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return _hash_json({p.relative_to(root).as_posix(): sha256_file(p) for p in files})


# --- The steps ----------------------------------------------------------------------------------------


def _export(build: Build) -> dict:
    from modelkiln.exporters.export import ExportConfig, export_model

    source, export = build.recipe.source, build.recipe.export
    config = ExportConfig(
        family=source.family,
        allow_pickle=source.allow_pickle,
        trust_remote_code=source.trust_remote_code,
        overwrite=True,  # the build owns its folder; staging keeps the old one until the new one is done
        # Every [export] key is the ExportConfig field of the same name: a new export option needs
        # only a new ExportRecipe field.
        **{f.name: getattr(export, f.name) for f in fields(export)},
    )

    def work() -> dict:
        manifest = export_model(
            source.model, build.export_dir, config, log=lambda m: build.log(f"export: {m}")
        )
        return _artifact_record(manifest)

    key = _key(build, "export", {**asdict(source), **asdict(export), "lora_sha256": _lora_hashes(export)}, {})
    return _run_step(build, "export", key, work, lambda result: _artifact_intact(build, result))


def _lora_hashes(export: ExportRecipe) -> list[str]:
    """Content hashes of the LoRAs: a retrained LoRA at the same path must re-export."""
    from modelkiln.exporters.diffusion import Lora

    return [sha256_file(Lora.parse(text).weights_file()) for text in export.lora]


def _artifact_record(manifest) -> dict:
    return {
        "artifact": f"artifacts/{EXPORT_NAME}",
        "artifact_sha256": artifact_hash(manifest),
        "family": manifest.family,
        "task": manifest.task,
        "precision": manifest.precision,
    }


def _validate_captions(build: Build) -> dict:
    from modelkiln.validate import ValidateConfig, validate_artifact

    settings = build.recipe.validate
    config = ValidateConfig(
        atol=settings.atol,
        rtol=settings.rtol,
        images=settings.images,
        num_images=settings.num_images,
        max_new_tokens=settings.max_new_tokens,
        beams=settings.beams,
        prompts=(None, *settings.prompts),
        allow_pickle=build.recipe.source.allow_pickle,
    )
    return validate_artifact(build.export_dir, build.recipe.source.model, config)


def _validate_images(build: Build) -> dict:
    from modelkiln.validate_diffusion import DiffusionValidateConfig, validate_diffusion

    settings = build.recipe.validate
    prompts = {"prompts": settings.prompts} if settings.prompts else {}
    config = DiffusionValidateConfig(
        atol=settings.atol,
        rtol=settings.rtol,
        steps=settings.steps,
        height=settings.height,
        width=settings.width,
        min_psnr=settings.min_psnr,
        allow_pickle=build.recipe.source.allow_pickle,
        **prompts,
    )
    return validate_diffusion(build.export_dir, build.recipe.source.model, config)


# Task of the export (the registry family's) -> how the build validates it: a report with "passed",
# also recorded in the export's manifest. A new task plugs in its validator here.
VALIDATORS: dict[str, Callable[[Build], dict]] = {
    "image-to-text": _validate_captions,
    "text-to-image": _validate_images,
}


def _validate(build: Build, export: dict) -> dict | None:
    """Validate the export against PyTorch; the report also lands in the export's manifest."""
    settings = build.recipe.validate
    if not settings.enabled:
        _clear_validation(build)
        return None
    validator = VALIDATORS.get(export["task"])
    if validator is None:
        raise RecipeError(
            f"{build.recipe.path}: kiln build cannot validate {export['task']} artifacts yet (it validates "
            f"{', '.join(VALIDATORS)}). Set enabled = false in section validate, and use `kiln validate`."
        )
    report_path = build.out / "reports" / "validation.json"

    def work() -> dict:
        report = validator(build)
        _write_text(report_path, _to_json(report))
        return {"passed": report["passed"], "report": "reports/validation.json"}

    def intact(result: dict) -> bool:
        # Re-exporting rewrites the manifest without the report, even when the graphs come out the same.
        recorded = json.loads(report_path.read_text()) if report_path.is_file() else None
        return recorded is not None and read_manifest(build.export_dir).validation == recorded

    config_json = {**asdict(settings), "images_sha256": _folder_sha256(settings.images)}
    key = _key(build, "validate", config_json, {"export": export["artifact_sha256"]})
    return _run_step(build, "validate", key, work, intact)


def _clear_validation(build: Build) -> None:
    from modelkiln.manifest import write_manifest

    # A clean build with validation off has none in its manifest; an earlier run's must not linger.
    manifest = read_manifest(build.export_dir)
    if manifest.validation is not None:
        write_manifest(build.export_dir, manifest.with_validation(None))


def _variant(build: Build, export: dict, variant: VariantRecipe) -> dict:
    """Quantize one variant (cached), then check its gates (every run: they are cheap and not cached)."""
    step = f"variant-{variant.name}"
    try:
        result = _run_step(
            build,
            step,
            _variant_key(build, export, variant),
            lambda: _quantize(build, variant),
            lambda result: _artifact_intact(build, result),
        )
    except ValidationFailedError as exc:  # the quantizer's own gate (new empty captions): nothing written
        build.statuses[step] = "failed"
        result = {"scheme": variant.scheme, "error": str(exc)}
    gates = _gate_rows(variant, result.get("quality"), build.recipe.path)
    result = {**result, "gates": gates, "passed": "error" not in result and all(g["passed"] for g in gates)}
    if not result["passed"]:
        # Below the gate nothing is left that looks like a usable artifact, as with `kiln quantize`.
        shutil.rmtree(build.out / "artifacts" / variant.name, ignore_errors=True)
        (build.out / STEPS_DIR / f"{step}.json").unlink(missing_ok=True)
    _write_text(build.out / "reports" / f"quantize-{variant.name}.json", _to_json(result))
    return {"name": variant.name, **result}


def _variant_key(build: Build, export: dict, variant: VariantRecipe) -> str:
    from modelkiln.quantize.schemes import get_scheme, resolve_options

    config = {
        **asdict(variant),
        "options": resolve_options(get_scheme(variant.scheme), variant.options),
        "calibration_sha256": _folder_sha256(variant.calibration_images),
        "calibration_prompts_sha256": sha256_file(Path(variant.calibration_prompts))
        if variant.calibration_prompts
        else None,
    }
    del config["gates"]  # checked on every run against the recorded figures: a new limit re-quantizes nothing
    return _key(build, f"variant-{variant.name}", config, {"export": export["artifact_sha256"]})


def _quantize(build: Build, variant: VariantRecipe) -> dict:
    from modelkiln.quantize.quantize import QuantizeConfig, quantize_artifact

    config = QuantizeConfig(
        scheme=variant.scheme,
        components=variant.components,
        exclude=variant.exclude,
        options=dict(variant.options),
        num_images=variant.num_images,
        num_prompts=variant.num_prompts,
        quality_steps=variant.quality_steps,
        image_size=variant.image_size,
        calibration_images=variant.calibration_images,
        num_calibration=variant.num_calibration,
        calibration_prompts=variant.calibration_prompts,
        calibration_steps=variant.calibration_steps,
        overwrite=True,
    )
    out = build.out / "artifacts" / variant.name
    log = lambda message: build.log(f"variant-{variant.name}: {message}")  # noqa: E731
    manifest = quantize_artifact(build.export_dir, out, config, log=log)
    return {
        "artifact": f"artifacts/{variant.name}",
        "artifact_sha256": artifact_hash(manifest),
        "scheme": variant.scheme,
        "precision": manifest.precision,
        "quality": manifest.quantization["quality"],
    }


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _gate_rows(variant: VariantRecipe, quality: dict | None, path: Path) -> list[dict]:
    """Each gate against the variant's quality figures; a gate on a figure it lacks is a recipe error."""
    if quality is None:
        return []
    rows = []
    for gate, limit in variant.gates.items():
        bound, _, figure = gate.partition("_")
        value = quality.get(figure)
        if not _numeric(value):
            figures = ", ".join(k for k, v in quality.items() if _numeric(v))
            raise RecipeError(
                f"{path}: variant {variant.name} gate {gate}: its quality report has no figure {figure!r}. "
                f"Gate one of: {figures}."
            )
        passed = value >= limit if bound == "min" else value <= limit
        rows.append({"gate": gate, "limit": limit, "value": value, "passed": passed})
    return rows


def _bench(build: Build, export: dict, variants: list[dict]) -> dict | None:
    """Benchmark the export and every variant that passed its gates, against PyTorch eager."""
    settings = build.recipe.bench
    if not settings.enabled:
        return None
    targets = [export] + [v for v in variants if v["passed"]]
    report_path = build.out / "reports" / "bench" / "report.json"

    def work() -> dict:
        report, p50_s = _run_bench(build, [build.out / t["artifact"] for t in targets])
        by_path = {str(build.out / t["artifact"]): t["artifact"] for t in targets}
        eager = p50_s(report["variants"][0])
        rows = [
            {
                "name": row["name"],
                "artifact": by_path.get(row["path"]),
                "p50_ms": round(p50_s(row) * 1e3, 2),
                "speedup_vs_eager": round(eager / p50_s(row), 3),
            }
            for row in report["variants"]
        ]
        return {"report": "reports/bench/report.md", "report_sha256": sha256_file(report_path), "rows": rows}

    def intact(result: dict) -> bool:
        return report_path.is_file() and sha256_file(report_path) == result["report_sha256"]

    parents = {t["artifact"]: t["artifact_sha256"] for t in targets}
    return _run_step(build, "bench", _key(build, "bench", asdict(settings), parents), work, intact)


def _run_bench(build: Build, artifacts: list[Path]) -> tuple[dict, Callable[[dict], float]]:
    """The benchmark of the export's task (captioning or text-to-image) over ``artifacts``: its report,
    and how to read a row's median seconds per input."""
    # Imported here, not at the top: the benchmark tasks load onnx and onnxruntime, which a build
    # without [bench] never needs.
    from modelkiln.benchmarks.tasks import BenchConfig, TaskOptions, get_task

    settings = build.recipe.bench
    task = get_task(read_manifest(artifacts[0]).task)
    shared = BenchConfig(
        out=build.out / "reports" / "bench",
        model=build.recipe.source.model,
        variants=tuple(str(path) for path in artifacts),
        threads=settings.threads,
        repeats=settings.repeats,
        warmup=settings.warmup,
        measure_rss=settings.measure_rss,
        plots=settings.plots,
        progress=False,
        command=f"kiln build {build.recipe.path.name}",
    )
    options = TaskOptions(per_pass=settings.images, max_new_tokens=settings.max_new_tokens)
    report = task.run(task.configure(shared, options), lambda message: build.log(f"bench: {message}"))
    return report, task.p50_s


# --- The summary --------------------------------------------------------------------------------------


def _size(directory: Path) -> int | None:
    if not directory.is_dir():
        return None
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def _figures(quality: dict | None) -> dict[str, float]:
    return {k: v for k, v in (quality or {}).items() if _numeric(v)}


def _rows(build: Build, export: dict, validation: dict | None, variants: list[dict]) -> list[dict]:
    """One row per artifact: the export first, then every variant in recipe order."""
    export_row = {
        "name": EXPORT_NAME,
        "scheme": None,
        "precision": export["precision"],
        "artifact": export["artifact"],
        "artifact_sha256": export["artifact_sha256"],
        "size_bytes": _size(build.out / export["artifact"]),
        "quality": {},
        "gates": [],
        "passed": validation is None or validation["passed"],
        "error": None,
    }
    rows = [export_row]
    for variant in variants:
        kept = variant["passed"]
        rows.append(
            {
                "name": variant["name"],
                "scheme": variant["scheme"],
                "precision": variant.get("precision"),
                "artifact": variant.get("artifact") if kept else None,
                "artifact_sha256": variant.get("artifact_sha256") if kept else None,
                "size_bytes": _size(build.out / variant["artifact"]) if kept else None,
                "quality": _figures(variant.get("quality")),
                "gates": variant["gates"],
                "passed": kept,
                "error": variant.get("error"),
            }
        )
    return rows


def _failures(validation: dict | None, rows: list[dict]) -> list[str]:
    failures = []
    if validation is not None and not validation["passed"]:
        failures.append(f"validation of {EXPORT_NAME} against PyTorch failed; see {validation['report']}")
    for row in rows[1:]:
        if row["error"]:
            failures.append(f"{row['name']}: {row['error']}")
        for gate in row["gates"]:
            if not gate["passed"]:
                failures.append(
                    f"{row['name']}: {gate['gate']} {gate['limit']} not met ({gate['value']:.4g})"
                )
    return failures


def _summary(build: Build, export: dict, validation: dict | None, variants: list[dict], bench) -> dict:
    rows = _rows(build, export, validation, variants)
    failures = _failures(validation, rows)
    return {
        "recipe": build.recipe.path.name,
        "recipe_sha256": sha256_file(build.recipe.path),
        "passed": not failures,
        "failures": failures,
        "source": {
            "model": build.recipe.source.model,
            "family": export["family"],
            "weights_sha256": build.weights_sha256,
        },
        "steps": dict(build.statuses),
        "validation": validation,
        "artifacts": rows,
        "bench": bench,
    }


def _mb(size: int | None) -> str:
    return "-" if size is None else f"{size / 1e6:.2f}"


def _validation_lines(build: Build, validation: dict | None) -> list[str]:
    """Every check of the validation report that has a pass/fail, whatever the family's report holds."""
    if validation is None:
        return ["Validation is off in this recipe."]
    report = json.loads((build.out / validation["report"]).read_text())
    lines = ["| check | result | detail |", "|---|---|---|"]
    for group, checks in report.items():
        if not isinstance(checks, dict):
            continue
        for name, check in checks.items():
            if isinstance(check, dict) and "passed" in check:
                detail = (
                    f"max abs diff {check['max_abs_diff']:.2e} (limit {check['limit']:.2e})"
                    if "max_abs_diff" in check
                    else f"{check.get('matches', '-')}/{check.get('total', '-')} match"
                )
                lines.append(f"| {group}: {name} | {'ok' if check['passed'] else 'FAIL'} | {detail} |")
    return lines


def _markdown(build: Build, summary: dict) -> str:
    fp32 = summary["artifacts"][0]["size_bytes"]
    lines = [
        f"# kiln build {summary['recipe']}: {'passed' if summary['passed'] else 'FAILED'}",
        "",
        f"Source `{summary['source']['model']}` ({summary['source']['family']}, "
        f"weights sha256 {summary['source']['weights_sha256'][:16]}...).",
        "",
        "| artifact | scheme | precision | size MB | of fp32 | quality vs fp32 | gates | result |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["artifacts"]:
        ratio = f"{row['size_bytes'] / fp32:.0%}" if row["size_bytes"] and fp32 else "-"
        # The parent's own figures and the image count describe the measurement, not the variant.
        shown = {k: v for k, v in row["quality"].items() if k != "images" and not k.startswith("parent_")}
        quality = ", ".join(f"{k} {v:.3g}" for k, v in shown.items()) or "-"
        gates = ", ".join(f"{g['gate']} {g['limit']:g}: {g['value']:.3g}" for g in row["gates"]) or "-"
        result = "ok" if row["passed"] else "FAILED"
        lines.append(
            f"| {row['name']} | {row['scheme'] or 'export'} | {row['precision'] or '-'} | "
            f"{_mb(row['size_bytes'])} | {ratio} | {quality} | {gates} | {result} |"
        )
    lines += ["", "## Validation against PyTorch", "", *_validation_lines(build, summary["validation"])]
    if summary["bench"]:
        lines += ["", f"## Benchmark ({summary['bench']['report']})", "", "| variant | p50 ms | vs eager |"]
        lines.append("|---|---|---|")
        rows = summary["bench"]["rows"]
        lines += [f"| {r['name']} | {r['p50_ms']:.1f} | {r['speedup_vs_eager']:.2f}x |" for r in rows]
    if summary["failures"]:
        lines += ["", "## Failures", "", *(f"- {failure}" for failure in summary["failures"])]
    lines += ["", "## Steps", "", *(f"- {step}: {status}" for step, status in summary["steps"].items())]
    return "\n".join(lines) + "\n"


def run_build(
    recipe: Recipe, out: str | os.PathLike, log: Callable[[str], None] = lambda message: None
) -> dict:
    """Build every artifact of ``recipe`` into ``out``; return the summary (also summary.json/.md there)."""
    # 1. Claim the build folder, hash the source, drop what the recipe no longer makes.
    build = _start(recipe, Path(out), log)
    # 2. Export the fp32 artifact and validate it against PyTorch.
    export = _export(build)
    validation = _validate(build, export)
    # 3. Make every variant from the export and check its quality gates.
    variants = [_variant(build, export, variant) for variant in recipe.variants]
    # 4. Benchmark what passed.
    bench = _bench(build, export, variants)
    # 5. Summarise for people (summary.md) and machines (summary.json).
    summary = _summary(build, export, validation, variants, bench)
    _write_text(build.out / "summary.json", _to_json(summary))
    _write_text(build.out / "summary.md", _markdown(build, summary))
    return summary
