"""The TensorRT backends on the CPU side: optimization profiles from the manifest and the family's ranges,
onnxruntime TensorRT provider options, and the one-line errors where TensorRT, onnxruntime-gpu or a GPU
is missing or the engines were built elsewhere. Running engines is in test_tensorrt_gpu.py (marked gpu).
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import onnxruntime as ort
import pytest

from modelkiln import runtime
from modelkiln.artifact import finish
from modelkiln.errors import KilnError
from modelkiln.manifest import ComponentSpec, Manifest, SourceSpec, TensorSpec, read_manifest, write_manifest
from modelkiln.runtime import cuda
from modelkiln.runtime.profiles import derive_profiles, parse_profile, shapes_option, size
from modelkiln.runtime.session import (
    RuntimeOptions,
    create_session,
    default_cache_dir,
    providers_for,
    tensorrt_provider_options,
)
from modelkiln.runtime.tensorrt import engine_mismatch

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def _manifest(components: dict[str, list[TensorSpec]], family="sd3", **runtime_config) -> Manifest:
    specs = {
        name: ComponentSpec(file=f"{name}.onnx", external_data=None, inputs=inputs, outputs=[])
        for name, inputs in components.items()
    }
    source = SourceSpec("tiny", "0" * 64, [])
    return Manifest(family, "text-to-image", source, 18, "fp32", specs, runtime_config, target="tensorrt")


SD3 = _manifest(
    {
        "text_encoder_3": [TensorSpec("input_ids", "int64", ["batch", "sequence"])],
        "transformer": [
            TensorSpec("hidden_states", "float32", ["batch", 16, "latent_height", "latent_width"]),
            TensorSpec("encoder_hidden_states", "float32", ["batch", "text_sequence", 4096]),
            TensorSpec("pooled_projections", "float32", ["batch", 2048]),
        ],
        "vae_decoder": [TensorSpec("latents", "float32", [1, 16, 128, 128])],
    },
    default_sample_size=128,
    max_sequence_length=256,
)


def test_profiles_follow_the_named_axes_and_the_family_ranges():
    profiles = derive_profiles(SD3)
    transformer = profiles["transformer"]
    assert transformer["hidden_states"] == {
        "min": [1, 16, 64, 64],
        "opt": [2, 16, 128, 128],
        "max": [8, 16, 192, 192],
    }
    # CLIP's 77 tokens and T5's 256 side by side; the component's own text length for T5.
    assert (
        transformer["encoder_hidden_states"]["min"]
        == [1, 333, 4096]
        == [
            1,
            transformer["encoder_hidden_states"]["max"][1],
            4096,
        ]
    )
    assert profiles["text_encoder_3"]["input_ids"]["opt"] == [2, 256]
    assert profiles["vae_decoder"] == {}  # fixed shapes need no profile
    assert shapes_option(transformer, "min").startswith(
        "hidden_states:1x16x64x64,encoder_hidden_states:1x333x4096"
    )


def test_a_profile_override_replaces_one_input_and_is_checked():
    override = parse_profile("transformer:hidden_states=1x16x32x32,1x16x64x64,2x16x64x64")
    profiles = derive_profiles(SD3, [override])
    assert profiles["transformer"]["hidden_states"]["max"] == [2, 16, 64, 64]
    assert profiles["transformer"]["pooled_projections"]["max"] == [8, 2048]  # the others stay derived
    with pytest.raises(KilnError, match=r"shape 1x8x32x32 does not fit the input's shape"):
        derive_profiles(SD3, [parse_profile("transformer:hidden_states=1x8x32x32,1x16x64x64,2x16x64x64")])
    with pytest.raises(KilnError, match="MIN <= OPT <= MAX"):
        derive_profiles(SD3, [parse_profile("transformer:hidden_states=2x16x64x64,1x16x64x64,2x16x64x64")])
    with pytest.raises(
        KilnError, match=r"transformer:latents: no such input\. Inputs: text_encoder_3: input_ids"
    ):
        derive_profiles(SD3, [parse_profile("transformer:latents=1x1,1x1,1x1")])
    for text in ("transformer=1x2,1x2,1x2", "transformer:x=1x2,1x2", "transformer:x=1xa,1x2,1x2"):
        with pytest.raises(KilnError, match="expected COMPONENT:INPUT=MIN,OPT,MAX"):
            parse_profile(text)


def test_an_axis_without_a_range_names_the_override_that_fixes_it():
    manifest = _manifest({"transformer": [TensorSpec("x", "float32", ["batch", "frames"])]})
    with pytest.raises(
        KilnError, match=r"no profile range for axis 'frames' of transformer:x\. Pass --profile"
    ):
        derive_profiles(manifest)
    assert derive_profiles(manifest, [parse_profile("transformer:x=1x2,1x4,2x8")])["transformer"]["x"][
        "opt"
    ] == [1, 4]


def test_size_expressions_take_ints_and_runtime_keys_only():
    assert size("77 + max_sequence_length", {"max_sequence_length": 256}, "x") == 333
    assert size("a * a // 16", {"a": 128}, "x") == 1024
    for bad in ("__import__('os')", "missing + 1", "a ** 2"):
        with pytest.raises(KilnError, match="is not ints"):
            size(bad, {"a": 128}, "family sd3, axis y")


def test_tensorrt_provider_options_carry_profiles_precision_and_caches(tmp_path, monkeypatch):
    fp16 = ComponentSpec("transformer.onnx", None, SD3.components["transformer"].inputs, [], precision="fp16")
    manifest = Manifest(**{**SD3.__dict__, "components": {**SD3.components, "transformer": fp16}})
    options = tensorrt_provider_options(manifest, tmp_path)
    transformer = options["transformer.onnx"]
    assert transformer["trt_fp16_enable"] and not options["text_encoder_3.onnx"]["trt_fp16_enable"]
    assert transformer["trt_engine_cache_enable"] and transformer["trt_timing_cache_enable"]
    assert transformer["trt_engine_cache_path"] == str(tmp_path / "transformer")
    assert transformer["trt_profile_max_shapes"].startswith("hidden_states:8x16x192x192,")
    assert "trt_profile_min_shapes" not in options["vae_decoder.onnx"]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    default = tensorrt_provider_options(manifest, None)["transformer.onnx"]["trt_engine_cache_path"]
    assert (
        default.startswith(str(tmp_path / "xdg" / "modelkiln" / "tensorrt"))
        and default_cache_dir(manifest).name
    )


@pytest.mark.skipif(
    "TensorrtExecutionProvider" in ort.get_available_providers(), reason="this onnxruntime has it"
)
def test_missing_onnxruntime_gpu_is_one_line_naming_the_install(target_artifact, tmp_path):
    _, artifact = target_artifact("vit-gpt2", "tensorrt")
    with pytest.raises(
        KilnError, match="needs onnxruntime's TensorrtExecutionProvider, which this onnxruntime lacks"
    ):
        runtime.load(artifact, backend="tensorrt", cache_dir=tmp_path)
    with pytest.raises(
        KilnError,
        match=r"backend 'tensorrt' needs onnxruntime's TensorrtExecutionProvider.*modelkiln\[tensorrt\]",
    ):
        providers_for("tensorrt")


def test_captioner_and_diffusion_families_declare_ranges_for_every_axis(target_artifact, tiny_diffusion):
    # SD 1.x's graphs name their axes alike for every target: its onnxruntime export stands for tensorrt's.
    artifacts = [target_artifact(name, "tensorrt")[1] for name in ("vit-gpt2", "sd3.5-medium")]
    for artifact in [*artifacts, tiny_diffusion("sd1")[1]]:
        manifest = read_manifest(artifact)
        profiles = derive_profiles(manifest)
        for component, spec in manifest.components.items():
            dynamic = [t.name for t in spec.inputs if any(isinstance(d, str) for d in t.shape)]
            assert list(profiles[component]) == dynamic
    decoder = derive_profiles(read_manifest(target_artifact("vit-gpt2", "tensorrt")[1]))["decoder"]
    # The first step attends to an empty cache; the cache and the mask grow together.
    assert decoder["past_key_values.0.key"]["min"][2] == 0 and decoder["attention_mask"]["min"][1] == 1


def _engine_artifact(onnx_artifact, folder, engine: dict):
    """An artifact laid out as `kiln engine` writes one, with placeholder bytes where the engines go: for
    the refusals that come before any engine is read (no TensorRT here to build real ones)."""
    manifest = read_manifest(onnx_artifact)
    folder.mkdir()
    components = {}
    for name, spec in manifest.components.items():
        (folder / f"{name}.engine").write_bytes(b"not an engine")
        components[name] = ComponentSpec(f"{name}.engine", None, spec.inputs, spec.outputs)
    for name in manifest.files:
        if not name.endswith((".onnx", ".data")):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(onnx_artifact / name, folder / name)
    built = Manifest(**{**manifest.__dict__, "kind": "tensorrt", "components": components, "engine": engine,
                        "parent": {"path": "../onnx", "artifact_sha256": "0" * 64, "precision": "fp32"}})  # fmt: skip
    return finish(folder, built)


ENGINE = {"tensorrt": "10.1.0", "gpu": "NVIDIA L4", "compute_capability": "8.9", "precision": "fp16"}


def test_an_engine_artifact_needs_the_tensorrt_backend(target_artifact, tmp_path):
    _, onnx_artifact = target_artifact("vit-gpt2", "tensorrt")
    _engine_artifact(onnx_artifact, tmp_path / "engines", ENGINE)
    with pytest.raises(
        KilnError, match=r"encoder\.engine is a TensorRT engine: it runs with backend 'tensorrt'"
    ):
        runtime.load(tmp_path / "engines")
    assert read_manifest(tmp_path / "engines").kind == "tensorrt"  # verify skips engines as ONNX


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_missing_tensorrt_is_one_line_naming_the_install(target_artifact, tmp_path):
    _, onnx_artifact = target_artifact("vit-gpt2", "tensorrt")
    _engine_artifact(onnx_artifact, tmp_path / "engines", ENGINE)
    with pytest.raises(
        KilnError,
        match=r"^TensorRT is not installed here .*pip install 'modelkiln\[tensorrt\]' .*NVIDIA GPU\.$",
    ):
        runtime.load(tmp_path / "engines", backend="tensorrt")
    with pytest.raises(
        KilnError, match=r"TensorRT is not installed here .*pip install 'modelkiln\[tensorrt\]'"
    ):
        create_session(tmp_path / "x.engine", RuntimeOptions(backend="tensorrt"))


def test_missing_driver_or_gpu_is_one_line(monkeypatch):
    monkeypatch.setattr(cuda, "DRIVER_LIBRARY", "libcuda-that-is-not-here.so.1")
    with pytest.raises(KilnError, match=r"no NVIDIA driver here .*run this on a machine with one"):
        cuda.CudaDevice()


def test_engines_from_another_tensorrt_or_gpu_name_the_rebuild_command(tmp_path):
    manifest = Manifest(
        **{**SD3.__dict__, "kind": "tensorrt", "engine": ENGINE, "parent": {"path": "../sd3-trt"}}
    )
    here = {key: ENGINE[key] for key in ("tensorrt", "gpu", "compute_capability")}
    assert engine_mismatch(tmp_path / "engines", manifest, here) is None
    message = engine_mismatch(
        tmp_path / "engines", manifest, {**here, "gpu": "NVIDIA H200", "compute_capability": "9.0"}
    )
    assert (
        "built with TensorRT 10.1.0 on NVIDIA L4 (compute 8.9); this machine has TensorRT 10.1.0 on NVIDIA H200"
        in message
    )
    assert message.endswith(
        f"Rebuild them here: kiln engine {tmp_path / 'sd3-trt'} --out {tmp_path / 'engines'} --overwrite"
    )
    assert "\n" not in message


def test_engine_record_survives_the_manifest_round_trip(tmp_path):
    record = {**ENGINE, "profiles": derive_profiles(SD3), "refittable": True}
    write_manifest(tmp_path, Manifest(**{**SD3.__dict__, "kind": "tensorrt", "engine": record}))
    manifest = read_manifest(tmp_path)
    assert manifest.engine == json.loads(json.dumps(record)) and manifest.target == "tensorrt"
