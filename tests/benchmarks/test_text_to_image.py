"""`kiln bench --family sd3` on a tiny SD3.5 pipeline end to end: reports, every variant's stage
latencies, image quality against eager, roofline, the step profile and a peak-memory probe.

One small run (one warm-up pass, one timed pass, two prompts, two steps) is shared by the tests; the
memory probe runs once, on its own, since each probe is a fresh Python process.
"""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import TEXT_LENGTHS

from modelkiln.benchmarks.text_to_image.harness import TextToImageConfig as DiffusionBenchConfig
from modelkiln.benchmarks.text_to_image.harness import quantize_config, resolve_diffusion_source
from modelkiln.benchmarks.text_to_image.presets import DIFFUSION_PRESETS, build_sd3_pipeline
from modelkiln.benchmarks.text_to_image.probe import measure_diffusion_rss
from modelkiln.benchmarks.text_to_image.report import check_targets
from modelkiln.benchmarks.text_to_image.roofline import sd3_step_flops, step_bounds
from modelkiln.benchmarks.text_to_image.runners import Generation
from modelkiln.cli import main
from modelkiln.errors import KilnError
from modelkiln.fixtures import TEXT_TO_IMAGE_DIR

VARIANTS = ("pytorch-eager", "onnx-fp32", "int8-dynamic")
STAGES = ("pipeline", "text_encoders", "step", "vae_decode", "other")
PROMPTS, STEPS = 2, 2


@pytest.fixture(scope="module")
def bench(tmp_path_factory, tiny_diffusion):
    """(exit code, results folder, artifacts folder) of one small run on the tiny SD3.5 pipeline."""
    root = tmp_path_factory.mktemp("bench-sd3")
    out, artifacts = root / "results", root / "artifacts"
    source, export = tiny_diffusion("sd3.5-medium", max_sequence_length=TEXT_LENGTHS["sd3.5-medium"])
    # The run's shared export of it, which the bench reuses (same source weights) as a second run would.
    shutil.copytree(export, artifacts / "onnx-fp32")
    argv = [
        "bench",
        "--model",
        str(source),
        "--family",
        "sd3",
        "--schemes",
        "int8-dynamic",
        "--out",
        str(out),
    ]
    argv += ["--artifacts", str(artifacts), "--repeats", "1", "--warmup", "1", "--images", str(PROMPTS)]
    argv += ["--steps", str(STEPS), "--no-rss"]
    return main(argv), out, artifacts


@pytest.fixture(scope="module")
def report(bench):
    return json.loads((bench[1] / "report.json").read_text())


def test_bench_writes_reports_and_plots(bench):
    code, out, _ = bench
    assert code == 0
    for name in (
        "report.json",
        "report.md",
        "step_latency.png",
        "stages.png",
        "quality_vs_step.png",
        "size.png",
    ):
        assert (out / name).stat().st_size > 0, name


def test_every_variant_has_stage_latencies_and_quality(report):
    rows = {row["name"]: row for row in report["variants"]}
    assert tuple(rows) == VARIANTS
    for row in rows.values():
        for stage in STAGES:
            stats = row["latency"][stage]
            assert 0 <= stats["p50_s"] <= stats["p90_s"] <= stats["p99_s"], (row["name"], stage)
        assert row["latency"]["step"]["count"] == PROMPTS * STEPS  # one transformer call per step
        assert row["latency"]["pipeline"]["count"] == PROMPTS and row["images_per_s"] > 0
        assert row["quality"]["images"] == PROMPTS
    # The fp32 export reproduces diffusers' images from the same latents; int8 stays close.
    assert rows["onnx-fp32"]["quality"]["psnr_min"] >= 60
    assert rows["int8-dynamic"]["quality"]["psnr_min"] >= 30
    assert rows["int8-dynamic"]["precision"] == "int8"
    assert rows["int8-dynamic"]["denoiser_bytes"] < rows["onnx-fp32"]["denoiser_bytes"]


def test_roofline_and_profiles(report):
    machine = report["machine"]["roofline"]
    assert machine["gemm_gflops"] > 0 and machine["int8_gops"] > 0
    # GEMM rates sampled in the timed pass, under the load the steps saw.
    assert machine["during"]["samples"] == 1 and machine["during"]["ort_int8_gops"] > 0
    for row in report["variants"]:
        assert row["roofline"]["step_flops"] > 0 and row["roofline"]["own_multiple"] > 0
        assert row["profile"]["ops"] and row["profile"]["total_ms"] > 0
    int8 = report["variants"][2]
    # onnxruntime fuses the dynamic int8 matmuls at load.
    assert {"DynamicQuantizeMatMul", "MatMulIntegerToFloat"} & set(int8["profile"]["fused"])


