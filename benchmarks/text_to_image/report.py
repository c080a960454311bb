"""Write a text-to-image benchmark report: report.json (everything) and report.md (tables first).

    report = assemble_report(config, source, family, settings, machine, rows)
    write_diffusion_reports(report, Path("bench"), plots=True)

Speed-ups are against the first row (the diffusers pipeline in PyTorch eager fp32), sizes against the
fp32 ONNX export. The step targets are checked on every run but the tiny preset's, whose
millisecond steps say nothing about the full model; a missed target states by how much.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from modelkiln.registry import get_family

from ..core.tables import (
    machine_info,
    mb,
    ms,
    plain_json,
    settings_of,
    size_share,
    table,
    times,
    write_report_files,
)
from .plots import write_diffusion_plots

# The step targets: (what, variant, figure of derived(), limit); higher is better for each.
TARGETS = (
    ("transformer step: ONNX fp32 vs PyTorch eager", "onnx-fp32", "step_speedup", 1.3),
    ("transformer step: int8-dynamic vs PyTorch eager", "int8-dynamic", "step_speedup", 1.8),
)
# Flux and SD 1.x steps: int8 at least twice eager, fp32 no slower than eager.
STEP_TARGETS = (
    ("denoiser step: ONNX fp32 vs PyTorch eager", "onnx-fp32", "step_speedup", 1.0),
    ("denoiser step: int8-dynamic vs PyTorch eager", "int8-dynamic", "step_speedup", 2.0),
)
FAMILY_TARGETS = {"sd3": TARGETS, "flux": STEP_TARGETS, "stable-diffusion": STEP_TARGETS}  # family -> targets
UNTARGETED_PRESETS = (
    "tiny",
    "tiny-schnell",
)  # presets whose timings are too small to hold against the targets


def assemble_report(config, source: str, family: str, settings, machine: dict, rows: list[dict]) -> dict:
    report = {
        "task": "text-to-image",
        "command": config.command,
        "source": source,
        "family": family,
        "settings": settings_of(config),
        "generation": asdict(settings),
        "machine": {**machine_info(), "roofline": machine},
        "variants": rows,
    }
    return plain_json(report)


def derived(report: dict) -> dict[str, dict]:
    """Per variant: step and pipeline speed-ups vs eager (p50), size vs the fp32 ONNX export."""
    rows = report["variants"]
    eager = rows[0]["latency"]
    fp32 = next((row["size_bytes"] for row in rows if row["name"] == "onnx-fp32"), None)
    return {
        row["name"]: {
            "step_speedup": eager["step"]["p50_s"] / row["latency"]["step"]["p50_s"],
            "pipeline_speedup": eager["pipeline"]["p50_s"] / row["latency"]["pipeline"]["p50_s"],
            "size_ratio": row["size_bytes"] / fp32 if fp32 and row is not rows[0] else None,
        }
        for row in rows
    }


def check_targets(report: dict) -> list[dict]:
    if report["settings"].get("preset") in UNTARGETED_PRESETS:
        return []
    figures = derived(report)
    checks = []
    for what, variant, key, limit in FAMILY_TARGETS.get(report["family"], TARGETS):
        value = figures.get(variant, {}).get(key)
        if value is not None:
            # The share of its step time the variant would still have to lose to meet the limit.
            short = max(0.0, 1 - value / limit)
            checks.append(
                {"target": what, "limit": limit, "value": value, "met": value >= limit, "shortfall": short}
            )
    return checks


def _pcts(stats: dict) -> list[str]:
    return [ms(stats["p50_s"]), ms(stats["p90_s"]), ms(stats["p99_s"])]


def step_table(report: dict) -> list[str]:
    figures = derived(report)
    rows = []
    for row in report["variants"]:
        roof = row["roofline"]
        cells = [row["name"], *_pcts(row["latency"]["step"]), times(figures[row["name"]]["step_speedup"])]
        rows.append([*cells, ms(roof.get("own_bound_s")), times(roof.get("own_multiple"))])
    header = ["variant", "p50 ms", "p90 ms", "p99 ms", "speed-up vs eager (p50)"]
    return table([*header, "own FLOP bound ms", "step / own bound"], rows)


def pipeline_table(report: dict) -> list[str]:
    figures = derived(report)
    rows = [
        [row["name"], *_pcts(row["latency"]["pipeline"]), times(figures[row["name"]]["pipeline_speedup"]),
         f"{row['images_per_s']:.3f}"]
        for row in report["variants"]
    ]  # fmt: skip
    return table(["variant", "p50 ms", "p90 ms", "p99 ms", "speed-up vs eager (p50)", "images/s"], rows)


def stage_table(report: dict) -> list[str]:
    names = ("text_encoders", "step", "vae_decode", "other")
    rows = [[row["name"], *(ms(row["latency"][n]["p50_s"]) for n in names)] for row in report["variants"]]
    return table(["variant", "text encoders ms", "one step ms", "VAE decode ms", "other ms"], rows)


def size_table(report: dict) -> list[str]:
    figures = derived(report)
    rows = []
    for row in report["variants"]:
        ratio = figures[row["name"]]["size_ratio"]
        rows.append([row["name"], row["precision"], mb(row["size_bytes"]), size_share(ratio),
                     mb(row["denoiser_bytes"]), mb(row["peak_rss_bytes"])])  # fmt: skip
    return table(
        ["variant", "denoiser precision", "size MB", "of fp32 ONNX", "denoiser MB", "peak RSS MB"], rows
    )


def quality_table(report: dict) -> list[str]:
    rows = []
    for row in report["variants"][1:]:
        q = row["quality"]
        cells = [
            f"{q['psnr_mean']:.1f}",
            f"{q['psnr_min']:.1f}",
            f"{q['ssim_mean']:.4f}",
            f"{q['max_pixel_diff']:.1f}",
        ]
        rows.append([row["name"], *cells])
    return table(["variant", "PSNR mean dB", "PSNR min dB", "SSIM mean", "max pixel diff (0-255)"], rows)


def prompt_accuracy_table(report: dict) -> list[str]:
    """Prompt accuracy per variant (the shipped shapes pipeline only): exact, per attribute, PSNR vs
    eager and the step speed-up, so a scheme's cost in correctness sits beside its gain in speed."""
    if report["variants"][0].get("prompt_accuracy") is None:
        return []
    figures, rows = derived(report), []
    for row in report["variants"]:
        accuracy = row["prompt_accuracy"]
        psnr = "-" if row is report["variants"][0] else f"{row['quality']['psnr_mean']:.1f}"
        cells = [f"{accuracy['exact']:.1%}", *(f"{v:.1%}" for v in accuracy["attributes"].values())]
        weakest = accuracy["weakest"] if accuracy["exact"] < 1 else "-"
        rows.append([row["name"], *cells, weakest, psnr, f"{figures[row['name']]['step_speedup']:.2f}x"])
    names = list(report["variants"][0]["prompt_accuracy"]["attributes"])
    header = ["variant", "prompt accuracy", *names, "weakest", "PSNR vs eager dB", "step vs eager"]
    first = report["variants"][0]["prompt_accuracy"]
    note = (
        f"{first['prompts']} shapes prompts x {first['rounds']} seeded latents each, generated at the fixture's "
        "defaults and read back by the shipped shapes captioner; exact = the caption equals the prompt."
    )
    return [note, "", *table(header, rows)]


