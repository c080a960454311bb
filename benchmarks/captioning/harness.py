"""`kiln bench`: latency, throughput, memory, size, quality and roofline of every captioning variant vs PyTorch.

    from modelkiln.benchmarks.captioning.harness import CaptioningConfig, run_bench
    report = run_bench(CaptioningConfig(out=Path("bench"), preset="tiny", schemes=("int8-dynamic",)))
    # bench/report.json, bench/report.md, bench/*.png

Every variant (the PyTorch eager fp32 baseline first, then each ONNX artifact, then each peer
toolchain asked for with ``peers``) captions the same drawn images, batch 1, greedy, exactly
``max_new_tokens`` tokens. Variants are timed round-robin, image by image, so the machine's drift over
minutes hits all of them alike; a peer runs in its own virtualenv's process but takes its turn in the
same rounds (see ``peers``).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelkiln.exporters.source import resolve_source as resolve_model
from modelkiln.fixtures import shapes
from modelkiln.manifest import read_manifest
from modelkiln.quantize.quantize import QuantizeConfig

from ..core import roofline as machine_roofline
from ..core.config import BenchConfig, TaskOptions, check_config
from ..core.source import model_or_preset
from ..core.tables import machine_info, plain_json, settings_of
from ..core.timing import EAGER, Schedule, Timings, percentiles, time_variants
from ..core.variants import Variant, prepare_variants, variant_gate
from . import roofline
from .peers import PeerRunner, PeerSetup, check_peers, default_root, prepare_peers
from .probe import measure_rss
from .quality import caption_agreement, shapes_quality
from .report import write_reports
from .runners import EagerRunner, Job, OrtRunner

IMAGE_SEEDS = 80_000  # drawn benchmark images: away from training, validation and quantize seeds
QUALITY_IMAGES = 4  # kiln quantize's own quality check: the benchmark measures quality itself


@dataclass(frozen=True)
class CaptioningConfig(BenchConfig):
    """One captioning benchmark run: the shared fields, then the captioner's."""

    images: int = 4  # drawn images per pass
    max_new_tokens: int = 16  # tokens every variant decodes (min_new_tokens is set to the same)
    peers: tuple[str, ...] = ()  # other toolchains to time beside the variants (keys of peers.PEERS)
    peers_dir: Path | None = None  # where peer virtualenvs live; None: ~/.cache/modelkiln/peers

    @property
    def peers_root(self) -> Path:
        return self.peers_dir or default_root()


def configure(base: BenchConfig, options: TaskOptions) -> CaptioningConfig:
    """The captioning config of a request: images per pass, tokens and peers from ``options``."""
    return CaptioningConfig(
        **vars(base),
        images=options.per_pass,
        max_new_tokens=options.max_new_tokens,
        peers=options.peers,
        peers_dir=options.peers_dir,
    )


def resolve_source(config: CaptioningConfig, log: Callable[[str], None]) -> str:
    """The source model path: --model as given, or the preset built under the work dir."""
    return model_or_preset(config, "vit-gpt2", log)  # vit-gpt2: --preset without --family


def _check(config: CaptioningConfig) -> None:
    check_config(config, ("threads", "repeats", "images", "max_new_tokens"))
    check_peers(config.peers)


def quantize_config(parent: Path, scheme: str) -> QuantizeConfig:
    """`kiln quantize`'s settings for an on-the-fly variant: a small quality check and no gate.

    A variant below `kiln quantize`'s default gates is still measured and shown as a marked row
    (variant_gate), so one weak scheme cannot cost the report its other rows."""
    return QuantizeConfig(scheme=scheme, num_images=QUALITY_IMAGES, overwrite=True, max_new_empty=None)


def _run_job(runner, index: int, advance, images: list) -> Job:
    job = runner.run(images[index])
    advance()
    return job


def latency(jobs: list[Job], max_new_tokens: int) -> dict[str, float]:
    totals = np.array([job.total_s for job in jobs])
    stats = percentiles(list(totals))
    return {
        **{key: stats[key] for key in ("p50_s", "p90_s", "p99_s")},
        "mean_s": float(totals.mean()),
        "jobs": len(jobs),
        "images_per_s": len(jobs) / float(totals.sum()),
        "tokens_per_s": len(jobs) * max_new_tokens / float(totals.sum()),
    }


