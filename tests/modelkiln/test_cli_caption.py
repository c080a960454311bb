"""kiln caption over datasets: --out writes metadata, a run killed with SIGKILL resumes without
duplicates or gaps, and flags that do not fit together are one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from dataset_images import add_broken_images, draw_folder, shapes_captioner

from modelkiln.cli import main


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return shapes_captioner(tmp_path_factory)


def _kiln(*argv) -> list[str]:
    return [sys.executable, "-m", "modelkiln.cli", *map(str, argv)]


def test_folder_to_metadata_with_summary(artifact, tmp_path, capsys):
    truths = draw_folder(tmp_path, 12)
    broken = add_broken_images(tmp_path)
    argv = [
        "caption",
        artifact,
        tmp_path,
        "--out",
        tmp_path / "metadata.jsonl",
        "--batch-size",
        "4",
        "--json",
    ]
    assert main([str(a) for a in argv]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert (summary["total"], summary["captioned"], summary["failed"]) == (14, 12, 2)
    assert "captioned 12 of 14 images" in captured.err and "images/s" in captured.err
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert [row["file_name"] for row in rows] == sorted(truths)
    assert sum(row["text"] == truths[row["file_name"]] for row in rows) >= 11
    failed = [
        json.loads(line)["file_name"]
        for line in (tmp_path / "metadata.failed.jsonl").read_text().splitlines()
    ]
    assert failed == broken


def test_killed_run_resumes_without_duplicates_or_gaps(artifact, tmp_path):
    photos = tmp_path / "photos"
    draw_folder(photos, 240)
    out = photos / "metadata.jsonl"
    # One image per call, beams and one thread: slow enough (seconds) to be killed well before the end.
    options = ["--batch-size", "1", "--chunk-size", "5", "--num-beams", "3", "--threads", "1"]
    process = subprocess.Popen(
        _kiln("caption", artifact, photos, "--out", out, *options), stderr=subprocess.DEVNULL
    )
    parts = photos / ".metadata.jsonl.parts"
    deadline = time.monotonic() + 120
    while (
        len(list(parts.glob("part-*.jsonl"))) < 3 and process.poll() is None and time.monotonic() < deadline
    ):
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL and not out.exists(), "the run ended before it could be killed"
    journaled = sum(len(chunk.read_text().splitlines()) for chunk in parts.glob("part-*.jsonl"))
    assert 15 <= journaled < 240
    resumed = subprocess.run(
        _kiln("caption", artifact, photos, "--out", out, *options, "--json"), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["resumed"] == journaled and summary["captioned"] == 240 - journaled
    # The same file as a run that was never interrupted (written beside the folder: names start photos/).
    again = tmp_path / "again.jsonl"
    assert main(["caption", str(artifact), str(photos), "--out", str(again), *options]) == 0
    expected = again.read_text().replace('"file_name": "photos/', '"file_name": "')
    assert out.read_text() == expected


def test_flags_that_do_not_fit(artifact, tmp_path, capsys):
    draw_folder(tmp_path, 1)
    cases = [
        (["--out", tmp_path / "m.jsonl", "--workers", "2"], "--workers set the Ray engine: add --engine ray"),
        (["--out", tmp_path / "m.jsonl", "--engine", "ray", "--threads", "2"], "use --threads-per-worker"),
        (["--out", tmp_path / "m.txt"], "unknown format .txt"),
        (["--out", tmp_path / "missing" / "m.jsonl"], "does not exist; create it first"),
    ]
    for extra, message in cases:
        assert main(["caption", str(artifact), str(tmp_path), *map(str, extra)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert os.listdir(tmp_path) == ["sub"]  # nothing written