def roofline_table(report: dict) -> list[str]:
    rows = []
    for row in report["variants"]:
        roof = row["roofline"]
        flops = roof.get("step_flops")
        rows.append([
            row["name"], "-" if flops is None else f"{flops / 1e9:.1f}", ms(roof.get("fp32_bound_s")),
            ms(roof.get("own_bound_s")), ms(row["latency"]["step"]["p50_s"]),
            times(roof.get("fp32_multiple")), times(roof.get("own_multiple")),
        ])  # fmt: skip
    header = ["variant", "step GFLOP", "torch fp32 bound ms", "own bound ms", "step p50 ms"]
    return table([*header, "step / torch fp32 bound", "step / own bound"], rows)


def rates_line(report: dict) -> list[str]:
    """The GEMM rates the bounds divide by, and what each variant's own bound is."""
    during = report["machine"]["roofline"].get("during") or {}
    if not during:
        return ["Bounds use the GEMM rates measured at start.", ""]
    return [
        f"GEMM rates during timing (medians of {during['samples']} passes, {2048}^2): torch fp32 "
        f"{during['torch_fp32_gflops']} GFLOP/s, onnxruntime fp32 {during['ort_fp32_gflops']} GFLOP/s, "
        f"onnxruntime int8 {during['ort_int8_gops']} GOP/s. Own bound: every FLOP at the variant's runtime's "
        "fp32 rate; for int8/int4 denoisers the linear FLOPs at the int8 rate plus attention at fp32.",
        "",
    ]


