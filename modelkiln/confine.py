"""Artifact confinement: every path an artifact names must stay inside the artifact folder.

A manifest and the graphs it lists are data from whoever made the artifact. The paths they name (a
component's graph, its external-data file, the files list) are checked here, lexically, before any file
is opened: relative, POSIX, canonical, no ``..``. Symlinks are followed (the Hugging Face cache stores
every file as a symlink into a ``blobs`` folder), so confinement is about the names; the content is
what the sha256 in the manifest checks::

    name = confined_name("encoder.onnx", "component 'encoder' file")   # ArtifactError if it escapes
    external_data_locations(Path("art/encoder.onnx"))                  # ["encoder.onnx.data"]
    config_references("text_encoder/model.safetensors.index.json", path)  # [(what, name, is_file)]

Only the standard library is imported: the captioning runtime runs without torch and without the
``onnx`` package, so graphs are read with a minimal protobuf walk (``external_data_locations``).
"""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from modelkiln.errors import ArtifactError

# onnxruntime reads external data whose location is this tag from a memory address, not from a file.
ORT_MEMORY_TAG = "*/_ORT_MEM_ADDR_/*"

# The fix every refusal gives: the artifact was made or altered by something other than `kiln export`.
FIX = "Re-export the artifact, or get it again from a source you trust"


def name_problem(name: object) -> str | None:
    """Why ``name`` is not a confined artifact path (relative, POSIX, canonical, no ``..``), or None."""
    if not isinstance(name, str) or not name:
        return "not a non-empty string"
    if "\0" in name or "\\" in name:
        return "it holds a NUL or backslash"
    if name.startswith("/") or PureWindowsPath(name).anchor:
        return "an absolute path"
    if ".." in name.split("/"):
        return "'..' leads outside the artifact"
    if name == ".":
        return "'.' is the artifact folder, not a file"
    if name == ORT_MEMORY_TAG:
        return "onnxruntime's in-memory tag, not a file"
    if PurePosixPath(name).as_posix() != name:  # "./a", "a//b", "a/": one file, one spelling
        return f"not in canonical form (write {PurePosixPath(name).as_posix()!r})"
    return None


def confined_name(name: object, what: str, where: str | os.PathLike = "manifest.json") -> str:
    """``name`` unchanged if it is a confined artifact path, else an ArtifactError naming ``what``."""
    problem = name_problem(name)
    if problem is not None:
        raise ArtifactError(
            f"{where}: {what} names {name!r}, which is refused: {problem}. {FIX}: an artifact may only "
            "name files inside its own folder."
        )
    return name


def join_beside(graph_name: str, location: str) -> str:
    """The artifact-relative name of a file named relative to the graph ``graph_name`` (its folder)."""
    parent = PurePosixPath(graph_name).parent
    return (parent / location).as_posix() if parent.name else location


# -- a minimal protobuf walk over an ONNX ModelProto, for external-data locations --------------------

# Message kind -> {field number: kind of the sub-message in it}, after onnx.proto. Only the fields that
# can (transitively) hold a TensorProto are entered; every other field is skipped without decoding.
_CHILDREN: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},  # TrainingInfoProto: initialization, algorithm
    "graph": {1: "node", 5: "tensor", 15: "sparse"},  # node, initializer, sparse_initializer
    "node": {5: "attribute"},
    "function": {7: "node", 11: "attribute"},  # node, attribute_proto (default values)
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},  # SparseTensorProto: values, indices
    "tensor": {13: "entry"},  # TensorProto.external_data: StringStringEntryProto
}


class _Malformed(Exception):
    """The bytes are not a protobuf message."""


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int):
    """(field number, wire type, value start, value end) of each field of one message."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        wire = key & 7
        if wire == 0:
            _, after = _varint(buf, pos, end)
        elif wire == 1:
            after = pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            after = pos + length
        elif wire == 5:
            after = pos + 4
        else:  # groups (3, 4) are not used by onnx.proto
            raise _Malformed
        if after > end:
            raise _Malformed
        yield key >> 3, wire, pos, after
        pos = after


def _locations(buf: memoryview) -> list[str]:
    found: list[str] = []
    stack = [("model", 0, len(buf))]
    while stack:
        kind, start, end = stack.pop()
        if kind == "entry":
            entry = {number: bytes(buf[s:e]) for number, wire, s, e in _fields(buf, start, end) if wire == 2}
            if entry.get(1) == b"location":
                found.append(entry.get(2, b"").decode("utf-8", errors="replace"))
            continue
        children = _CHILDREN[kind]
        for number, wire, s, e in _fields(buf, start, end):
            if wire == 2 and number in children:
                stack.append((children[number], s, e))
    return found


def external_data_locations(graph: str | os.PathLike) -> list[str]:
    """Every external-data ``location`` an ONNX file names (initializers, constants, subgraphs), as
    written in it, without loading the weights: the file is memory-mapped and only walked."""
    path = Path(graph)
    if not path.is_file():
        return []  # nothing to refer to; whoever opens it reports the missing file
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return []
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                return _locations(view)
            except _Malformed:
                raise ArtifactError(
                    f"{path} is not a valid ONNX graph (its protobuf is malformed). Re-export the artifact."
                ) from None
            finally:
                view.release()


def graph_external_files(graph_name: str, graph: str | os.PathLike) -> list[str]:
    """Artifact-relative names of the external-data files of the graph ``graph_name`` (at ``graph``),
    each checked to be confined; ArtifactError on the first location that is not."""
    names = []
    for location in dict.fromkeys(external_data_locations(graph)):
        confined_name(location, "its external data", where=os.fspath(graph))
        names.append(join_beside(graph_name, location))
    return names


# -- file names inside the configs that transformers and diffusers load whole folders from -----------


def _weight_map(data: dict) -> list[tuple[str, object, bool]]:
    # A sharded checkpoint's index: tensor name -> shard file, beside the index.
    shards = data.get("weight_map") if isinstance(data.get("weight_map"), dict) else {}
    return [("its weight_map", shard, True) for shard in dict.fromkeys(shards.values())]


def _model_index(data: dict) -> list[tuple[str, object, bool]]:
    # diffusers loads each component [library, class] from the folder of that name.
    return [
        ("its component", key, False)
        for key, value in data.items()
        if not key.startswith("_") and isinstance(value, list)
    ]


def _tokenizer_config(data: dict) -> list[tuple[str, object, bool]]:
    # transformers reads a versioned tokenizer file named here instead of tokenizer.json.
    files = data.get("fast_tokenizer_files")
    return [("its fast_tokenizer_files", name, True) for name in files] if isinstance(files, list) else []


# Config file name (or suffix) -> the (what, name, is a file) references a library follows in it.
CONFIG_REFERENCES = {
    ".index.json": _weight_map,
    "model_index.json": _model_index,
    "tokenizer_config.json": _tokenizer_config,
}


def config_references(config_name: str, path: str | os.PathLike) -> list[tuple[str, str, bool]]:
    """(what, artifact-relative name, is a file) for each file or folder the config ``config_name`` (at
    ``path``) makes transformers or diffusers open, each checked to be confined; [] for other files."""
    base = PurePosixPath(config_name).name
    readers = [read for key, read in CONFIG_REFERENCES.items() if base == key or base.endswith(key)]
    if not readers:
        return []
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArtifactError(f"{path} is not valid JSON ({error}). Re-export the artifact.") from error
    if not isinstance(data, dict):
        return []
    found = []
    for what, name, is_file in readers[0](data):
        confined_name(name, what, where=os.fspath(path))
        found.append((what, join_beside(config_name, name), is_file))
    return found
