"""Build TensorRT engines from a ``tensorrt``-target ONNX artifact: one serialized engine per component.

    from modelkiln.exporters.engine import EngineConfig, build_engines
    manifest = build_engines("out/sd3-trt", "out/sd3-engines", EngineConfig(precision="fp16"))

Each component is parsed with TensorRT's ONNX parser and built with one optimization profile derived
from the manifest's named dynamic axes and the family's declared ranges (``--profile`` overrides one
input). A timing cache is kept beside the engines and reused by the next build into the same folder.
Text-to-image engines are refittable: ``refit_engines`` puts the weights of another export of the same
model (a LoRA fused with ``kiln export --lora``) into them without rebuilding, as TensorRT's diffusion
demo does. The result is a derived artifact of kind ``tensorrt`` recording the TensorRT version, GPU,
precision and profiles, and its ONNX parent's hash; engines load only under that TensorRT and GPU.

Everything before TensorRT's API (the parent, precision, profiles) is checked first, so a mistake is
reported on any machine; the build itself needs ``tensorrt`` and an NVIDIA GPU.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from modelkiln.artifact import finish, staged_artifact
from modelkiln.errors import ArtifactError, KilnError
from modelkiln.manifest import ComponentSpec, Manifest, artifact_hash, read_manifest, require_intact
from modelkiln.runtime.cuda import CudaDevice
from modelkiln.runtime.profiles import LEVELS, Profile, ProfileOverride, derive_profiles
from modelkiln.runtime.session import ENGINE_SUFFIX
from modelkiln.runtime.tensorrt import check_engines, engine_environment, import_tensorrt

# Precision -> TensorRT builder flags. int8 runs the QDQ layers of an int8-static variant as int8 and
# lets TensorRT pick fp16 for the rest; bf16 needs Ampere or later.
PRECISIONS: dict[str, tuple[str, ...]] = {
    "fp32": (),
    "fp16": ("FP16",),
    "bf16": ("BF16",),
    "int8": ("INT8", "FP16"),
}
TIMING_CACHE = "timing.cache"  # beside the engines; reused by the next build into the same folder
REFIT_TASKS = ("text-to-image",)  # built refittable, so a LoRA export can be refitted in


@dataclass(frozen=True)
class EngineConfig:
    """One `kiln engine` build."""

    precision: str = "fp32"  # key of PRECISIONS
    profiles: tuple[ProfileOverride, ...] = ()  # per-input min/opt/max shapes replacing the derived ones
    workspace_gb: float | None = None  # TensorRT's workspace memory pool limit; None: TensorRT's default
    timing_cache: str | None = None  # a timing cache file to start from; None: the one in --out, if any
    overwrite: bool = False  # replace an existing output directory


def read_engine_parent(directory: str | os.PathLike, config: EngineConfig) -> tuple[Path, Manifest]:
    """The intact tensorrt-target ONNX artifact engines are built from, and the request checked."""
    parent = Path(directory).absolute()
    manifest = read_manifest(parent)
    if manifest.kind != "onnx" or manifest.target != "tensorrt":
        raise KilnError(
            f"{parent} is a {manifest.kind} artifact for target {manifest.target}; engines are built from "
            f"ONNX graphs exported for TensorRT. Export them first: kiln export --model "
            f"{manifest.source.model} --target tensorrt --out DIR"
        )
    if config.precision not in PRECISIONS:
        raise KilnError(f"--precision {config.precision}: use one of {', '.join(PRECISIONS)}.")
    quantized = (manifest.quantization or {}).get("scheme")
    if (config.precision == "int8") != (quantized == "int8-static"):
        raise KilnError(
            f"--precision {config.precision} does not fit {parent} (precision {manifest.precision}): int8 "
            "engines are built from an int8-static variant (kiln quantize --scheme int8-static), and only "
            "from it. Pass the variant with --precision int8, or its fp32 parent with fp32/fp16/bf16."
        )
    require_intact(parent, manifest)
    return parent, manifest


def _parse(trt, logger, graph: Path, what: str):
    """(builder, network, parser) TensorRT's ONNX parser makes of ``graph`` (external data read beside
    it). The parser owns the weights the network points to: it must outlive the build."""
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise KilnError(f"TensorRT's ONNX parser refused {what}: {errors}. Re-export with --target tensorrt.")
    return builder, network, parser


def _builder_config(trt, builder, precision: str, profile: Profile, refit: bool, cache: bytes, workspace):
    config = builder.create_builder_config()
    for flag in PRECISIONS[precision]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if precision == "fp32":
        # fp32 means fp32: by default TensorRT runs matmuls and convolutions in TF32 (10-bit mantissa),
        # which moves outputs past the parity bars the ONNX artifact meets.
        config.clear_flag(trt.BuilderFlag.TF32)
    if refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    if workspace is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace * 1024**3))
    if profile:
        optimization = builder.create_optimization_profile()
        for name, shapes in profile.items():
            optimization.set_shape(name, *(shapes[level] for level in LEVELS))
        config.add_optimization_profile(optimization)
    timing = config.create_timing_cache(cache)
    config.set_timing_cache(timing, ignore_mismatch=False)
    return config


def _build_one(trt, logger, graph: Path, out: Path, settings: dict, cache: bytes, what: str) -> bytes:
    """Build and write one engine; return the timing cache grown by this build."""
    builder, network, parser = _parse(trt, logger, graph, what)
    config = _builder_config(trt, builder, cache=cache, **settings)
    serialized = builder.build_serialized_network(network, config)
    del parser  # only now: the build read the weights it holds
    if serialized is None:
        raise KilnError(f"TensorRT could not build {what} (its log above says why).")
    out.write_bytes(memoryview(serialized))
    return bytes(memoryview(config.get_timing_cache().serialize()))


def _start_cache(out: Path, config: EngineConfig) -> bytes:
    start = Path(config.timing_cache) if config.timing_cache else out / TIMING_CACHE
    return start.read_bytes() if start.is_file() else b""


def _copy_runtime_files(parent: Path, staging: Path, manifest: Manifest) -> None:
    graphs = {f for spec in manifest.components.values() for f in (spec.file, spec.external_data) if f}
    for name in manifest.files:
        if name not in graphs:
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(parent / name, staging / name)


def _engine_manifest(manifest: Manifest, parent: Path, out, record: dict) -> Manifest:
    components = {
        name: ComponentSpec(
            file=f"{name}{ENGINE_SUFFIX}", external_data=None, inputs=spec.inputs, outputs=spec.outputs,
            precision=record["precision"] if spec.precision == "fp32" else spec.precision,
        )
        for name, spec in manifest.components.items()
    }  # fmt: skip
    relative = Path(os.path.relpath(parent, Path(out).absolute())).as_posix()
    return replace(
        manifest,
        kind="tensorrt",
        precision=record["precision"],
        components=components,
        parent={
            "path": relative,
            "artifact_sha256": artifact_hash(manifest),
            "precision": manifest.precision,
        },
        engine=record,
        validation=None,
    )


def build_engines(
    parent_dir: str | os.PathLike,
    out: str | os.PathLike,
    config: EngineConfig = EngineConfig(),
    log: Callable[[str], None] = lambda message: None,
) -> Manifest:
    """Build one engine per component of ``parent_dir`` into the artifact ``out``."""
    # 1. Check the parent, the precision and the profiles before touching TensorRT.
    parent, manifest = read_engine_parent(parent_dir, config)
    profiles = derive_profiles(manifest, list(config.profiles))
    refit = manifest.task in REFIT_TASKS
    # 2. TensorRT and the GPU the engines will be tied to.
    trt, cuda = import_tensorrt(), CudaDevice()
    logger = trt.Logger(trt.Logger.WARNING)
    cache = _start_cache(Path(out), config)
    with staged_artifact(out, overwrite=config.overwrite) as staging:
        # 3. One engine per component, the timing cache carried from each build to the next.
        for name, spec in manifest.components.items():
            log(f"building {name} ({config.precision})")
            settings = {"precision": config.precision, "profile": profiles[name], "refit": refit,
                        "workspace": config.workspace_gb}  # fmt: skip
            target = staging / f"{name}{ENGINE_SUFFIX}"
            cache = _build_one(trt, logger, parent / spec.file, target, settings, cache, f"component {name}")
        (staging / TIMING_CACHE).write_bytes(cache)
        _copy_runtime_files(parent, staging, manifest)
        # 4. The manifest: what the engines are tied to and how they were built.
        record = {**engine_environment(trt, cuda), "precision": config.precision, "profiles": profiles,
                  "refittable": refit, "timing_cache": TIMING_CACHE}  # fmt: skip
        return finish(staging, _engine_manifest(manifest, parent, out, record))


def read_refit_inputs(onnx_dir: str | os.PathLike, engines_dir: str | os.PathLike) -> tuple:
    """(onnx dir, its manifest, engines dir, their manifest) when the engines can take these weights."""
    engines = Path(engines_dir).absolute()
    built = read_manifest(engines)
    if built.kind != "tensorrt" or not (built.engine or {}).get("refittable"):
        raise KilnError(
            f"{engines} holds no refittable TensorRT engines (kind {built.kind}); `kiln engine --refit` "
            "takes the output of `kiln engine` for a text-to-image artifact. Build engines first."
        )
    source, manifest = read_engine_parent(onnx_dir, EngineConfig(precision=built.engine["precision"]))
    same = built.family == manifest.family and {n: s.inputs for n, s in built.components.items()} == {
        n: s.inputs for n, s in manifest.components.items()
    }
    if not same:
        raise ArtifactError(
            f"{source} is not the same model as the one {engines} was built from (family, components or "
            "input shapes differ): refit only changes weights. Build new engines instead: "
            f"kiln engine {source} --out DIR"
        )
    require_intact(engines, built)
    return source, manifest, engines, built


def refit_engines(
    onnx_dir: str | os.PathLike,
    engines_dir: str | os.PathLike,
    out: str | os.PathLike,
    overwrite: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> Manifest:
    """Engines of ``engines_dir`` with the weights of the ONNX artifact ``onnx_dir``, written to ``out``."""
    source, manifest, engines, built = read_refit_inputs(onnx_dir, engines_dir)
    trt, cuda = import_tensorrt(), CudaDevice()
    check_engines(engines, built, trt, cuda)
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)  # outlives the engines it deserializes, as TensorRT requires
    with staged_artifact(out, overwrite=overwrite) as staging:
        for name, spec in manifest.components.items():
            log(f"refitting {name}")
            engine_file = built.components[name].file
            engine = runtime.deserialize_cuda_engine((engines / engine_file).read_bytes())
            refitter = trt.Refitter(engine, logger)
            # Kept in a name until the refit is done: it owns the weights it hands the refitter.
            weights = trt.OnnxParserRefitter(refitter, logger)
            if not weights.refit_from_file(str(source / spec.file)):
                raise KilnError(f"TensorRT could not read the weights of component {name} from {source}.")
            if not refitter.refit_cuda_engine():
                missing = ", ".join(refitter.get_missing_weights()[:5])
                raise KilnError(f"TensorRT could not refit component {name}: weights missing ({missing}).")
            (staging / engine_file).write_bytes(memoryview(engine.serialize()))
        shutil.copyfile(engines / TIMING_CACHE, staging / TIMING_CACHE)
        _copy_runtime_files(source, staging, manifest)
        record = {**built.engine, "refitted_from": artifact_hash(manifest)}
        return finish(staging, _engine_manifest(manifest, source, out, record))
