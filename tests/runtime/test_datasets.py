"""Dataset captioning on the local engine: folders, lists and tables in, metadata out, resumable.

The Ray engine has its own file (test_datasets_ray.py); the CLI and a run killed with SIGKILL are in
tests/modelkiln/test_cli_caption.py.
"""

from __future__ import annotations

import json
import shutil

import pyarrow
import pyarrow.parquet
import pytest
from dataset_images import add_broken_images, draw_folder, shapes_captioner

from modelkiln import runtime
from modelkiln.errors import ImageInputError, KilnError, OutputExistsError
from modelkiln.runtime.datasets import CaptionJob, LocalEngine, PipelineSpec, caption_dataset, discover


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return shapes_captioner(tmp_path_factory)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """24 drawn images (some in sub/) and two broken files: (folder, truths, broken names)."""
    folder = tmp_path_factory.mktemp("photos")
    return folder, draw_folder(folder, 24), add_broken_images(folder)


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_folder_to_imagefolder_metadata(artifact, photos, tmp_path):
    folder, truths, broken = photos
    out = folder / "metadata.jsonl"
    summary = caption_dataset(artifact, folder, out, batch_size=5, overwrite=True)
    assert (summary.total, summary.captioned, summary.failed) == (26, 24, 2)
    rows = _jsonl(out)
    assert [row["file_name"] for row in rows] == sorted(truths)  # relative to the folder, sorted
    # The same captions as the pipeline gives file by file, and the trained captioner's are right.
    pipe = runtime.load(artifact)
    direct = [
        result[0]["generated_text"] for result in pipe([str(folder / row["file_name"]) for row in rows])
    ]
    assert [row["text"] for row in rows] == direct
    assert sum(row["text"] == truths[row["file_name"]] for row in rows) >= 22
    failed = _jsonl(summary.failed_file)
    assert [row["file_name"] for row in failed] == broken
    assert all("corrupt or truncated and cannot be decoded" in row["error"] for row in failed)
    # What training scripts read: a Hugging Face imagefolder data set with a text column.
    datasets = pytest.importorskip("datasets")
    loaded = datasets.load_dataset(
        "imagefolder", data_dir=str(folder), split="train", cache_dir=str(tmp_path)
    )
    assert sorted(loaded["text"]) == sorted(row["text"] for row in rows)


def test_rerun_resumes_and_recaptions_only_changed_images(artifact, photos, tmp_path):
    folder, truths, _ = photos
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in truths:
        (copy / name).parent.mkdir(exist_ok=True)
        (copy / name).write_bytes((folder / name).read_bytes())
    out = tmp_path / "captions.jsonl"
    first = caption_dataset(artifact, copy, out, chunk_size=4)
    before = out.read_text()
    stale = tmp_path / ".captions.jsonl.parts" / ".part-1.jsonl.0f0f.tmp"  # a chunk a kill cut short
    stale.write_text('{"file_name": "sub/shape_000.png", "sha')
    again = caption_dataset(artifact, copy, out, chunk_size=4)
    assert (first.captioned, again.captioned, again.resumed) == (24, 0, 24)
    assert out.read_text() == before and not stale.exists()
    # New bytes under an old name are captioned once more, and replace the old row.
    changed = sorted(truths)[0]
    (copy / changed).write_bytes((folder / sorted(truths)[1]).read_bytes())
    third = caption_dataset(artifact, copy, out, chunk_size=4)
    rows = _jsonl(out)
    assert third.captioned == 1 and len(rows) == 24 and len({row["file_name"] for row in rows}) == 24
    assert rows[0]["text"] == rows[1]["text"]
    # Other generation settings cannot continue this journal; --overwrite starts over.
    with pytest.raises(OutputExistsError, match="generation differ"):
        caption_dataset(artifact, copy, out, generation={"num_beams": 2})
    fresh = caption_dataset(artifact, copy, out, generation={"num_beams": 2}, overwrite=True)
    assert fresh.captioned == 24 and fresh.resumed == 0


