"""Artifact confinement: nothing outside an artifact is ever read, and stray files never stop it.

Each tamper case is made the way an attacker who can also rewrite the manifest's hashes would make it
(the tampered files are re-hashed into manifest.json), so only confinement stands in the way. Every
refusal is checked for runtime.load, `kiln caption` / `kiln generate` and `kiln verify`: a one-line
error naming the offending entry, exit code 2.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from modelkiln import runtime
from modelkiln.cli import main
from modelkiln.errors import ArtifactError
from modelkiln.manifest import MANIFEST_NAME, read_manifest, sha256_file, verify_files

IMAGE = (np.arange(40 * 30 * 3) % 255).astype(np.uint8).reshape(40, 30, 3)


@pytest.fixture(scope="module")
def sd1(tiny_diffusion):
    """A tiny SD 1.x text-to-image artifact, exported once for the session."""
    return tiny_diffusion("sd1")[1]


@pytest.fixture()
def captioner(small_artifact, tmp_path):
    """A private copy of the tiny captioner (external data on), free to tamper with."""
    return Path(shutil.copytree(small_artifact, tmp_path / "art"))


@pytest.fixture()
def image_file(tmp_path):
    path = tmp_path / "image.png"
    Image.fromarray(IMAGE).save(path)
    return path


def edit_manifest(artifact: Path, edit) -> None:
    """Apply ``edit`` to manifest.json's data, then re-hash every file it lists, as an attacker could."""
    path = artifact / MANIFEST_NAME
    data = json.loads(path.read_text())
    edit(data)
    data["files"] = {name: _hash_or_stale(artifact / name, digest) for name, digest in data["files"].items()}
    path.write_text(json.dumps(data))


def _hash_or_stale(path: Path, digest: str) -> str:
    # Paths outside the folder are hashed too: the attacker lists them with their true hashes.
    return sha256_file(path) if os.path.isfile(path) else digest


def refusals(artifact: Path, argv: list[str], capsys) -> list[str]:
    """The error of runtime.load, of the CLI command ``argv`` and of `kiln verify`, each one line."""
    with pytest.raises(ArtifactError) as caught:
        runtime.load(artifact)
    messages = [str(caught.value)]
    for command in (argv, ["verify", str(artifact)]):
        code = main(command)
        err = capsys.readouterr().err.strip()
        assert code == 2, (command, err)
        assert len(err.splitlines()) == 1 and err.startswith("error:"), err
        messages.append(err)
    assert all("\n" not in message for message in messages)
    return messages


def caption_argv(artifact: Path, image_file: Path) -> list[str]:
    return ["caption", str(artifact), str(image_file), "--max-new-tokens", "3"]


def outside_copy(artifact: Path, name: str) -> Path:
    """A copy of one of the artifact's graphs in a folder beside it (a valid graph: only the path is bad)."""
    outside = artifact.parent / "outside"
    outside.mkdir(exist_ok=True)
    return Path(shutil.copy(artifact / name, outside / "evil.onnx"))


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "etc-passwd", "dotdot-etc-passwd", "inner-dotdot"])
def test_component_outside_the_artifact_is_refused(captioner, image_file, capsys, kind):
    decoder = read_manifest(captioner).components["decoder"]
    evil = outside_copy(captioner, decoder.file)
    name = {
        "dotdot": "../outside/evil.onnx",
        "absolute": str(evil),
        "etc-passwd": "/etc/passwd",
        "dotdot-etc-passwd": "../../../../../../etc/passwd",
        "inner-dotdot": "tokenizer/../../outside/evil.onnx",
    }[kind]

    def edit(data):
        data["components"]["decoder"]["file"] = name
        data["components"]["decoder"]["external_data"] = None
        data["files"][name] = "0" * 64

    edit_manifest(captioner, edit)
    for message in refusals(captioner, caption_argv(captioner, image_file), capsys):
        assert "component 'decoder' file" in message and repr(name) in message and "refused" in message


def test_component_not_hashed_by_the_manifest_is_refused(captioner, image_file, capsys):
    shutil.copy(captioner / "decoder.onnx", captioner / "stray.onnx")
    edit_manifest(captioner, lambda data: data["components"]["decoder"].update(file="stray.onnx"))
    for message in refusals(captioner, caption_argv(captioner, image_file), capsys):
        assert "component 'decoder' file names 'stray.onnx'" in message and "files list" in message