def stage_medians(jobs: list[Job]) -> dict[str, float]:
    names = {name for job in jobs for name in job.stages}
    return {name: statistics.median(job.stages[name] for job in jobs if name in job.stages) for name in names}


def artifact_bytes(directory: Path) -> tuple[int, int | None]:
    """(all files of the artifact, weight bytes one decoder step reads) in bytes."""
    manifest = read_manifest(directory)
    total = sum((directory / name).stat().st_size for name in manifest.files)
    spec = manifest.components.get("decoder")
    if spec is None:
        return total, None
    return total, roofline.step_weight_bytes(directory / spec.file)


def eager_bytes(runner: EagerRunner, source: str) -> tuple[int, int | None]:
    """(source weight files, parameters one decode step reads) in bytes.

    The step's modules are the family's declared eager decoder stage (GPT-2, BLIP's text decoder,
    BLIP-2's OPT). Embedding tables count only when another module shares them (GPT-2's lm_head reads
    all of wte); a lookup-only table (wpe) costs one row. The cross-attention K/V projections still
    count, although transformers runs them on the first step only: the eager bound is slightly generous.
    """
    import torch  # here, not at the top: the task registry stays importable without loading torch

    resolved = resolve_model(source)
    total = sum((resolved.path / name).stat().st_size for name in resolved.weight_files)
    if not runner.decoder_modules:
        return total, None
    decoder = torch.nn.ModuleList(runner.decoder_modules)
    lookups = {id(m.weight) for m in decoder.modules() if isinstance(m, torch.nn.Embedding)}
    owners: dict[int, int] = {}
    for _, parameter in decoder.named_parameters(remove_duplicate=False):
        owners[id(parameter)] = owners.get(id(parameter), 0) + 1
    # parameters() yields a tied weight once (GPT-2's wte and lm_head).
    return total, sum(
        p.numel() * p.element_size()
        for p in decoder.parameters()
        if id(p) not in lookups or owners[id(p)] > 1
    )


def _rss(name: str, target: str, config: CaptioningConfig) -> int | None:
    if not config.measure_rss:
        return None
    return measure_rss(target, name == EAGER, config.threads, config.max_new_tokens, IMAGE_SEEDS)


@dataclass(frozen=True)
class Measured:
    """What a variant is and weighs, beside its timings."""

    target: str  # source model, artifact directory or peer export
    total_bytes: int  # files on disk (eager: source weights; a peer: the files its runtime loads)
    decoder_bytes: int | None  # weight bytes one decoder step reads; None when there is no decoder
    peak_rss_bytes: int | None  # peak RSS of a fresh process captioning one image; None when skipped
    gate: tuple[str, ...] = ()  # `kiln quantize`'s default gates this variant misses; () when it passes


def measure(runners: dict[str, Any], source: str, variants: list[Variant], config: CaptioningConfig) -> dict:
    """Sizes and peak memory of every runner, by name."""
    measured = {EAGER: Measured(source, *eager_bytes(runners[EAGER], source), _rss(EAGER, source, config))}
    for v in variants:
        sizes = artifact_bytes(v.path)
        measured[v.name] = Measured(
            str(v.path), *sizes, _rss(v.name, str(v.path), config), variant_gate(v.path)
        )
    for name, runner in runners.items():
        if isinstance(runner, PeerRunner):
            rss = runner.peak_rss() if config.measure_rss else None
            measured[name] = Measured(str(runner.setup.export_dir), *runner.sizes(), rss)
    return measured


def variant_row(name: str, measured: Measured, timings: Timings, baseline: Timings, context: dict) -> dict:
    """Everything measured for one variant, as report.json stores it."""
    config: CaptioningConfig = context["config"]
    stages = stage_medians(timings.jobs)
    return {
        "name": name,
        "path": measured.target,
        "size_bytes": measured.total_bytes,
        "latency": latency(timings.jobs, config.max_new_tokens),
        "stages_s": stages,
        "peak_rss_bytes": measured.peak_rss_bytes,
        "quality": caption_agreement(baseline.first_pass, timings.first_pass),
        "gate": list(measured.gate),
        "roofline": roofline.multiples(context["machine"], measured.decoder_bytes, context["flops"], stages),
    }


