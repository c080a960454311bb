"""The dataset captioning core both engines run (``modelkiln.runtime.datasets`` is the API and its doc).

Inputs (``discover``), the two stages every image goes through (``prepare``: read, hash, decode,
preprocess; ``caption_records``: caption the prepared ones), the crash-safe journal, the output
writers, the in-process engine and ``run_job``, which feeds any engine's results to the journal.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageOps

from modelkiln.errors import ImageInputError, KilnError, OutputExistsError
from modelkiln.manifest import read_manifest

from .images import ImagePreprocessor, _apply_pixel_limit, load_images

__all__ = [
    "CaptionJob",
    "DatasetItem",
    "DatasetSummary",
    "Engine",
    "Journal",
    "LocalEngine",
    "PipelineSpec",
    "caption_prepared",
    "caption_records",
    "discover",
    "expand",
    "image_column",
    "is_uri",
    "prepare",
    "run_job",
    "table_item",
]

# What a folder search picks up (lower-cased suffixes); everything else in the folder is left alone.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# Table columns tried, in order, when no image column is named: the imagefolder and common layouts.
IMAGE_COLUMNS = ("image", "file_name", "image_path", "path")
# Journal rows a crash may lose at most, by default: small enough to redo in seconds, large enough that
# a million images make a few thousand chunk files.
DEFAULT_CHUNK_SIZE = 512
Progress = Callable[[int, int | None], None]  # (images finished so far, images in the job if known)


# --------------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineSpec:
    """How to load the captioning pipeline: picklable, so each Ray actor loads its own."""

    artifact: Path  # artifact directory
    backend: str = "cpu"  # key of modelkiln.backends.BACKENDS
    threads: int | None = None  # intra-op threads of each pipeline; None: onnxruntime's default

    def load(self):
        # Here, not at the top: modelkiln.runtime's __init__ imports this module (via datasets) for its API.
        from modelkiln.runtime import load

        return load(self.artifact, backend=self.backend, threads=self.threads)


@dataclass(frozen=True)
class CaptionJob:
    """One dataset captioning run: what to read, what to write and how to caption."""

    pipeline: PipelineSpec  # the captioner
    inputs: tuple[str, ...]  # image files, folders, .txt path lists, .jsonl/.parquet tables
    out: Path  # output file; its extension picks the format (OUTPUT_FORMATS)
    batch_size: int = 8  # images per captioning call
    prompt: str | None = None  # text the captions start from (families that take one)
    generation: dict[str, Any] = field(default_factory=dict)  # pipeline generation keywords
    glob: str = "**/*"  # which files of a folder input are considered (image suffixes only)
    image_column: str | None = None  # table column of paths or bytes; None tries IMAGE_COLUMNS
    chunk_size: int = DEFAULT_CHUNK_SIZE  # journal rows per crash-safe chunk
    overwrite: bool = False  # drop a previous run's output and journal and start over


@dataclass(frozen=True)
class DatasetSummary:
    """What a run did."""

    total: int  # images in the job
    captioned: int  # captioned by this run
    resumed: int  # already in the journal from an earlier run, not captioned again
    failed: int  # unreadable or undecodable, listed in failed_file
    seconds: float  # wall time of this run, start-up included
    out: Path  # the output file
    failed_file: Path | None  # NAME.failed.jsonl, when an image failed

    @property
    def images_per_s(self) -> float:
        return self.captioned / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetItem:
    """One image of the job: where its bytes are and the ``file_name`` it gets in the output."""

    file_name: str  # the output's key for it (see the module docstring)
    path: str | None = None  # file to read; None when the bytes came from a table
    data: bytes | None = None  # image bytes from a table

    def read(self) -> bytes:
        if self.path is None:
            return self.data or b""
        return Path(self.path).read_bytes()


def discover(
    inputs: Iterable[str], out: Path, glob: str = "**/*", column: str | None = None
) -> list[DatasetItem]:
    """Every image the inputs name, once each, sorted by file_name; an error for a name given twice."""
    items: dict[str, DatasetItem] = {}
    for item in expand(inputs, out.absolute().parent, glob, column):
        seen = items.setdefault(item.file_name, item)
        if seen != item:
            raise KilnError(
                f"two inputs give the output name {item.file_name!r} ({seen.path or 'table bytes'}, "
                f"{item.path or 'table bytes'}): caption them into separate outputs."
            )
    if not items:
        raise ImageInputError(
            f"no images found in {', '.join(map(str, inputs))}: pass image files, folders of "
            f"{'/'.join(sorted(IMAGE_SUFFIXES))} files, .txt lists or .jsonl/.parquet tables."
        )
    return [items[name] for name in sorted(items)]


def expand(
    inputs: Iterable[str], base: Path, glob: str = "**/*", column: str | None = None
) -> Iterator[DatasetItem]:
    """The images the inputs name, in the order given (folders sorted), file_names relative to ``base``."""
    for text in inputs:
        yield from _expand(Path(text), base, glob, column)


def _expand(path: Path, base: Path, glob: str, column: str | None) -> Iterator[DatasetItem]:
    if is_uri(str(path)):
        raise KilnError(f"{path} is a URI: read it with --engine ray (any file source Ray Data reads).")
    if path.is_dir():
        root = path.absolute()
        for file in sorted(root.glob(glob)):
            relative = file.relative_to(root)
            hidden = any(part.startswith(".") for part in relative.parts)  # journals, .git, .DS_Store
            if file.is_file() and not hidden and file.suffix.lower() in IMAGE_SUFFIXES:
                yield _file_item(file, base, relative.as_posix())
    elif path.suffix.lower() == ".txt" and path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                yield _file_item(path.absolute().parent / line.strip(), base, None)
    elif path.suffix.lower() in TABLE_READERS and path.is_file():
        yield from _table_items(path, base, column)
    elif path.is_file() or path.suffix.lower() in IMAGE_SUFFIXES:
        yield _file_item(path.absolute(), base, None)  # a missing image fails, and is listed, when read
    else:
        raise ImageInputError(f"{path} does not exist: pass image files, folders, .txt lists or tables.")


def is_uri(text: str) -> bool:
    """A source path with a scheme (s3://, gs://, file://): read by the Ray engine, not listed here."""
    return "://" in text


def _file_item(file: Path, base: Path, relative: str | None) -> DatasetItem:
    file = Path(os.path.normpath(file))
    if file.is_relative_to(base):
        return DatasetItem(file.relative_to(base).as_posix(), path=str(file))
    return DatasetItem(relative or file.as_posix(), path=str(file))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise KilnError(f"{path} line {number} is not JSON ({error}): fix or remove it.") from error
    return rows


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet  # here, not at the top: Parquet is optional (modelkiln[ray] installs pyarrow)

    return pyarrow.parquet.read_table(path).to_pylist()


TABLE_READERS: dict[str, Callable[[Path], list[dict[str, Any]]]] = {
    ".jsonl": _read_jsonl,
    ".parquet": _read_parquet,
}


def _table_items(path: Path, base: Path, column: str | None) -> Iterator[DatasetItem]:
    rows = TABLE_READERS[path.suffix.lower()](path)
    chosen = image_column(str(path), list(rows[0]) if rows else [], column)
    for row in rows:
        yield table_item(row, chosen, str(path.absolute()), base)


def image_column(table: str, names: list[str], column: str | None) -> str:
    """The table's column of image paths or bytes: the one named, else the first of IMAGE_COLUMNS."""
    chosen = column or next((name for name in IMAGE_COLUMNS if name in names), None)
    if chosen not in names:
        raise KilnError(
            f"{table} has no image column {column or ' / '.join(IMAGE_COLUMNS)} (its columns: "
            f"{', '.join(names) or 'none'}): name the column of paths or bytes with --image-column."
        )
    return chosen


def table_item(row: dict[str, Any], column: str, table: str, base: Path) -> DatasetItem:
    """One table row's image. Bytes are named by the row's file_name column, else their Hugging Face
    struct's path, else TABLE#(sha256 prefix); a path is relative to the table's folder."""
    # A Hugging Face Image feature is a {"bytes": ..., "path": ...} struct; take its bytes when it has them.
    struct = row[column] if isinstance(row.get(column), dict) else {}
    value = (struct.get("bytes") or struct.get("path")) if struct else row.get(column)
    if isinstance(value, bytes):
        name = row.get("file_name") if column != "file_name" else None
        fallback = f"{Path(table).name}#{hashlib.sha256(value).hexdigest()[:16]}"
        return DatasetItem(name or struct.get("path") or fallback, data=value)
    if isinstance(value, str) and value:
        return _file_item(Path(table).parent / value, base, None)
    raise KilnError(
        f"{table}: a row's {column} holds {type(value).__name__}, not a path or image bytes: fix the row "
        "or name another column with --image-column."
    )


# --------------------------------------------------------------------------------------------------------
# The captioning core, shared by both engines: prepare (read, hash, decode, preprocess), then caption
# --------------------------------------------------------------------------------------------------------

# Record states: already in the journal, could not be read or decoded, preprocessed and waiting, done.
DONE, FAILED, READY, CAPTIONED = "done", "failed", "ready", "captioned"


def prepare(item: DatasetItem, preprocess: ImagePreprocessor, done: Any) -> dict[str, Any]:
    """Read, hash, decode and preprocess one image into the record ``caption_records`` takes.

    ``done`` holds the (file_name, sha256) keys already journaled: such an image is only hashed. A failed
    record's ``error`` says why; a ready one's ``pixels`` are float32 [1, 3, H, W]."""
    record = {
        "file_name": item.file_name,
        "sha256": "",
        "state": FAILED,
        "error": "",
        "text": "",
        "pixels": None,
    }
    try:
        data = item.read()
    except OSError as error:
        return record | {"error": f"cannot be read ({error}): check the path and its permissions."}
    record["sha256"] = hashlib.sha256(data).hexdigest()
    if (item.file_name, record["sha256"]) in done:
        return record | {"state": DONE}
    try:
        pixels = preprocess([_decode(item, data)])
    except ImageInputError as error:
        return record | {"error": str(error)}
    return record | {"state": READY, "pixels": pixels}


def _decode(item: DatasetItem, data: bytes) -> Image.Image:
    if item.path is not None:
        # Decoded from its path (read again, from the page cache): `kiln caption FILE`'s own code and
        # messages, EXIF orientation included.
        return load_images([item.path])[0]
    _apply_pixel_limit()
    try:
        # Image.open reads only the header; load_images decodes the rest with the runtime's messages.
        opened = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise ImageInputError(
            f"over Pillow's decompression-bomb limit ({error}): if you trust the image, raise the limit with "
            "KILN_MAX_IMAGE_PIXELS=PIXELS."
        ) from error
    except Image.UnidentifiedImageError as error:
        raise ImageInputError(f"not an image Pillow can read, or its header is corrupt ({error}).") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageInputError(f"corrupt or truncated and cannot be decoded ({error}).") from error
    return ImageOps.exif_transpose(load_images([opened])[0])


def caption_records(pipe, records: list[dict[str, Any]], prompt: str | None, generation: dict) -> list[dict]:
    """The records with every ready one captioned (state CAPTIONED, its text), pixels dropped.

    Ready images are captioned together, one call per preprocessed shape (processors that keep the
    aspect ratio make several)."""
    ready = [index for index, record in enumerate(records) if record["state"] == READY]
    texts = caption_prepared(pipe, [records[index]["pixels"] for index in ready], prompt, generation)
    results = [{**record, "pixels": None} for record in records]
    for index, text in zip(ready, texts, strict=True):
        results[index] |= {"state": CAPTIONED, "text": text}
    return results


def caption_prepared(pipe, pixels: list[np.ndarray], prompt: str | None, generation: dict) -> list[str]:
    """Captions of preprocessed images ([1, 3, H, W] each), in their order, batched by shape."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for index, array in enumerate(pixels):
        by_shape.setdefault(array.shape, []).append(index)
    texts = [""] * len(pixels)
    for indices in by_shape.values():
        ids, tokens = pipe.generate_tokens(np.concatenate([pixels[i] for i in indices]), prompt, **generation)
        for index, text in zip(indices, pipe.texts(ids, tokens), strict=True):
            texts[index] = text
    return texts


# --------------------------------------------------------------------------------------------------------
# The journal: crash-safe, order-independent chunks of results
# --------------------------------------------------------------------------------------------------------


def _write_atomically(path: Path, text: str) -> None:
    """Write a file whole or not at all, and durably: a crash leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def failed_path(out: Path) -> Path:
    """Where a job lists the images it could not read: NAME.failed.jsonl beside the output."""
    return out.with_name(f"{out.stem}.failed.jsonl")


class Journal:
    """A job's results so far: ``.NAME.parts/`` beside the output, one JSONL chunk per flush.

    Each chunk is written to a temporary name and renamed, so a kill leaves whole chunks only; rows are
    keyed by (file_name, sha256), and a key seen twice (two engines' retries) counts once."""

    def __init__(self, out: Path, settings: dict[str, Any], overwrite: bool, chunk_size: int):
        self.out, self.chunk_size = out, chunk_size
        self.folder = out.with_name(f".{out.name}.parts")
        if overwrite:
            _remove(self.folder, out, failed_path(out))
        self._open(settings)
        self.rows: dict[tuple[str, str], dict[str, Any]] = {}
        for chunk in sorted(self.folder.glob("part-*.jsonl")):
            for row in _read_jsonl(chunk):
                self.rows.setdefault((row["file_name"], row["sha256"]), row)
        self.pending: list[dict[str, Any]] = []

    def _open(self, settings: dict[str, Any]) -> None:
        job_file = self.folder / "job.json"
        for stale in self.folder.glob(".*.tmp"):  # chunks a killed run was still writing
            stale.unlink()
        if job_file.is_file():
            before = json.loads(job_file.read_text(encoding="utf-8"))
            if before != settings:
                changed = sorted(
                    key for key in settings.keys() | before.keys() if before.get(key) != settings.get(key)
                )
                raise OutputExistsError(
                    f"{self.out} was started with other settings ({', '.join(changed)} differ): re-run with "
                    "the same artifact and options to continue it, or pass --overwrite to start over."
                )
            return
        if self.out.exists():
            raise OutputExistsError(
                f"{self.out} exists and was not written by this job: pass --overwrite to replace it, or "
                "choose another --out."
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        _write_atomically(job_file, json.dumps(settings, sort_keys=True))

    def done_keys(self) -> set[tuple[str, str]]:
        """Keys a re-run skips: captioned images and images whose bytes could not be decoded."""
        return {key for key in self.rows if key[1]}

    def add(self, record: dict[str, Any]) -> None:
        key = (record["file_name"], record["sha256"])
        if record["state"] == DONE or (key in self.rows and key[1]):
            return
        row = {"file_name": key[0], "sha256": key[1]}
        row |= {"text": record["text"]} if record["state"] == CAPTIONED else {"error": record["error"]}
        self.rows[key] = row
        self.pending.append(row)
        if len(self.pending) >= self.chunk_size:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.jsonl"
            _write_atomically(self.folder / name, "".join(json.dumps(row) + "\n" for row in self.pending))
            self.pending = []

    def finish(self, keys: dict[str, str]) -> tuple[list[dict], list[dict]]:
        """Write the output (and the failed list) for these file_name -> sha256 keys, sorted by file_name;
        returns (captioned rows, failed rows)."""
        self.flush()
        rows = [self.rows[(name, keys[name])] for name in sorted(keys)]
        captioned = [{"file_name": row["file_name"], "text": row["text"]} for row in rows if "text" in row]
        failed = [{"file_name": row["file_name"], "error": row["error"]} for row in rows if "error" in row]
        write_table(self.out, captioned)
        if failed:
            _write_atomically(failed_path(self.out), "".join(json.dumps(row) + "\n" for row in failed))
        else:
            _remove(failed_path(self.out))
        return captioned, failed


def _remove(*paths: Path) -> None:
    for path in paths:
        if path.is_dir():
            for child in sorted(path.iterdir()):
                child.unlink()
            path.rmdir()
        elif path.exists():
            path.unlink()


# --------------------------------------------------------------------------------------------------------
# Output formats
# --------------------------------------------------------------------------------------------------------


def _jsonl_text(rows: list[dict[str, str]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _csv_text(rows: list[dict[str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["file_name", "text"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _write_parquet(path: Path, rows: list[dict[str, str]]) -> None:
    import pyarrow  # here, not at the top: Parquet is optional (modelkiln[ray] installs pyarrow)
    import pyarrow.parquet

    columns = {"file_name": [row["file_name"] for row in rows], "text": [row["text"] for row in rows]}
    schema = pyarrow.schema([("file_name", pyarrow.string()), ("text", pyarrow.string())])
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    pyarrow.parquet.write_table(pyarrow.table(columns, schema=schema), tmp)
    os.replace(tmp, path)


# Output extension -> writer of the (file_name, text) rows, atomically.
OUTPUT_FORMATS: dict[str, Callable[[Path, list[dict[str, str]]], None]] = {
    ".jsonl": lambda path, rows: _write_atomically(path, _jsonl_text(rows)),
    ".csv": lambda path, rows: _write_atomically(path, _csv_text(rows)),
    ".parquet": _write_parquet,
}


def check_output(out: Path) -> None:
    if out.suffix.lower() not in OUTPUT_FORMATS:
        raise KilnError(
            f"--out {out}: unknown format {out.suffix or '(no extension)'}; name the file .jsonl (metadata.jsonl "
            f"for imagefolder), .parquet or .csv."
        )
    if not out.parent.is_dir():
        raise KilnError(f"--out {out}: its folder {out.parent} does not exist; create it first.")


def write_table(out: Path, rows: list[dict[str, str]]) -> None:
    OUTPUT_FORMATS[out.suffix.lower()](out, rows)


# --------------------------------------------------------------------------------------------------------
# Engines and the API
# --------------------------------------------------------------------------------------------------------


class Engine(Protocol):
    """What runs a job's images: one result record per item (state DONE, FAILED or CAPTIONED), any order;
    a record may repeat (a retried batch), the journal keeps it once."""

    def lists(self, source: str) -> bool:
        """Whether the engine reads this input itself (else the job lists its images up front)."""
        ...

    def run(self, job: CaptionJob, items: list[DatasetItem], done: set) -> Iterator[dict[str, Any]]: ...


@dataclass(frozen=True)
class LocalEngine:
    """Caption in this process; the next batch is read and preprocessed on a thread meanwhile."""

    def lists(self, source: str) -> bool:
        return False

    def run(self, job: CaptionJob, items: list[DatasetItem], done: set) -> Iterator[dict[str, Any]]:
        """One result record per item (see prepare and caption_records), in item order."""
        pipe = job.pipeline.load()
        batches = [items[start : start + job.batch_size] for start in range(0, len(items), job.batch_size)]

        def read(batch: list[DatasetItem]) -> list[dict[str, Any]]:
            return [prepare(item, pipe.preprocess, done) for item in batch]

        with ThreadPoolExecutor(1) as reader:
            upcoming = reader.submit(read, batches[0])
            for index in range(len(batches)):
                records = upcoming.result()
                if index + 1 < len(batches):
                    upcoming = reader.submit(read, batches[index + 1])
                yield from caption_records(pipe, records, job.prompt, job.generation)


def run_job(job: CaptionJob, engine: Engine, progress: Progress | None = None) -> DatasetSummary:
    """Run a job on an engine: journal each result, then write the output and the failed list."""
    start = time.perf_counter()
    if job.batch_size < 1 or job.chunk_size < 1:
        raise KilnError(
            f"batch size and chunk size must be at least 1, got {job.batch_size} and {job.chunk_size}."
        )
    check_output(job.out)
    settings = _settings(job)
    items, total = _items(job, engine)
    journal = Journal(job.out, settings, job.overwrite, job.chunk_size)
    keys: dict[str, str] = {}
    counts = dict.fromkeys((DONE, CAPTIONED, FAILED), 0)
    try:
        for record in engine.run(job, items, journal.done_keys()):
            journal.add(record)
            if record["file_name"] not in keys:  # a retried batch may come back twice
                counts[record["state"]] += 1
            keys[record["file_name"]] = record["sha256"]
            if progress is not None:
                progress(len(keys), total)
    finally:
        journal.flush()
    _check_complete(items, keys)
    _, failed = journal.finish(keys)
    path = failed_path(job.out) if failed else None
    seconds = time.perf_counter() - start
    return DatasetSummary(len(keys), counts[CAPTIONED], counts[DONE], len(failed), seconds, job.out, path)


def _items(job: CaptionJob, engine: Engine) -> tuple[list[DatasetItem], int | None]:
    """The images listed here, and the job's image count (None when the engine lists some itself)."""
    own = [text for text in job.inputs if engine.lists(text)]
    paths = [text for text in job.inputs if not engine.lists(text)]
    items = discover(paths, job.out, job.glob, job.image_column) if paths else []
    return items, None if own else len(items)


def _settings(job: CaptionJob) -> dict[str, Any]:
    """What the captions depend on: a journal made with other settings cannot be continued."""
    manifest = read_manifest(job.pipeline.artifact)  # an ArtifactError here, before any file is written
    if manifest.task != "image-to-text":
        raise KilnError(
            f"{job.pipeline.artifact} is a {manifest.task} artifact: caption datasets with an image-to-text one."
        )
    identity = hashlib.sha256(json.dumps(manifest.files, sort_keys=True).encode()).hexdigest()
    settings = {"artifact": identity, "prompt": job.prompt, "generation": job.generation}
    return json.loads(json.dumps(settings))


def _check_complete(items: list[DatasetItem], keys: dict[str, str]) -> None:
    missing = [item.file_name for item in items if item.file_name not in keys]
    if missing:
        raise KilnError(
            f"the engine returned no result for {len(missing)} images (first: {missing[0]}); what it did "
            "return is journaled: re-run the same command to caption the rest."
        )
