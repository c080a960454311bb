"""`kiln bench` on the tiny preset, end to end: reports, every variant's rows, memory and roofline.

The optimum-onnx peer is tested from a recorded line of its serve loop: no test creates its virtualenv.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from conftest import vit_gpt2_export
from dataset_images import shapes_captioner

from modelkiln.benchmarks.captioning import peers, roofline
from modelkiln.benchmarks.captioning.harness import CaptioningConfig as BenchConfig
from modelkiln.benchmarks.captioning.harness import (
    Measured,
    artifact_bytes,
    eager_bytes,
    quantize_config,
    variant_row,
)
from modelkiln.benchmarks.captioning.quality import SHAPES_IMAGES
from modelkiln.benchmarks.captioning.report import bandwidth_line, check_targets, targets_table, write_reports
from modelkiln.benchmarks.captioning.runners import EagerRunner, Job, stage_times
from modelkiln.benchmarks.core import variants
from modelkiln.benchmarks.core.timing import EAGER, Timings
from modelkiln.cli import main

VARIANTS = ("pytorch-eager", "onnx-fp32", "int8-dynamic")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """(exit code, results folder) of one small tiny-preset run."""
    root = tmp_path_factory.mktemp("bench")
    out = root / "results"
    # The shipped captioner's fp32 export, made once per test run, is reused by the bench's shapes
    # quality check (same source weights), as a second bench run reuses its own.
    shutil.copytree(shapes_captioner(tmp_path_factory), root / "artifacts" / "shapes-captioner" / "onnx-fp32")
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
    # Bandwidth sampled between the two timed passes; the decode bounds divide by its median.
    during = report["machine"]["roofline"]["during"]
    spread = during["spread"]["read_gbps"]
    assert (
        during["samples"] == 2
        and 0 < spread["min"] <= during["read_gbps"] == spread["median"] <= spread["max"]
    )
    # The bounds read at the probe's median, or at the fastest stream a decoder showed if that is higher:
    # no variant decodes faster than its bound.
    rows = report["variants"]
    streamed = max(
        r["roofline"]["decoder_weight_bytes"] / r["stages_s"]["decode_per_token"] / 1e9 for r in rows
    )
    assert report["machine"]["roofline"]["observed_read_gbps"] == pytest.approx(streamed)
    fp32 = next(row for row in rows if row["name"] == "onnx-fp32")["roofline"]
    read = max(spread["median"], streamed)
    assert fp32["decode_bound_s"] == pytest.approx(fp32["decoder_weight_bytes"] / (read * 1e9))
    assert all(row["roofline"]["decode_multiple"] >= 1 - 1e-9 for row in rows)
    assert report["machine"]["encoder_flops"] > 0
    for row in report["variants"]:
        assert row["peak_rss_bytes"] > 0
        assert row["roofline"]["decode_multiple"] > 0
        assert row["roofline"]["encoder_multiple"] > 0
    # The ONNX probe runs without torch: far below the eager process.
    rss = {row["name"]: row["peak_rss_bytes"] for row in report["variants"]}
    assert rss["onnx-fp32"] < rss["pytorch-eager"]


def test_schemes_are_checked_on_the_trained_shapes_captioner(report):
    """The random preset's captions say little; the shipped captioner's can be right or wrong."""
    (row,) = report["shapes_quality"]
    assert row["scheme"] == "int8-dynamic" and row["images"] == SHAPES_IMAGES
    assert row["parent_accuracy_vs_truth"] >= 0.9  # the fp32 export captions what was drawn
    assert 0.0 <= row["agreement"] <= 1.0 and 0.0 <= row["accuracy_vs_truth"] <= 1.0


def test_markdown_has_the_tables(bench, report):
    text = (bench[1] / "report.md").read_text()
    for heading in (
        "## Latency",
        "## Median time per stage",
        "## Size and memory",
        "## Quality",
        "## Quality on the trained shapes captioner",
        "## Roofline",
    ):
        assert heading in text
    assert "memory read" in text and "samples taken between the timed passes" in text
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
        (["--preset", "tiny", "--peers", "vllm"], "unknown peer. Valid peers: optimum"),
    ],
)
def test_bad_requests_say_what_to_do(tmp_path, capsys, argv, message):
    assert main(["bench", *argv, "--out", str(tmp_path / "out"), "--artifacts", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


# One line of optimum_peer.py's serve loop, recorded on the tiny preset (4 tokens).
PEER_LINE = {
    "image": 0,
    "tokens": [7, 7, 19, 33],
    "text": "w3 w3 w15 w29",
    "total_s": 0.082,
    "preprocess_s": 0.001,
    "calls": [
        ["encoder", 0.004],
        ["decoder", 0.018],
        ["decoder", 0.0175],
        ["decoder", 0.0095],
        ["decoder", 0.0015],
    ],
}


def _decode(tokens: list[int]) -> str:
    return " ".join(f"w{token - 4}" for token in tokens)  # the presets' word-level vocabulary


def test_peer_line_parses_into_a_job():
    job = peers.parse_job(PEER_LINE, _decode)
    assert job.tokens == [7, 7, 19, 33] and job.text == "w3 w3 w15 w29" and job.total_s == 0.082
    assert job.stages == pytest.approx(
        {"preprocess": 0.001, "encoder": 0.004, "first_token": 0.018, "decode_per_token": 0.0095}
    )


def _row(name: str, seconds: float, tokens: list[int], baseline: Timings | None, context: dict) -> dict:
    job = peers.parse_job({**PEER_LINE, "total_s": seconds, "tokens": tokens}, _decode)
    timings = Timings(first_pass=[job], jobs=[job, job])
    return variant_row(name, Measured(name, 1000, 500, 2000), timings, baseline or timings, context)


def test_peer_row_and_lines_in_the_report(tmp_path):
    context = {
        "config": BenchConfig(out=tmp_path, max_new_tokens=4),
        "machine": {"read_gbps": 10.0},
        "flops": None,
    }
    eager = _row(EAGER, 0.3, PEER_LINE["tokens"], None, context)
    baseline = Timings(first_pass=[peers.parse_job(PEER_LINE, _decode)])
    fp32 = _row("onnx-fp32", 0.1, PEER_LINE["tokens"], baseline, context)
    peer = _row("optimum-onnx", 0.2, [7, 7, 19, 8], baseline, context)
    assert peer["quality"]["token_agreement"] == 0.75 and peer["roofline"]["decode_multiple"] > 0
    setup = peers.PeerSetup(
        "optimum", "optimum-onnx", tmp_path, tmp_path, tmp_path, {"optimum-onnx": "0.1.0"}
    )
    report = {
        "command": "kiln bench --peers optimum",
        "source": "src",
        "settings": {"images": 1, "repeats": 2, "warmup": 0, "max_new_tokens": 4, "threads": 2},
        "machine": {"cpu": "cpu", "cores": 2, "roofline": {"gemm_gflops": 1.0, "read_gbps": 10.0}},
        "variants": [eager, fp32, peer],
        "peers": [peers.ran(setup), peers.not_run("optimum", "blip")],
    }
    write_reports(report, tmp_path, plots=False)
    text = (tmp_path / "report.md").read_text()
    assert "speed-up vs optimum-onnx (p50)" in text and "| optimum-onnx | 200.0 |" in text
    assert "optimum-onnx cannot run family blip: it runs vit-gpt2 only" in text
    check = next(c for c in report["targets"] if "optimum-onnx" in c["target"])
    # 2.0x the peer falls short of the 2.5x target issue 13 set.
    assert check["value"] == pytest.approx(2.0) and check["limit"] == 2.5 and not check["met"]


def test_peer_skips_a_family_it_cannot_run_without_a_venv(monkeypatch, tmp_path):
    from modelkiln import registry
    from modelkiln.exporters import source

    class Family:
        name = "blip"

    monkeypatch.setattr(source, "resolve_source", lambda model: type("S", (), {"config": {}})())
    monkeypatch.setattr(registry, "detect_family", lambda config, model: Family)
    monkeypatch.setattr(peers, "ensure_venv", lambda *args: pytest.fail("no venv for a family it cannot run"))
    setups, notes = peers.prepare_peers(("optimum",), "blip-src", tmp_path, tmp_path, lambda message: None)
    assert setups == [] and notes == [peers.not_run("optimum", "blip")] and not notes[0]["ran"]


def test_targets_table_says_how_far_a_miss_is():
    checks = [
        {"target": "int8 end-to-end speed-up vs eager", "limit": 3, "value": 2.9, "met": False},
        {"target": "int4 size vs fp32 ONNX", "limit": 0.2, "value": 0.18, "met": True},
    ]
    table = targets_table(checks)
    assert "| int8 end-to-end speed-up vs eager | 3 | 2.900 | MISSED | 0.100 beyond the limit |" in table
    assert "| int4 size vs fp32 ONNX | 0.2 | 0.180 | met | - |" in table


@pytest.mark.parametrize(("family", "config"), [("vit-gpt2", "a"), ("blip", "b"), ("blip-2", "a")])
def test_eager_decode_bound_reads_the_declared_decoder_of_every_family(
    family, config, captioner_export, tmp_path_factory
):
    """The eager per-token bound counts the same step weights as the ONNX decoder, plus what eager
    recomputes each step that the export moved to the encoder graph (cross-attention K/V projections)."""
    source, artifact = (
        vit_gpt2_export(tmp_path_factory, config)
        if family == "vit-gpt2"
        else captioner_export(family, config)
    )
    runner = EagerRunner(str(source), threads=1, max_new_tokens=2)
    _, eager = eager_bytes(runner, str(source))
    _, onnx_step = artifact_bytes(artifact)
    parameters = dict(torch.nn.ModuleList(runner.decoder_modules).named_parameters())
    cross = sum(
        p.numel() * p.element_size()
        for name, p in parameters.items()
        if "crossattention" in name and any(kv in name for kv in ("c_attn", "key", "value"))
    )
    # Untrained norms and biases are equal tensors (ones, zeros), which the exporter stores once.
    vectors = sum(p.numel() * p.element_size() for p in parameters.values() if p.dim() == 1)
    assert onnx_step + cross <= eager <= onnx_step + cross + vectors


def test_bandwidth_line_says_when_a_decoder_outran_the_probe():
    roof = {
        "read_gbps": 20.0,
        "during": {
            "samples": 3,
            "read_gbps": 15.7,
            "spread": {
                "read_gbps": {"median": 15.7, "min": 14.0, "max": 21.3},
                "torch_fp32_gflops": {"median": 160.0, "min": 150.0, "max": 170.0},
            },
        },
    }
    assert "streamed" not in bandwidth_line({**roof, "observed_read_gbps": 15.0})
    line = bandwidth_line({**roof, "observed_read_gbps": 19.8})
    assert "A decoder streamed its weights at 19.8 GB/s, faster than the probe's median" in line
    assert roofline.read_rate({**roof, "observed_read_gbps": 19.8}) == 19.8
    assert roofline.read_rate({**roof, "observed_read_gbps": None}) == 15.7


def test_a_target_several_variants_can_meet_checks_the_best_of_them_and_names_it():
    def row(name, p50, decode_multiple):
        return {
            "name": name,
            "latency": {"p50_s": p50},
            "size_bytes": 100,
            "roofline": {"decode_multiple": decode_multiple},
        }

    rows = [row("pytorch-eager", 1.0, 2.0), row("int8-dynamic", 0.2, 1.5), row("int8-static", 0.25, 1.2)]
    checks = {c["target"]: c for c in check_targets({"variants": rows})}
    decode = checks["int8 decode vs bandwidth bound (best: int8-static)"]
    assert decode["value"] == 1.2 and decode["met"]
    speed = checks["int8 end-to-end speed-up vs eager (best: int8-dynamic)"]
    assert speed["value"] == pytest.approx(5.0) and speed["met"]
    # A target none of whose variants ran is left out, not reported as missed.
    assert not any(name.startswith("int4") for name in checks)


def test_a_variant_below_a_quantize_gate_is_a_marked_row_and_gate_makes_it_fail(
    bench, report, tmp_path, capsys
):
    # A copy of the run's int8 variant whose recorded figures miss the default empty-caption gate.
    import shutil

    variant = tmp_path / "weak-int8"
    shutil.copytree(bench[1].parent / "artifacts" / "int8-dynamic", variant)
    manifest = json.loads((variant / "manifest.json").read_text())
    manifest["quantization"]["quality"]["new_empty_captions"] = 3
    (variant / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "results"
    argv = ["bench", "--model", report["source"], "--variant", str(variant), "--out", str(out), "--no-rss"]
    argv += ["--artifacts", str(bench[1].parent / "artifacts")]  # reuses the shapes captioner's variants
    argv += ["--repeats", "1", "--warmup", "0", "--images", "1", "--max-new-tokens", "4", "--json"]
    assert main([*argv, "--gate"]) == 1
    captured = capsys.readouterr()
    assert "1 variant(s) missed their quality gates: int8-dynamic" in captured.err
    rows = {row["name"]: row for row in json.loads(captured.out)["variants"]}
    assert rows["int8-dynamic"]["gate"] == ["3 empty captions where the parent captioned > --max-new-empty 0"]
    assert rows["pytorch-eager"]["p50_s"] > 0  # the other rows are all there
    assert "| MISSED: 3 empty captions where the parent captioned" in (out / "report.md").read_text()


def test_a_made_variant_is_reused_only_while_its_quantize_settings_match(bench, monkeypatch):
    artifacts = bench[1].parent / "artifacts"
    made = []
    monkeypatch.setattr(variants, "quantize_artifact", lambda parent, out, config, log: made.append(config))
    parent, variant, logged = artifacts / "onnx-fp32", artifacts / "int8-dynamic", []
    variants._quantize(parent, "int8-dynamic", variant, logged.append, quantize_config)
    assert made == [] and logged == [f"reusing {variant}"]

    def asking(options):
        return lambda parent, scheme: replace(quantize_config(parent, scheme), options=options)

    # A scheme's default asked for by name is the same request: reused. A changed option is not.
    variants._quantize(parent, "int8-dynamic", variant, logged.append, asking({"per_channel": True}))
    assert made == []
    variants._quantize(parent, "int8-dynamic", variant, logged.append, asking({"per_channel": False}))
    assert [config.options for config in made] == [{"per_channel": False}]


def test_a_pickle_only_source_is_refused_with_what_to_do(small_source, tmp_path, capsys):
    (tmp_path / "config.json").write_text((small_source / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    assert main(["bench", "--model", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert (
        "holds only pickle weights" in err
        and "safe_serialization=True" in err
        and "--allow-pickle" not in err
    )