def test_lists_tables_and_formats(artifact, photos, tmp_path):
    folder, truths, _ = photos
    names = sorted(truths)[:6]
    reference = caption_dataset(
        artifact, [folder / name for name in names], folder / "six.jsonl", overwrite=True
    )
    expected = _jsonl(reference.out)
    # A .txt list and a JSONL table of paths relative to their own folder; CSV out.
    (folder / "list.txt").write_text("\n".join(names) + "\n")
    summary = caption_dataset(artifact, folder / "list.txt", folder / "six.csv", overwrite=True)
    assert summary.out.read_text().splitlines()[1:] == [
        f"{row['file_name']},{row['text']}" for row in expected
    ]
    (folder / "table.jsonl").write_text("".join(json.dumps({"file_name": name}) + "\n" for name in names))
    out = folder / "from-table.jsonl"
    caption_dataset(artifact, folder / "table.jsonl", out, overwrite=True)
    assert _jsonl(out) == expected
    # A Parquet table of Hugging Face image structs (bytes and path), Parquet out.
    structs = [{"bytes": (folder / name).read_bytes(), "path": name} for name in names]
    pyarrow.parquet.write_table(pyarrow.table({"image": structs}), tmp_path / "images.parquet")
    caption_dataset(artifact, tmp_path / "images.parquet", tmp_path / "out.parquet")
    assert pyarrow.parquet.read_table(tmp_path / "out.parquet").to_pylist() == expected


def test_bad_requests(artifact, photos, tmp_path):
    folder, _, _ = photos
    with pytest.raises(KilnError, match=r"unknown format \.txt"):
        caption_dataset(artifact, folder, tmp_path / "captions.txt")
    with pytest.raises(ImageInputError, match="no images found"):
        caption_dataset(artifact, tmp_path, tmp_path / "metadata.jsonl")
    (tmp_path / "metadata.jsonl").write_text("{}\n")
    with pytest.raises(OutputExistsError, match="not written by this job"):
        caption_dataset(artifact, folder, tmp_path / "metadata.jsonl")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "shape_001.png").write_bytes(b"x")
    with pytest.raises(KilnError, match=r"two inputs give the output name 'shape_001\.png'"):
        discover([str(folder), str(tmp_path / "other")], tmp_path / "elsewhere" / "x.jsonl")
    (tmp_path / "table.jsonl").write_text(json.dumps({"caption": "x"}) + "\n")
    with pytest.raises(KilnError, match="no image column image / file_name"):
        caption_dataset(artifact, tmp_path / "table.jsonl", tmp_path / "t.jsonl")
    text_to_image = tmp_path / "not-a-captioner"
    shutil.copytree(artifact, text_to_image)
    manifest = json.loads((text_to_image / "manifest.json").read_text())
    (text_to_image / "manifest.json").write_text(json.dumps(manifest | {"task": "text-to-image"}))
    with pytest.raises(
        KilnError, match="is a text-to-image artifact: caption datasets with an image-to-text"
    ):
        caption_dataset(text_to_image, folder, tmp_path / "t2i.jsonl")
    with pytest.raises(KilnError, match=r"unknown engine 'spark'\. Valid engines: local, ray"):
        caption_dataset(artifact, folder, tmp_path / "e.jsonl", engine="spark")


def test_engine_results_cover_every_item_once(artifact, photos):
    folder, truths, broken = photos
    items = discover([str(folder)], folder / "metadata.jsonl")
    job = CaptionJob(PipelineSpec(artifact), (str(folder),), folder / "m.jsonl")
    records = list(LocalEngine().run(job, items, done=set()))
    assert sorted(record["file_name"] for record in records) == sorted([*truths, *broken])
    assert {record["state"] for record in records} == {"captioned", "failed"}
    assert all(record["pixels"] is None for record in records)  # nothing heavy reaches the journal