def _load_runners(
    source: str, variants: list[Variant], peers: list[PeerSetup], images: list, config: CaptioningConfig
) -> dict[str, Any]:
    runners: dict[str, Any] = {EAGER: EagerRunner(source, config.threads, config.max_new_tokens)}
    for variant in variants:
        runners[variant.name] = OrtRunner(variant.path, config.threads, config.max_new_tokens)
    for peer in peers:
        # The peer's process waits on its stdin between jobs: it takes no CPU while the others run.
        runners[peer.name] = PeerRunner(peer, source, images, config.threads, config.max_new_tokens)
    return runners


def _close(runners: dict[str, Any]) -> None:
    for runner in runners.values():
        if isinstance(runner, PeerRunner):
            runner.close()


def _measure_all(
    source: str, variants: list[Variant], peers: list[PeerSetup], context: dict, log
) -> list[dict]:
    """Time every variant and peer on the same images, round-robin (image by image); one report row each."""
    config: CaptioningConfig = context["config"]
    log(f"loading {len(variants) + len(peers) + 1} variants")
    images = [shapes.draw(IMAGE_SEEDS + i)[0] for i in range(config.images)]
    runners = _load_runners(source, variants, peers, images, config)
    try:
        run = lambda runner, index, advance: _run_job(runner, index, advance, images)  # noqa: E731
        # Memory bandwidth and GEMM rates sampled between the timed passes: the bounds move with them.
        probe = machine_roofline.RateProbe(config.threads)
        timings = time_variants(runners, len(images), config, run, Schedule(on_timed_pass=probe.sample))
        context["machine"]["during"] = probe.summary()
        log("measuring peak memory per variant")
        measured = measure(runners, source, variants, config)
    finally:
        _close(runners)  # peer processes end even when timing fails
    context["machine"]["observed_read_gbps"] = roofline.observed_read_gbps(
        [
            (m.decoder_bytes, stage_medians(timings[name].jobs).get("decode_per_token"))
            for name, m in measured.items()
        ]
    )
    return [variant_row(name, m, timings[name], timings[EAGER], context) for name, m in measured.items()]


def _schemes(variants: list[Variant]) -> tuple[str, ...]:
    """The schemes of the quantized variants under test, made here or given."""
    quantizations = (read_manifest(variant.path).quantization or {} for variant in variants)
    return tuple(q["scheme"] for q in quantizations if "scheme" in q)


def run_bench(config: CaptioningConfig, log: Callable[[str], None] = lambda message: None) -> dict:
    """Run the whole benchmark and write report.json, report.md and plots into ``config.out``."""
    # 1. Check the request, then build or find the source, every variant and every peer's export.
    _check(config)
    source = resolve_source(config, log)
    log("measuring this machine's GEMM and memory bandwidth")
    machine = machine_roofline.measure_machine(config.threads)
    variants = prepare_variants(
        source, config.schemes, config.variants, config.artifacts_dir, log, quantize_config
    )
    peers, notes = prepare_peers(config.peers, source, config.peers_root, config.artifacts_dir, log)
    # 2. Time them all on the same images, round-robin, and summarise each against the eager baseline.
    flops = roofline.encoder_flops(resolve_model(source).config)
    context = {"config": config, "machine": machine, "flops": flops}
    rows = _measure_all(source, variants, peers, context, log)
    # 3. The schemes on the trained captioner, whose captions can be checked against the truth.
    shapes = shapes_quality(_schemes(variants), config.artifacts_dir / "shapes-captioner", log)
    report = {
        "command": config.command,
        "source": source,
        "settings": settings_of(config),
        "machine": {**machine_info(), "roofline": machine, "encoder_flops": flops},
        "variants": rows,
        "shapes_quality": shapes,
        "peers": notes,
    }
    report = plain_json(report)
    # 4. Write the reports.
    write_reports(report, config.out, config.plots)
    return report


def p50_s(row: dict) -> float:
    """A report row's median seconds per image, end to end."""
    return row["latency"]["p50_s"]


def print_rows(report: dict, console) -> None:
    """One line per variant and per target on ``console``."""
    eager = p50_s(report["variants"][0])
    for row in report["variants"]:
        p50 = p50_s(row)
        console.print(f"  {row['name']:14} p50 {p50 * 1e3:8.1f} ms  {eager / p50:5.2f}x eager")
    for check in report["targets"]:
        console.print(f"  {'met' if check['met'] else 'MISSED':6} {check['target']}: {check['value']:.2f}")