def test_int8_bound_puts_linear_flops_at_the_int8_rate():
    # Synthetic rates: the bound must not depend on what this machine's GEMMs happen to reach (on a
    # busy CI runner onnxruntime's int8 GEMM measured slower than torch's fp32 one).
    machine = {
        "gemm_gflops": 100.0,
        "during": {"torch_fp32_gflops": 100.0, "ort_fp32_gflops": 80.0, "ort_int8_gops": 400.0},
    }
    flops = {"total": 10e9, "linear": 8e9, "attention": 2e9}
    int8 = step_bounds(machine, flops, "int8", step_s=0.2, eager=False)
    assert int8["fp32_bound_s"] == pytest.approx(0.1)  # every FLOP at torch's fp32 rate
    assert int8["own_bound_s"] == pytest.approx(8 / 400 + 2 / 80)
    assert int8["own_multiple"] == pytest.approx(0.2 / (8 / 400 + 2 / 80))
    assert step_bounds(machine, flops, "fp32", 0.2, eager=False)["own_bound_s"] == pytest.approx(10 / 80)
    assert step_bounds(machine, flops, "fp32", 0.2, eager=True)["own_bound_s"] == pytest.approx(0.1)


def test_markdown_has_the_tables_and_targets_only_for_a_model_that_is_not_the_tiny_preset(bench, report):
    text = (bench[1] / "report.md").read_text()
    for heading in ("## Transformer step", "## Whole pipeline", "## Median time per stage", "## Size and memory",
                    "## Quality vs PyTorch eager", "## Roofline", "## Where one step's time goes",
                    "## Targets"):  # fmt: skip
        assert heading in text
    assert {check["target"] for check in report["targets"]} and all(
        check["met"] == (check["value"] >= check["limit"]) for check in report["targets"]
    )
    # The tiny preset is random weights at toy widths: no speed target means anything there.
    assert check_targets({**report, "settings": {**report["settings"], "preset": "tiny"}}) == []


def test_memory_probe_runs_an_artifact_in_a_fresh_process(bench):
    settings = Generation(steps=1, guidance_scale=4.5, height=32, width=32, max_sequence_length=24)
    rss = measure_diffusion_rss(str(bench[2] / "int8-dynamic"), False, settings, (1, 4, 16, 16), threads=1)
    assert 50e6 < rss < 4e9


def test_analytic_step_flops_match_torchs_flop_counter():
    """The linear part equals what torch counts; torch counts no FLOPs for CPU flash attention."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    transformer = build_sd3_pipeline(DIFFUSION_PRESETS["tiny"]).transformer
    config, text = dict(transformer.config), 77 + 24
    inputs = {
        "hidden_states": torch.randn(2, 4, 16, 12),
        "encoder_hidden_states": torch.randn(2, text, config["joint_attention_dim"]),
        "pooled_projections": torch.randn(2, config["pooled_projection_dim"]),
        "timestep": torch.tensor([900.0, 900.0]),
    }
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        transformer(**inputs)
    flops = sd3_step_flops(config, latent_height=16, latent_width=12, text_tokens=text, batch=2)
    assert flops["linear"] == counter.get_total_flops()
    assert flops["attention"] > 0


def test_an_unknown_preset_or_family_lists_the_valid_ones(tmp_path, capsys):
    code = main(["bench", "--preset", "tiny", "--family", "flax", "--out", str(tmp_path)])
    assert code != 0
    assert "unknown family 'flax'. Supported families: blip" in capsys.readouterr().err.replace("\n", " ")
    with pytest.raises(
        KilnError, match=r"--preset huge: unknown for --family sd3\. Valid presets: tiny, full"
    ):
        resolve_diffusion_source(DiffusionBenchConfig(out=tmp_path, preset="huge"), log=print)


def test_bitsandbytes_schemes_are_refused_naming_the_onnx_ones(tmp_path, capsys):
    argv = [
        "bench",
        "--preset",
        "tiny",
        "--family",
        "sd3",
        "--schemes",
        "int8-dynamic,bnb-nf4",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) != 0
    err = capsys.readouterr().err.replace("\n", " ")
    assert "--schemes bnb-nf4: the text-to-image benchmark compares ONNX variants (int8-dynamic" in err
    assert not (tmp_path / "report.json").exists()


def test_shapes_pipeline_variants_are_made_for_its_own_workload(bench, tmp_path):
    """int8-static calibrates on 16 of the prompts it ships at 48 px (the built-in scenes are unknown words
    to its tokenizer) and int4 uses asymmetric blocks that fit its 64-wide rows; any other source keeps the cheap
    settings. The settings read the parent's manifest only: the tiny pipeline's, its source made the shapes
    pipeline."""
    parent = tmp_path / "artifacts" / "onnx-fp32"
    parent.mkdir(parents=True)
    manifest = json.loads((bench[2] / "onnx-fp32" / "manifest.json").read_text())
    manifest["source"]["model"] = str(TEXT_TO_IMAGE_DIR)
    (parent / "manifest.json").write_text(json.dumps(manifest))
    static = quantize_config(parent, "int8-static")
    assert (static.num_calibration, static.calibration_steps, static.image_size) == (16, 8, 48)
    assert (
        static.calibration_prompts is None
    )  # the artifact's own (tests/modelkiln/test_text_to_image_fixture)
    assert quantize_config(parent, "int4-weight").options == {"block_size": 16, "symmetric": False}
    other = quantize_config(bench[2] / "onnx-fp32", "int8-static")
    assert other.calibration_prompts is None and (other.num_calibration, other.calibration_steps) == (2, 2)
    assert quantize_config(bench[2] / "onnx-fp32", "int4-weight").options == {}