def _ops(profile: dict) -> str:
    return ", ".join(
        f"{op['op']} {op['share']:.0%}" + (f" ({op['nodes']})" if op["nodes"] else "")
        for op in profile["ops"]
    )


def profile_table(report: dict) -> list[str]:
    rows = []
    for row in report["variants"]:
        profile = row.get("profile")
        if profile:
            fused = ", ".join(f"{op} x{n}" for op, n in sorted(profile["fused"].items())) or "-"
            rows.append([row["name"], f"{profile['total_ms']:.0f}", _ops(profile), fused])
    return (
        table(["variant", "profiled step ms", "time by op (nodes)", "fused ops at load"], rows)
        if rows
        else []
    )


def _shortfall(check: dict) -> str:
    if check["met"]:
        return "-"
    # Three decimals: a near miss must not print as "1.80x" against a 1.8x limit.
    return f"{check['limit'] - check['value']:.3f}x short: the step needs {check['shortfall']:.1%} less time"


def targets_table(checks: list[dict]) -> list[str]:
    rows = [
        [
            c["target"],
            f"{c['limit']:g}x",
            f"{c['value']:.3f}x",
            "met" if c["met"] else "MISSED",
            _shortfall(c),
        ]
        for c in checks
    ]
    return table(["target", "limit", "measured (p50 ratio)", "", "by how much"], rows)


def _intro(report: dict) -> list[str]:
    machine, settings, gen = report["machine"], report["settings"], report["generation"]
    roof = machine["roofline"]
    guided = gen["guidance_scale"] > 1 and get_family(report["family"]).bench.guided_batch == 2
    batch = "2 (guided: negative and positive prompt)" if guided else "1"
    return [
        "# kiln bench (text-to-image)",
        "",
        f"`{report['command']}`",
        "",
        f"Source `{report['source']}` ({report['family']}); {settings['prompts']} prompts x "
        f"{settings['repeats']} repeats after {settings['warmup']} warm-up, one image per prompt, "
        f"{gen['height']}x{gen['width']}, {gen['steps']} steps, guidance {gen['guidance_scale']}, "
        f"{gen['max_sequence_length']} T5 tokens; every transformer call has batch {batch}. Same initial "
        f"latents for every variant; timed round-robin; {settings['threads']} threads. {machine['cpu']} "
        f"({machine['cores']} cores), at start: fp32 GEMM {roof['gemm_gflops']} GFLOP/s (torch), int8 GEMM "
        f"{roof.get('int8_gops')} GOP/s (onnxruntime), memory read {roof['read_gbps']} GB/s.",
        "",
    ]


def markdown(report: dict) -> str:
    sections = [
        ("## Transformer step (one denoiser call)", step_table(report)),
        ("## Whole pipeline per image", pipeline_table(report)),
        ("## Median time per stage", stage_table(report)),
        ("## Size and memory", size_table(report)),
        ("## Quality vs PyTorch eager images (same latents)", quality_table(report)),
        ("## Prompt accuracy (does each image show what its prompt says?)", prompt_accuracy_table(report)),
        ("## Roofline of one step (FLOPs / GEMM rate)", [*rates_line(report), *roofline_table(report)]),
        ("## Where one step's time goes (onnxruntime / torch profiler)", profile_table(report)),
    ]
    if report["targets"]:
        sections.append(("## Targets", targets_table(report["targets"])))
    lines = _intro(report)
    for heading, rows in sections:
        lines += [heading, "", *rows] if rows else []
    return "\n".join(lines)


def write_diffusion_reports(report: dict, out: Path, plots: bool) -> list[Path]:
    """report.json, report.md and (with matplotlib) PNG plots; returns the files written."""
    report["targets"] = check_targets(report)
    return write_report_files(report, out, markdown, write_diffusion_plots if plots else None)