def test_files_entry_outside_the_artifact_is_refused_before_hashing(captioner, capsys):
    edit_manifest(captioner, lambda data: data["files"].update({"../../../../../../etc/passwd": "0" * 64}))
    assert main(["verify", str(captioner)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the files list names '../../../../../../etc/passwd'" in err


def point_external_data(graph: Path, location: str) -> None:
    """Rewrite every external-data location of ``graph`` (onnx.save refuses '..', so edit the proto)."""
    model = onnx.load(graph, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    graph.write_bytes(model.SerializeToString())


@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_graph_whose_external_data_is_outside_is_refused(captioner, image_file, capsys, kind):
    encoder = read_manifest(captioner).components["encoder"]
    assert encoder.external_data, "the fixture exports with external data"
    outside = captioner.parent / "outside"
    outside.mkdir()
    moved = shutil.move(captioner / encoder.external_data, outside / "weights.bin")
    location = {"dotdot": "../outside/weights.bin", "absolute": str(moved)}[kind]
    point_external_data(captioner / encoder.file, location)

    def edit(data):
        del data["files"][encoder.external_data]
        data["components"]["encoder"]["external_data"] = None

    edit_manifest(captioner, edit)
    for message in refusals(captioner, caption_argv(captioner, image_file), capsys):
        assert f"{encoder.file}: its external data names {location!r}" in message


def test_graph_whose_external_data_is_not_hashed_is_refused(captioner, image_file, capsys):
    encoder = read_manifest(captioner).components["encoder"]
    shutil.move(captioner / encoder.external_data, captioner / "unlisted.bin")
    point_external_data(captioner / encoder.file, "unlisted.bin")

    def edit(data):
        del data["files"][encoder.external_data]
        data["components"]["encoder"]["external_data"] = None

    edit_manifest(captioner, edit)
    for message in refusals(captioner, caption_argv(captioner, image_file), capsys):
        assert "external data names 'unlisted.bin'" in message and "files list" in message


@pytest.fixture()
def diffusion(sd1, tmp_path):
    return Path(shutil.copytree(sd1, tmp_path / "art"))


def generate_argv(artifact: Path, out: Path) -> list[str]:
    return [
        "generate",
        str(artifact),
        "a cat",
        "--steps",
        "1",
        "--height",
        "32",
        "--width",
        "32",
        "--out",
        str(out),
    ]


@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_text_to_image_component_outside_is_refused(diffusion, tmp_path, capsys, kind):
    unet = read_manifest(diffusion).components["unet"]
    evil = outside_copy(diffusion, unet.file)
    name = {"dotdot": "../outside/evil.onnx", "absolute": str(evil)}[kind]

    def edit(data):
        data["components"]["unet"].update(file=name, external_data=None)
        data["files"][name] = "0" * 64

    edit_manifest(diffusion, edit)
    out = tmp_path / "cat.png"
    for message in refusals(diffusion, generate_argv(diffusion, out), capsys):
        assert f"component 'unet' file names {name!r}" in message
    assert not out.exists()


def test_text_to_image_external_data_outside_is_refused(diffusion, tmp_path, capsys):
    graph = diffusion / read_manifest(diffusion).components["unet"].file
    model = onnx.load(graph)
    outside = tmp_path / "outside"
    outside.mkdir()
    onnx.save(model, outside / "unet.onnx", save_as_external_data=True, location="w.bin", size_threshold=0)
    shutil.copy(outside / "unet.onnx", graph)
    point_external_data(graph, "../outside/w.bin")
    edit_manifest(diffusion, lambda data: None)
    out = tmp_path / "cat.png"
    for message in refusals(diffusion, generate_argv(diffusion, out), capsys):
        assert "its external data names '../outside/w.bin'" in message
    assert not out.exists()


def test_files_the_manifest_does_not_list_do_not_stop_loading(small_artifact, captioner, capsys):
    expected = runtime.load(small_artifact)(IMAGE, max_new_tokens=4)
    (captioner / ".DS_Store").write_bytes(b"\0Bud1")
    (captioner / "README.md").write_text("notes\n")
    # A file the runtime would read if it were there and listed: unlisted, it must not be read.
    (captioner / "special_tokens_map.json").write_text("{not json")
    assert runtime.load(captioner)(IMAGE, max_new_tokens=4) == expected
    assert verify_files(captioner, read_manifest(captioner)) == []
    assert main(["verify", str(captioner)]) == 0
    err = capsys.readouterr().err
    for name in (".DS_Store", "README.md", "special_tokens_map.json"):
        assert f"extra: {name}" in err
    assert "files match the manifest" in err


def hub_cache_layout(artifact: Path, root: Path) -> Path:
    """The artifact stored as the Hugging Face cache stores a download: every file a relative symlink
    from snapshots/<revision>/ into blobs/<sha256>."""
    blobs, snapshot = root / "blobs", root / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    for path in sorted(p for p in artifact.rglob("*") if p.is_file()):
        blob = blobs / sha256_file(path)
        shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(artifact)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    return snapshot


def test_hub_cache_symlink_layout_loads_and_verifies(small_artifact, tmp_path, capsys):
    snapshot = hub_cache_layout(small_artifact, tmp_path / "models--kiln--tiny")
    assert all(p.is_symlink() for p in snapshot.rglob("*") if not p.is_dir())
    expected = runtime.load(small_artifact)(IMAGE, max_new_tokens=4)
    assert runtime.load(snapshot)(IMAGE, max_new_tokens=4) == expected
    assert main(["verify", str(snapshot)]) == 0
    assert "files match the manifest" in capsys.readouterr().err
    (snapshot / ".DS_Store").write_bytes(b"\0")  # and with a stray file: loaded through a view
    assert runtime.load(snapshot)(IMAGE, max_new_tokens=4) == expected


def test_hub_cache_symlink_layout_generates(sd1, tmp_path):
    snapshot = hub_cache_layout(sd1, tmp_path / "models--kiln--sd1")
    options = {"num_inference_steps": 1, "height": 32, "width": 32, "seed": 0, "output_type": "np"}
    expected = runtime.load(sd1)("a cat", **options).images
    assert np.array_equal(runtime.load(snapshot)("a cat", **options).images, expected)


def _external(name: str, location: str) -> onnx.TensorProto:
    from onnx import numpy_helper
    from onnx.external_data_helper import set_external_data

    tensor = numpy_helper.from_array(np.ones(3, np.float32), name)
    set_external_data(tensor, location)
    tensor.ClearField("raw_data")
    return tensor


def test_external_data_is_found_wherever_a_graph_can_hold_a_tensor(tmp_path):
    """Initializers, Constant attributes, sparse initializers, subgraphs and functions all count."""
    from onnx import helper

    from modelkiln.confine import external_data_locations

    sub = helper.make_graph([], "then", [], [], [_external("s", "in-subgraph.bin")])
    nodes = [
        helper.make_node("Constant", [], ["c"], value=_external("c", "../in-constant.bin")),
        helper.make_node("If", ["cond"], ["o"], then_branch=sub, else_branch=sub),
    ]
    graph = helper.make_graph(nodes, "g", [], [], [_external("w", "initializer.bin")])
    graph.sparse_initializer.add().values.CopyFrom(_external("v", "/abs/sparse.bin"))
    model = helper.make_model(graph)
    function = model.functions.add()
    function.node.add().CopyFrom(helper.make_node("Constant", [], ["f"], value=_external("f", "fn.bin")))
    path = tmp_path / "g.onnx"
    path.write_bytes(model.SerializeToString())
    assert sorted(external_data_locations(path)) == sorted(
        [
            "initializer.bin",
            "../in-constant.bin",
            "in-subgraph.bin",
            "in-subgraph.bin",
            "/abs/sparse.bin",
            "fn.bin",
        ]
    )
    path.write_bytes(b"\x0a\xff\xff")  # a field claiming more bytes than the file has
    with pytest.raises(ArtifactError, match="not a valid ONNX graph"):
        external_data_locations(path)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("encoder.onnx", None),
        ("text_encoder/model.onnx_data", None),
        ("../x.onnx", "'..'"),
        ("a/../../x", "'..'"),
        ("/etc/passwd", "absolute"),
        ("C:/x.onnx", "absolute"),
        ("a\\..\\x", "backslash"),
        ("./a.onnx", "canonical"),
        ("a//b.onnx", "canonical"),
        ("", "non-empty"),
        ("*/_ORT_MEM_ADDR_/*", "in-memory"),
    ],
)
def test_names_an_artifact_may_give(name, reason):
    from modelkiln.confine import name_problem

    problem = name_problem(name)
    assert problem is None if reason is None else reason in problem


@pytest.mark.parametrize(
    ("config", "data", "name"),
    [
        (
            "model.safetensors.index.json",
            {"weight_map": {"w": "../outside/w.safetensors"}},
            "../outside/w.safetensors",
        ),
        (
            "model_index.json",
            {"_class_name": "X", "../unet": ["diffusers", "UNet2DConditionModel"]},
            "../unet",
        ),
        (
            "tokenizer_config.json",
            {"fast_tokenizer_files": ["../../x/tokenizer.4.0.0.json"]},
            "../../x/tokenizer.4.0.0.json",
        ),
    ],
)
def test_configs_libraries_follow_may_not_name_files_outside(
    captioner, image_file, capsys, config, data, name
):
    """transformers and diffusers open the shards, component folders and versioned tokenizer files
    these configs name: a torch artifact's from_pretrained, or AutoTokenizer, would follow them."""
    path = captioner / config
    original = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**original, **data}))
    edit_manifest(captioner, lambda manifest: manifest["files"].setdefault(config, ""))
    for message in refusals(captioner, caption_argv(captioner, image_file), capsys):
        assert f"{config}: its " in message and f"names {name!r}, which is refused" in message


