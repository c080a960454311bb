"""The Ray engine of dataset captioning (``kiln caption ... --engine ray``): the same job as a Ray Data
pipeline, on a local Ray or an existing cluster. Needs ``pip install 'modelkiln[ray]'``.

    read                         from_items over the images listed on the driver (files, folders,
                                 lists, JSONL tables), read_parquet over each Parquet table (local or
                                 remote: bytes, image structs, or paths the workers can open), and
                                 read_binary_files over each source URI (``s3://bucket/photos/``,
                                 ``gs://``, ``file:///``)
    map_batches(prepare_batch)   CPU tasks: read, sha256, decode, preprocess (``dataset_core.prepare``)
    map_batches(CaptionActor)    an actor pool, one captioning pipeline per actor, loaded once
                                 (``dataset_core.caption_records``)
    iter_batches                 captions (a few dozen bytes an image) stream back to the driver,
                                 whose journal makes the output exactly as the local engine does

Ray only schedules: the captioning core is ``modelkiln.runtime.dataset_core``'s. An actor that dies is
restarted by Ray and its batch retried; a batch seen twice is journaled once (same key). A URI's images
are named by their path below it; they and tables' rows are not counted up front, so the progress bar
has no total then.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import ray  # at the top: this module is the Ray engine, imported only when it is asked for
import ray.data

from .dataset_core import (
    IMAGE_SUFFIXES,
    CaptionJob,
    DatasetItem,
    PipelineSpec,
    caption_records,
    image_column,
    is_uri,
    prepare,
    table_item,
)
from .images import ImagePreprocessor

# CPUs a read or decode task asks for: none, so reading and decoding still run when the caption actors
# hold every CPU (on a 2-core machine, 2 actors of 1 CPU each), where asking for any would wait forever;
# Ray Data's backpressure bounds how many run at once.
DECODE_CPUS = 0
# Images per decode task at most: large enough that task overhead (a few ms) is small next to decoding
# them; fewer when that would leave a caption actor without a block to start on.
DECODE_BATCH = 64
# Each row that reaches the driver: enough for the journal, without pixels.
RESULT_COLUMNS = ("file_name", "sha256", "state", "error", "text")


def run(
    job: CaptionJob,
    items: list[DatasetItem],
    done: set,
    workers: int | None = None,
    threads_per_worker: int = 1,
    address: str | None = None,
    actor: type | None = None,
) -> Iterator[dict[str, Any]]:
    """One result record per image (any order; a retried batch may repeat some), like LocalEngine.run.

    ``workers`` caption actors (None: the cluster's CPUs // threads_per_worker) of ``threads_per_worker``
    CPUs each, on the cluster at ``address`` (None: a local Ray); ``actor`` replaces CaptionActor."""
    started = _connect(address)
    ray.data.DataContext.get_current().enable_progress_bars = False  # kiln shows its own
    try:
        workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)) // threads_per_worker)
        spec = PipelineSpec(job.pipeline.artifact, job.pipeline.backend, threads_per_worker)
        preprocess = ImagePreprocessor.from_dir(spec.artifact)
        rows_per_block = _rows_per_block(len(items), workers) if items else DECODE_BATCH
        dataset = _source(job, items, rows_per_block).map_batches(
            prepare_batch,
            batch_size=rows_per_block,  # one decode task per block: no coalescing into fewer, larger ones
            fn_kwargs={"preprocess": preprocess, "done": done},
            num_cpus=DECODE_CPUS,
            concurrency=workers,  # asking for no CPU leaves nothing else to bound the decode processes
        )
        captions = dataset.map_batches(
            actor or CaptionActor,
            batch_size=job.batch_size,
            fn_constructor_args=(spec, job.prompt, job.generation),
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=threads_per_worker,
        )  # Ray Data restarts a dead actor and retries its batch by default (max_restarts=-1)
        for batch in captions.iter_batches(batch_size=None, batch_format="numpy"):
            yield from _rows(batch)
    finally:
        if started:
            ray.shutdown()


def _connect(address: str | None) -> bool:
    """Join the cluster (or start a local Ray with this machine's cores); True when this call started it."""
    if ray.is_initialized():
        return False
    ray.init(address=address, logging_level="WARNING", log_to_driver=False, include_dashboard=False)
    return True


def _rows_per_block(count: int, workers: int) -> int:
    """At most DECODE_BATCH, and small enough for two blocks per actor."""
    return max(1, min(DECODE_BATCH, -(-count // (2 * workers))))


def _source(job: CaptionJob, items: list[DatasetItem], rows_per_block: int) -> ray.data.Dataset:
    """Rows of file_name, path ("" for bytes) and data (b"" for paths): the listed items, then each URI's."""
    rows = [
        {"file_name": item.file_name, "path": item.path or "", "data": item.data or b""} for item in items
    ]
    sources = [
        _parquet(job, text) if _is_table(text) else _files(text) for text in job.inputs if _listed_here(text)
    ]
    if rows:
        sources.insert(0, ray.data.from_items(rows, override_num_blocks=-(-len(rows) // rows_per_block)))
    return sources[0].union(*sources[1:]) if len(sources) > 1 else sources[0]


def _is_table(source: str) -> bool:
    return source.lower().rstrip("/").endswith(".parquet")


def _listed_here(source: str) -> bool:
    """The inputs RayEngine.lists: source URIs and Parquet tables."""
    return is_uri(source) or _is_table(source)


def _parquet(job: CaptionJob, source: str) -> ray.data.Dataset:
    """A Parquet table's rows, read in tasks: bytes, Hugging Face image structs or paths the workers open."""
    table = source if is_uri(source) else str(Path(source).absolute())  # workers run in another folder
    rows = ray.data.read_parquet(table, num_cpus=DECODE_CPUS)
    column = image_column(source, rows.schema().names, job.image_column)
    options = {"column": column, "table": table, "base": job.out.parent}
    return rows.map_batches(_table_rows, fn_kwargs=options, batch_format="pyarrow", num_cpus=DECODE_CPUS)


def _table_rows(batch, column: str, table: str, base: Path) -> dict[str, list]:
    items = [table_item(row, column, table, base) for row in batch.to_pylist()]
    return {
        "file_name": [item.file_name for item in items],
        "path": [item.path or "" for item in items],
        "data": [item.data or b"" for item in items],
    }


def _files(uri: str) -> ray.data.Dataset:
    """The image files under a source URI; file_name is the path below it (the file's name for a file)."""
    extensions = [suffix[1:] for suffix in sorted(IMAGE_SUFFIXES)]
    extensions += [extension.upper() for extension in extensions]
    files = ray.data.read_binary_files(
        uri, include_paths=True, file_extensions=extensions, num_cpus=DECODE_CPUS
    )
    root = uri.split("://", 1)[1].rstrip("/")  # Ray Data's paths drop the scheme
    return files.map_batches(_file_rows, fn_kwargs={"root": root}, batch_format="numpy", num_cpus=DECODE_CPUS)


def _file_rows(batch: dict[str, np.ndarray], root: str) -> dict[str, list]:
    rows = {"file_name": [], "path": [], "data": []}
    for path, data in zip(map(str, batch["path"]), batch["bytes"], strict=True):
        name = path[len(root) + 1 :] if path.startswith(root + "/") else Path(path).name
        if not any(part.startswith(".") for part in name.split("/")):  # as a local folder: no hidden files
            rows["file_name"].append(name)
            rows["path"].append("")
            rows["data"].append(data)
    return rows


def _rows(batch: dict[str, np.ndarray]) -> Iterator[dict[str, Any]]:
    columns = [batch[name] for name in RESULT_COLUMNS]
    for values in zip(*columns, strict=True):
        yield {name: str(value) for name, value in zip(RESULT_COLUMNS, values, strict=True)}


def _records(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    names = list(batch)
    return [dict(zip(names, values, strict=True)) for values in zip(*(batch[n] for n in names), strict=True)]


def prepare_batch(batch: dict[str, np.ndarray], preprocess: ImagePreprocessor, done: set) -> dict[str, list]:
    """The decode stage: ``datasets.prepare`` on every row; pixels travel as .npy bytes (any shape)."""
    records = []
    for row in _records(batch):
        item = DatasetItem(str(row["file_name"]), path=str(row["path"]) or None, data=bytes(row["data"]))
        record = prepare(item, preprocess, done)
        record["pixels"] = b"" if record["pixels"] is None else _to_npy(record["pixels"])
        records.append(record)
    return {name: [record[name] for record in records] for name in records[0]}


def _to_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class CaptionActor:
    """One captioning pipeline, loaded once per actor; each call captions a batch of prepared records."""

    def __init__(self, spec: PipelineSpec, prompt: str | None, generation: dict):
        self.pipe, self.prompt, self.generation = spec.load(), prompt, generation

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        records = _records(batch)
        for record in records:
            pixels = record["pixels"]
            record["pixels"] = np.load(io.BytesIO(pixels), allow_pickle=False) if len(pixels) else None
        results = caption_records(self.pipe, records, self.prompt, self.generation)
        return {name: [str(result[name]) for result in results] for name in RESULT_COLUMNS}
