"""Caption whole datasets: folders, path lists and tables in, training-ready metadata out, resumable.

    from modelkiln.runtime import caption_dataset
    summary = caption_dataset("shapes-captioner", ["photos/"], "photos/metadata.jsonl", batch_size=32)
    summary.captioned, summary.failed, summary.images_per_s

Inputs are image files, folders (searched recursively with ``glob``), ``.txt`` files of image paths (one
a line, relative to the list's folder), or ``.jsonl``/``.parquet`` tables with an image column holding
paths, image bytes, or Hugging Face ``{"bytes", "path"}`` image structs; the Ray engine also reads source
URIs (``s3://bucket/photos/``, ``gs://``, ``file://``), naming each image by its path below the URI, and
reads Parquet tables (local or remote) in its tasks instead of on the driver. The output is chosen by its
extension: ``metadata.jsonl`` (``file_name`` and ``text``, what ``datasets``' ``imagefolder`` and
diffusers' training scripts read), ``.parquet`` or ``.csv`` with the same two columns.

``file_name`` is the image's path relative to the output file's folder when the image lies inside it (so
``--out photos/metadata.jsonl`` over ``photos/`` is an imagefolder data set), else relative to the input
folder it was found in, else its absolute path; table rows of bytes without a name are
``TABLE#SHA`` (the first 16 hex digits of the bytes' sha256).

Nothing is lost and nothing is written twice: every result lands in a journal beside the output
(``.NAME.parts/``, a folder of JSONL chunks each written whole with an atomic rename), keyed by
``file_name`` and the sha256 of the image's bytes. A re-run of the same job after Ctrl-C or ``kill -9``
reads the journal and captions only what is missing; an image whose bytes changed is captioned again.
When every image is done the output is written (atomically) from the journal, sorted by ``file_name``,
so it is identical to an uninterrupted run's. Images that cannot be read or decoded are listed with the
reason in ``NAME.failed.jsonl`` and do not stop the run (the same bytes are not retried on re-run; an
image that could not even be read is). Greedy and beam captions do not depend on how images are batched
(up to float rounding in a near tie); sampled ones (``do_sample``) do, so a resumed sampled run is not
identical to an uninterrupted one.

Two engines run the same captioning core (``modelkiln.runtime.dataset_core``: ``prepare`` then
``caption_records``): ``local`` in this
process, reading the next batch on a thread while the current one is captioned, and ``ray``
(``modelkiln.runtime.dataset_ray``, ``pip install 'modelkiln[ray]'``), a Ray Data pipeline whose
captions stream back here into the same journal. Only numpy, Pillow and the standard library are
imported here (pyarrow for Parquet when asked for).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelkiln.errors import KilnError

from .dataset_core import (
    CaptionJob,
    DatasetItem,
    DatasetSummary,
    LocalEngine,
    PipelineSpec,
    Progress,
    discover,
    expand,
    is_uri,
    run_job,
)

__all__ = [
    "ENGINES",
    "CaptionJob",
    "DatasetItem",
    "DatasetSummary",
    "LocalEngine",
    "PipelineSpec",
    "RayEngine",
    "caption_dataset",
    "discover",
    "expand",
    "get_engine",
]


@dataclass(frozen=True)
class RayEngine:
    """Caption on Ray Data: decode and preprocess in CPU tasks, caption in an actor pool (one pipeline per
    actor, loaded once), results streamed back to this process's journal."""

    workers: int | None = None  # caption actors; None: the cluster's CPUs // threads_per_worker
    threads_per_worker: int = 1  # CPUs each actor reserves and onnxruntime threads it runs
    address: str | None = None  # an existing cluster ("auto", "ray://host:10001"); None: a local Ray
    actor: type | None = None  # the class map_batches runs per worker; None: dataset_ray.CaptionActor

    def lists(self, source: str) -> bool:
        """Source URIs (s3://, gs://, file://) and Parquet tables: Ray Data reads them in tasks."""
        return is_uri(source) or source.lower().rstrip("/").endswith(".parquet")

    def run(self, job: CaptionJob, items: list[DatasetItem], done: set) -> Iterator[dict[str, Any]]:
        """One result record per image, in any order (see LocalEngine.run)."""
        if job.pipeline.threads is not None:
            raise KilnError(
                "threads set one pipeline's threads; the Ray engine's are its threads_per_worker."
            )
        from . import dataset_ray  # here, not at the top: Ray is optional (pip install 'modelkiln[ray]')

        options = {
            "threads_per_worker": self.threads_per_worker,
            "address": self.address,
            "actor": self.actor,
        }
        return dataset_ray.run(job, items, done, workers=self.workers, **options)


# --engine name -> engine class; each is built from keyword options (RayEngine's fields).
ENGINES: dict[str, type] = {"local": LocalEngine, "ray": RayEngine}


def get_engine(name: str, **options: Any):
    if name not in ENGINES:
        raise KilnError(f"unknown engine {name!r}. Valid engines: {', '.join(ENGINES)}.")
    return ENGINES[name](**options)


def caption_dataset(
    artifact: str | os.PathLike,
    inputs: str | os.PathLike | Iterable[str | os.PathLike],
    out: str | os.PathLike,
    *,
    engine: str | LocalEngine | RayEngine = "local",
    backend: str = "cpu",
    threads: int | None = None,
    progress: Progress | None = None,
    **options: Any,
) -> DatasetSummary:
    """Caption every image of ``inputs`` into ``out`` (see the module docstring); resumes a stopped run.

    ``options`` are CaptionJob's fields (batch_size, prompt, generation, glob, image_column, chunk_size,
    overwrite); ``progress(done, total)`` is called after each image."""
    sources = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    spec = PipelineSpec(Path(artifact).absolute(), backend, threads)
    job = CaptionJob(spec, tuple(map(str, sources)), Path(out).absolute(), **options)
    return run_job(job, get_engine(engine) if isinstance(engine, str) else engine, progress)
