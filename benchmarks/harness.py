"""`kiln bench`: latency, throughput, memory, size, quality and roofline of every variant vs PyTorch.

    from modelkiln.benchmarks.harness import BenchConfig, run_bench
    report = run_bench(BenchConfig(out=Path("bench"), preset="tiny", schemes=("int8-dynamic",)))
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress

from modelkiln.errors import KilnError

from . import roofline
from .peers import PeerRunner, PeerSetup, check_peers, prepare_peers
from .quality import caption_agreement
from .runners import EagerRunner, Job, OrtRunner
from .variants import Variant, check_schemes, prepare_variants, variant_gate

IMAGE_SEEDS = 80_000  # drawn benchmark images: away from training, validation and quantize seeds
EAGER = "pytorch-eager"


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run."""

    out: Path  # results folder: report.json, report.md, PNG plots
    model: str | None = None  # source model (hub id or local dir): the eager baseline and on-the-fly exports
    preset: str | None = None  # "tiny" or "full": build a random-weight ViT-GPT2 source instead of --model
    variants: tuple[str, ...] = ()  # existing artifact directories to compare
    schemes: tuple[str, ...] = ()  # schemes to quantize on the fly from an fp32 export of the source
    work_dir: Path | None = None  # presets and on-the-fly artifacts; None puts them in OUT/artifacts
    threads: int = 2  # intra-op threads for torch and onnxruntime alike
    repeats: int = 5  # timed passes over the images per variant
    warmup: int = 1  # untimed passes first (thread pools, allocators, page cache)
    images: int = 4  # drawn images per pass
    max_new_tokens: int = 16  # tokens every variant decodes (min_new_tokens is set to the same)
    measure_rss: bool = True  # peak RSS per variant in a fresh subprocess (a few seconds each)
    plots: bool = True  # PNG plots when matplotlib is importable
    progress: bool = True  # rich progress bar on stderr
    command: str = ""  # the exact command line, recorded in the report
    peers: tuple[str, ...] = ()  # other toolchains to time beside the variants (keys of peers.PEERS)
    peers_dir: Path | None = None  # where peer virtualenvs live; None: ~/.cache/modelkiln/peers

    @property
    def artifacts_dir(self) -> Path:
        return self.work_dir or self.out / "artifacts"

    @property
    def peers_root(self) -> Path:
        from .peers import default_root

        return self.peers_dir or default_root()


def model_or_preset(
    model: str | None,
    preset: str | None,
    presets: dict,
    build: Callable[[str, Path], Path],
    artifacts_dir: Path,
    log: Callable[[str], None],
) -> str:
    """--model as given, or ``build(preset, artifacts_dir)``: the preset's source built (or reused)."""
    if (model is None) == (preset is None):
        raise KilnError("give exactly one of --model SRC or --preset {tiny,full}.")
    if model is not None:
        _refuse_pickle(model)
        return model
    if preset not in presets:
        raise KilnError(f"--preset {preset}: unknown. Valid presets: {', '.join(presets)}.")
    log(f"preset {preset}: building or reusing it under {artifacts_dir}")
    return str(build(preset, artifacts_dir))


def _refuse_pickle(model: str) -> None:
    """The benchmark loads its source several times over; it takes safetensors weights only."""
    from modelkiln.exporters.source import resolve_source as resolve_model

    source = resolve_model(model, allow_pickle=True)
    if source.uses_pickle:
        raise KilnError(
            f"{source.path} holds only pickle weights ({', '.join(source.weight_files[:3])}); kiln bench "
            "loads safetensors only. Re-save the model with save_pretrained(..., safe_serialization=True) "
            "if you trust its origin, then bench that folder."
        )


def resolve_source(config: BenchConfig, log: Callable[[str], None]) -> str:
    """The source model path: --model as given, or the preset built under the work dir."""
    from .presets import PRESETS, build_preset

    return model_or_preset(config.model, config.preset, PRESETS, build_preset, config.artifacts_dir, log)


def _check(config: BenchConfig) -> None:
    for name in ("threads", "repeats", "images", "max_new_tokens"):
        if getattr(config, name) < 1:
            raise KilnError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}.")
    if config.warmup < 0:
        raise KilnError(f"--warmup must be 0 or more, got {config.warmup}.")
    check_schemes(config.schemes)
    check_peers(config.peers)


@dataclass
class Timings:
    """Measured jobs of one variant: the captions of the first pass and every timed job."""

    captions: list[Job] = field(default_factory=list)
    jobs: list[Job] = field(default_factory=list)


def time_variants(runners: dict[str, Any], images: list, config: BenchConfig) -> dict[str, Timings]:
    """Warm-up passes, then timed passes; within a pass every image goes through every variant in turn.

    Image by image rather than variant by variant: a neighbour's burst on this shared 2-core machine
    lasts seconds, so it lands on all variants' jobs of that image alike instead of on one variant.
    """
    timings = {name: Timings() for name in runners}
    passes = config.warmup + config.repeats
    with Progress(console=Console(stderr=True), transient=True, disable=not config.progress) as progress:
        task = progress.add_task("timing", total=passes * len(runners) * len(images))
        for index in range(passes):
            for image in images:
                for name, runner in runners.items():
                    progress.update(task, description=f"pass {index + 1}/{passes}: {name}")
                    job = runner.run(image)
                    progress.advance(task)
                    if index == 0:
                        timings[name].captions.append(job)
                    if index >= config.warmup:
                        timings[name].jobs.append(job)
    return timings


