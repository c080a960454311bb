"""The Ray engine on a local 2-CPU Ray (started once for this file): the same captions as the local
engine image for image, and every image exactly once when an actor dies mid-run."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest
from dataset_images import add_broken_images, draw_folder, shapes_captioner

from modelkiln.runtime.dataset_ray import CaptionActor
from modelkiln.runtime.datasets import RayEngine, caption_dataset

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def crash_marker(tmp_path_factory) -> Path:
    """While this file exists, CrashOnce kills its worker on the marked image (and removes the file)."""
    return tmp_path_factory.mktemp("crash") / "crash-once"


@pytest.fixture(scope="module")
def local_ray(crash_marker):
    # Ray's workers cannot import this test module: its classes travel by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    environment = {"env_vars": {"KILN_TEST_CRASH_MARKER": str(crash_marker)}}
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        logging_level="WARNING",
        log_to_driver=False,
        runtime_env=environment,
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """60 drawn images and 2 broken files, and what the local engine makes of them: (folder, artifact,
    metadata.jsonl text, failed list text)."""
    artifact = shapes_captioner(tmp_path_factory)
    folder = tmp_path_factory.mktemp("photos")
    draw_folder(folder, 60)
    add_broken_images(folder)
    summary = caption_dataset(artifact, folder, folder / "local.jsonl", batch_size=8)
    return folder, artifact, summary.out.read_text(), summary.failed_file.read_text()


def test_ray_engine_gives_the_local_engines_captions(local_ray, dataset):
    folder, artifact, expected, failed = dataset
    summary = caption_dataset(
        artifact, folder, folder / "ray.jsonl", batch_size=8, engine=RayEngine(workers=2)
    )
    assert (summary.total, summary.captioned, summary.failed) == (62, 60, 2)
    assert summary.out.read_text() == expected
    assert summary.failed_file.read_text() == failed


def test_a_source_uri_is_listed_and_read_by_ray(local_ray, dataset):
    folder, artifact, expected, failed = dataset
    summary = caption_dataset(artifact, f"file://{folder}", folder / "uri.jsonl", engine=RayEngine(workers=2))
    assert (summary.total, summary.captioned) == (62, 60)  # named by their path below the URI: the same
    assert summary.out.read_text() == expected
    # Read from bytes, not from a path: the same images fail for the same reason, worded without the path.
    as_bytes = [json.loads(line) for line in summary.failed_file.read_text().splitlines()]
    assert [row["file_name"] for row in as_bytes] == [
        json.loads(line)["file_name"] for line in failed.splitlines()
    ]
    assert all("corrupt or truncated and cannot be decoded" in row["error"] for row in as_bytes)


def test_a_parquet_table_is_read_in_ray_tasks(local_ray, dataset, tmp_path):
    folder, artifact, _, _ = dataset
    names = sorted(path.name for path in folder.glob("shape_*.png"))[:8]
    # Image structs as Hugging Face writes them: bytes without a name (named TABLE#SHA), and paths.
    structs = [{"bytes": (folder / name).read_bytes(), "path": None} for name in names[:4]]
    structs += [{"bytes": None, "path": str(folder / name)} for name in names[4:]]
    pyarrow.parquet.write_table(pyarrow.table({"image": structs}), tmp_path / "images.parquet")
    local = caption_dataset(artifact, tmp_path / "images.parquet", tmp_path / "local.jsonl")
    ray_run = caption_dataset(
        artifact, tmp_path / "images.parquet", tmp_path / "ray.jsonl", engine=RayEngine(workers=1)
    )
    assert (ray_run.total, ray_run.captioned) == (8, 8)
    assert ray_run.out.read_text() == local.out.read_text()
    assert "images.parquet#" in local.out.read_text()


class CrashOnce(CaptionActor):
    """Kills its own worker process (no exception, no cleanup) the first time it sees the marked image."""

    MARKED = "shape_031.png"

    def __call__(self, batch):
        marker = Path(os.environ["KILN_TEST_CRASH_MARKER"])
        if self.MARKED in set(batch["file_name"]) and marker.exists():
            marker.unlink()
            os._exit(1)
        return super().__call__(batch)


def test_actor_killed_mid_run_still_yields_every_image_once(local_ray, dataset, crash_marker):
    folder, artifact, expected, _ = dataset
    crash_marker.touch()
    engine = RayEngine(workers=2, actor=CrashOnce)
    out = folder / "crashed.jsonl"
    summary = caption_dataset(artifact, folder, out, batch_size=8, engine=engine, chunk_size=4)
    assert not crash_marker.exists(), "the marked image never reached an actor, so nothing was killed"
    assert summary.captioned == 60 and out.read_text() == expected