def test_shards_a_config_names_must_be_hashed(captioner, image_file, capsys):
    (captioner / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "shard.bin"}}))
    (captioner / "shard.bin").write_bytes(b"0")  # present, but not listed: never hash-checked
    edit_manifest(captioner, lambda manifest: manifest["files"].update({"model.safetensors.index.json": ""}))
    for message in refusals(captioner, caption_argv(captioner, image_file), capsys):
        assert "its weight_map names 'shard.bin', which the manifest's files list does not hash" in message


def test_hub_cache_symlink_layout_quantizes(small_artifact, tmp_path):
    """onnx.load refuses external data behind a symlink: the quantizer reads the parent's graphs anyway."""
    from modelkiln.quantize.graph_prep import load_graph
    from modelkiln.quantize.quantize import QuantizeConfig, quantize_artifact

    snapshot = hub_cache_layout(small_artifact, tmp_path / "models--kiln--tiny")
    encoder = read_manifest(small_artifact).components["encoder"]
    assert encoder.external_data and (snapshot / encoder.external_data).is_symlink()
    assert load_graph(snapshot / encoder.file) == onnx.load(small_artifact / encoder.file)
    quantize_artifact(snapshot, tmp_path / "int8", QuantizeConfig("int8-dynamic", num_images=2))
    assert verify_files(tmp_path / "int8", read_manifest(tmp_path / "int8")) == []


def test_torch_variant_with_stray_files_loads_through_a_view(small_artifact, tmp_path):
    """A bitsandbytes variant is loaded by from_pretrained, which reads whatever the folder holds: stray
    files are kept out of its sight, and the captions are those of the clean variant."""
    pytest.importorskip("bitsandbytes")
    from modelkiln.quantize.quantize import QuantizeConfig, quantize_artifact

    variant = tmp_path / "bnb"
    quantize_artifact(small_artifact, variant, QuantizeConfig("bnb-int8", num_images=2))
    expected = runtime.load(variant)(IMAGE, max_new_tokens=4)
    (variant / ".DS_Store").write_bytes(b"\0")
    (variant / "model.safetensors.index.json").write_text('{"weight_map": {"w": "../../x.safetensors"}}')
    pipe = runtime.load(variant)
    assert pipe.directory != variant and not (pipe.directory / ".DS_Store").exists()
    assert pipe(IMAGE, max_new_tokens=4) == expected