def latency(jobs: list[Job], max_new_tokens: int) -> dict[str, float]:
    totals = np.array([job.total_s for job in jobs])
    p50, p90, p99 = np.percentile(totals, [50, 90, 99])
    return {
        "p50_s": float(p50),
        "p90_s": float(p90),
        "p99_s": float(p99),
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
    from modelkiln.manifest import read_manifest

    manifest = read_manifest(directory)
    total = sum((directory / name).stat().st_size for name in manifest.files)
    spec = manifest.components.get("decoder")
    if spec is None:
        return total, None
    return total, roofline.step_weight_bytes(directory / spec.file)


def eager_bytes(runner: EagerRunner, source: str) -> tuple[int, int | None]:
    """(source weight files, decoder parameters one step reads) in bytes.

    Embedding tables count only when another module shares them (GPT-2's lm_head reads all of wte);
    a lookup-only table (wpe) costs one row. The cross-attention K/V projections still count, although
    transformers runs them on the first step only: the eager bound is slightly generous.
    """
    import torch

    from modelkiln.exporters.source import resolve_source

    resolved = resolve_source(source)
    total = sum((resolved.path / name).stat().st_size for name in resolved.weight_files)
    decoder = getattr(runner.model, "decoder", None)
    if decoder is None:
        return total, None
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


def _rss(name: str, target: str, config: BenchConfig) -> int | None:
    if not config.measure_rss:
        return None
    from .rss import measure_rss

    return measure_rss(target, name == EAGER, config.threads, config.max_new_tokens, IMAGE_SEEDS)


@dataclass(frozen=True)
class Measured:
    """What a variant is and weighs, beside its timings."""

    target: str  # source model, artifact directory or peer export
    total_bytes: int  # files on disk (eager: source weights; a peer: the files its runtime loads)
    decoder_bytes: int | None  # weight bytes one decoder step reads; None when there is no decoder
    peak_rss_bytes: int | None  # peak RSS of a fresh process captioning one image; None when skipped
    gate: tuple[str, ...] = ()  # `kiln quantize`'s default gates this variant misses; () when it passes


def measure(runners: dict[str, Any], source: str, variants: list[Variant], config: BenchConfig) -> dict:
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
    config: BenchConfig = context["config"]
    stages = stage_medians(timings.jobs)
    return {
        "name": name,
        "path": measured.target,
        "size_bytes": measured.total_bytes,
        "latency": latency(timings.jobs, config.max_new_tokens),
        "stages_s": stages,
        "peak_rss_bytes": measured.peak_rss_bytes,
        "quality": caption_agreement(baseline.captions, timings.captions),
        "gate": list(measured.gate),
        "roofline": roofline.multiples(context["machine"], measured.decoder_bytes, context["flops"], stages),
    }


def _load_runners(
    source: str, variants: list[Variant], peers: list[PeerSetup], images: list, config: BenchConfig
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
    """Time every variant and peer on the same images, round-robin; one report row each."""
    from modelkiln.fixtures import shapes

    config: BenchConfig = context["config"]
    log(f"loading {len(variants) + len(peers) + 1} variants")
    images = [shapes.draw(IMAGE_SEEDS + i)[0] for i in range(config.images)]
    runners = _load_runners(source, variants, peers, images, config)
    try:
        timings = time_variants(runners, images, config)
        log("measuring peak memory per variant")
        measured = measure(runners, source, variants, config)
    finally:
        _close(runners)  # peer processes end even when timing fails
    return [variant_row(name, m, timings[name], timings[EAGER], context) for name, m in measured.items()]


def run_bench(config: BenchConfig, log: Callable[[str], None] = lambda message: None) -> dict:
    """Run the whole benchmark and write report.json, report.md and plots into ``config.out``."""
    import json

    from modelkiln.exporters.source import resolve_source as resolve_model

    from .report import machine_info, write_reports

    # 1. Check the request, then build or find the source, every variant and every peer's export.
    _check(config)
    source = resolve_source(config, log)
    log("measuring this machine's GEMM and memory bandwidth")
    machine = roofline.measure_machine(config.threads)
    variants = prepare_variants(source, config.schemes, config.variants, config.artifacts_dir, log)
    peers, notes = prepare_peers(config.peers, source, config.peers_root, config.artifacts_dir, log)
    # 2. Time them all on the same images, round-robin, and summarise each against the eager baseline.
    flops = roofline.encoder_flops(resolve_model(source).config)
    context = {"config": config, "machine": machine, "flops": flops}
    rows = _measure_all(source, variants, peers, context, log)
    report = {
        "command": config.command,
        "source": source,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(config).items()},
        "machine": {**machine_info(), "roofline": machine, "encoder_flops": flops},
        "variants": rows,
        "peers": notes,
    }
    report = json.loads(json.dumps(report, default=str))  # plain JSON types throughout
    # 3. Write the reports.
    write_reports(report, config.out, config.plots)
    return report
