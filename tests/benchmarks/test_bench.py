"""`kiln bench` on the tiny preset, end to end: reports, every variant's rows, memory and roofline."""

from __future__ import annotations

import json

import pytest

from modelkiln.benchmarks.runners import Job, stage_times
from modelkiln.cli import main

VARIANTS = ("pytorch-eager", "onnx-fp32", "int8-dynamic")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """(exit code, results folder) of one small tiny-preset run."""
    root = tmp_path_factory.mktemp("bench")
    out = root / "results"
    argv = ["bench", "--preset", "tiny", "--schemes", "int8-dynamic", "--out", str(out)]
    argv += ["--artifacts", str(root / "artifacts"), "--repeats", "2", "--warmup", "1", "--images", "2"]
    argv += ["--max-new-tokens", "8"]
    return main(argv), out


@pytest.fixture(scope="module")
def report(bench):
    return json.loads((bench[1] / "report.json").read_text())


def test_bench_writes_reports_and_plots(bench):
    code, out = bench
    assert code == 0
    for name in ("report.json", "report.md", "latency.png", "quality_vs_latency.png", "size.png"):
        assert (out / name).stat().st_size > 0, name


def test_every_variant_has_latency_and_quality(report):
    rows = {row["name"]: row for row in report["variants"]}
    assert tuple(rows) == VARIANTS
    for row in rows.values():
        latency = row["latency"]
        assert 0 < latency["p50_s"] <= latency["p90_s"] <= latency["p99_s"]
        assert latency["jobs"] == 4 and latency["tokens_per_s"] > 0
        assert {"preprocess", "encoder", "first_token", "decode_per_token"} <= set(row["stages_s"])
        assert row["quality"]["images"] == 2
    # The fp32 export decodes exactly what PyTorch decodes.
    assert rows["onnx-fp32"]["quality"]["exact_match"] == 1.0
    assert rows["int8-dynamic"]["size_bytes"] < rows["onnx-fp32"]["size_bytes"]


def test_memory_and_roofline_are_positive(report):
    assert report["machine"]["roofline"]["gemm_gflops"] > 0
    assert report["machine"]["roofline"]["read_gbps"] > 0
    assert report["machine"]["encoder_flops"] > 0
    for row in report["variants"]:
        assert row["peak_rss_bytes"] > 0
        assert row["roofline"]["decode_multiple"] > 0
        assert row["roofline"]["encoder_multiple"] > 0
    # The ONNX probe runs without torch: far below the eager process.
    rss = {row["name"]: row["peak_rss_bytes"] for row in report["variants"]}
    assert rss["onnx-fp32"] < rss["pytorch-eager"]


def test_markdown_has_the_tables(bench, report):
    text = (bench[1] / "report.md").read_text()
    for heading in (
        "## Latency",
        "## Median time per stage",
        "## Size and memory",
        "## Quality",
        "## Roofline",
    ):
        assert heading in text
    assert report["command"].startswith("kiln bench --preset tiny")
    assert report["command"] in text
    assert "torch" in report["machine"]["libraries"]


def test_stage_times_split_encoder_first_token_and_decode():
    calls = [("encoder", 0.5), ("decoder", 0.2), ("decoder", 0.1), ("decoder", 0.3)]
    stages = stage_times(0.05, calls)
    assert stages == pytest.approx(
        {"preprocess": 0.05, "encoder": 0.5, "first_token": 0.2, "decode_per_token": 0.2}
    )
    assert Job([1], "w0", 1.0).stages == {}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "tiny", "--schemes", "int3-magic"], "unknown scheme"),
        (["--preset", "tiny", "--repeats", "0"], "--repeats must be at least 1"),
    ],
)
def test_bad_requests_say_what_to_do(tmp_path, capsys, argv, message):
    assert main(["bench", *argv, "--out", str(tmp_path / "out"), "--artifacts", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
