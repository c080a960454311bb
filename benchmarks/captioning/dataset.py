"""Dataset captioning throughput: images/s of `kiln caption --out` on this machine, and what it implies
for a cluster.

    python -m modelkiln.benchmarks.captioning.dataset --out benchmarks/results/caption-dataset
    python -m modelkiln.benchmarks.captioning.dataset --out /tmp/b --images 200 --full-images 0  # quick

Draws ``--images`` shapes (PNG files, as a user's folder would be) and captions them with the shipped
captioner, exported: the bare pipeline (images already decoded: the model's own ceiling), the local
engine at batch 1/8/32 (read, hash, decode, journal, write included), and the Ray engine with 1 and 2
caption actors of one thread each on a local Ray of the machine's cores. Ray's own cost is stated
three ways: ``ray.init``, the fixed cost of a run (actor start, model load, scheduling), found as
``t(N) - N / marginal rate`` from runs over N and 2N images, and the marginal rate itself next to the
local engine's. ``--full-images`` repeats the local and Ray figures with the full-size ViT-GPT2 preset
(random weights, 16 tokens a caption). Each figure is the best of ``--repeats`` runs: the machine may
be shared. Writes report.json and report.md, with the projection to 1M and 100M images.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from modelkiln import runtime
from modelkiln.exporters.export import ExportConfig, export_model
from modelkiln.fixtures import CAPTIONER_DIR, shapes
from modelkiln.runtime.datasets import RayEngine, caption_dataset
from modelkiln.runtime.images import ImagePreprocessor, load_images

from .presets import build_preset

Log = Callable[[str], None]
FIRST_SEED = 90_000  # drawn images away from the training seeds
FULL_MAX_NEW_TOKENS = 16  # the random-weight preset rarely stops by itself: every caption is this long


@dataclass(frozen=True)
class DatasetBenchConfig:
    """What the dataset benchmark measures."""

    out: Path  # report folder
    work: Path  # drawn images, exported artifacts, outputs
    images: int = 600  # drawn images for the shipped captioner (the Ray marginal runs use twice as many)
    full_images: int = 16  # images for the full-size ViT-GPT2 preset; 0 skips it
    batch_sizes: tuple[int, ...] = (1, 8, 32)  # local engine batch sizes
    ray_workers: tuple[int, ...] = (1, 2)  # caption actors of the Ray runs
    ray_batch: int = 32  # batch size of the Ray runs
    repeats: int = 2  # runs per figure; the best counts
    notes: list[str] = field(default_factory=list)  # what the report should say about the run


def _best(repeats: int, run: Callable[[], float]) -> tuple[float, list[float]]:
    times = [run() for _ in range(repeats)]
    return min(times), times


def _draw(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"shape_{index:05d}.png"
        if not path.exists():
            shapes.draw(FIRST_SEED + index)[0].save(path)
        paths.append(path)
    return paths


def _list(folder: Path, paths: list[Path], name: str) -> Path:
    listing = folder.parent / f"{name}.txt"
    listing.write_text("".join(f"{path.relative_to(listing.parent)}\n" for path in paths))
    return listing


def _pipeline_rates(artifact: Path, paths: list[Path], config: DatasetBenchConfig, generation: dict) -> dict:
    """The bare pipeline over decoded images: no reading, hashing or journal."""
    pipe = runtime.load(artifact)
    images = load_images(paths)
    pipe(images[:8], batch_size=8, **generation)  # warm-up: the first run allocates and plans
    rates = {}
    for batch in config.batch_sizes:

        def once(batch=batch) -> float:
            start = time.perf_counter()
            pipe(images, batch_size=batch, **generation)
            return time.perf_counter() - start

        best, times = _best(config.repeats, once)
        rates[batch] = {"images_per_s": len(images) / best, "seconds": times}
    return rates


def _local_rates(
    artifact: Path, listing: Path, count: int, config: DatasetBenchConfig, generation: dict
) -> dict:
    """caption_dataset on the local engine, from a fresh start each run."""
    rates = {}
    for batch in config.batch_sizes:
        out = config.work / f"local-b{batch}.jsonl"

        def once(batch=batch, out=out) -> float:
            options = {"batch_size": batch, "generation": generation, "overwrite": True}
            return caption_dataset(artifact, listing, out, **options).seconds

        best, times = _best(config.repeats, once)
        rates[batch] = {"images_per_s": count / best, "seconds": times}
    return rates


def _ray_rates(
    artifact: Path, listings: tuple[Path, Path], counts: tuple[int, int], config, generation
) -> dict:
    """The Ray engine over N and 2N images per worker count: total rate, marginal rate, fixed cost."""
    rows = {}
    for workers in config.ray_workers:
        engine = RayEngine(workers=workers, threads_per_worker=1)
        seconds = []
        for listing, count in zip(listings, counts, strict=True):
            out = config.work / f"ray-w{workers}-{count}.jsonl"

            def once(listing=listing, out=out, engine=engine) -> float:
                options = {"batch_size": config.ray_batch, "generation": generation, "overwrite": True}
                return caption_dataset(artifact, listing, out, engine=engine, **options).seconds

            seconds.append(_best(config.repeats, once))
        (small, small_times), (large, large_times) = seconds
        # Noise can make the larger run no slower than the smaller one: then there is no figure to give.
        marginal = (counts[1] - counts[0]) / (large - small) if large > small else None
        rows[workers] = {
            "images_per_s": counts[1] / large,
            "marginal_images_per_s": marginal,
            "fixed_s": None if marginal is None else max(0.0, small - counts[0] / marginal),
            "seconds": {str(counts[0]): small_times, str(counts[1]): large_times},
        }
    return rows


def _measure_model(
    name: str, artifact: Path, count: int, config: DatasetBenchConfig, generation: dict, log: Log
):
    """Every figure for one artifact: the bare pipeline, the local engine, the Ray engine."""
    import ray  # here, not at the top: Ray is optional (pip install 'modelkiln[ray]')

    paths = _draw(config.work / "images", 2 * count)
    listings = (_list(config.work / "images", paths[:count], f"{name}-{count}"),)
    listings += (_list(config.work / "images", paths, f"{name}-{2 * count}"),)
    log(f"{name}: bare pipeline over {count} decoded images")
    bare = _pipeline_rates(artifact, paths[:count], config, generation)
    log(f"{name}: local engine over {count} files")
    local = _local_rates(artifact, listings[0], count, config, generation)
    start = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    init_s = time.perf_counter() - start
    try:
        log(f"{name}: Ray engine over {count} and {2 * count} files")
        rays = _ray_rates(artifact, listings, (count, 2 * count), config, generation)
    finally:
        ray.shutdown()
    sizes = {
        "file_bytes": sum(path.stat().st_size for path in paths[:count]) / count,
        "pixel_bytes": ImagePreprocessor.from_dir(artifact)(load_images(paths[:1])).nbytes,
    }
    return {"images": count, "pipeline": bare, "local": local, "ray": rays, "ray_init_s": init_s, **sizes}


def _machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model = next(
        (line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), ""
    )
    import onnxruntime
    import ray  # here, not at the top: Ray is optional (pip install 'modelkiln[ray]')

    return {
        "cpu": model or platform.processor(),
        "cores": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "ray": ray.__version__,
    }


def run_bench(config: DatasetBenchConfig, log: Log) -> dict:
    """Measure, project, write report.json and report.md; return the report."""
    config.out.mkdir(parents=True, exist_ok=True)
    config.work.mkdir(parents=True, exist_ok=True)
    report = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}}
    report["machine"] = _machine()
    shapes_artifact = config.work / "shapes-captioner"
    export_model(CAPTIONER_DIR, shapes_artifact, ExportConfig(overwrite=True))
    report["models"] = {
        "shapes-captioner": _measure_model("shapes", shapes_artifact, config.images, config, {}, log)
    }
    if config.full_images:
        log("full-size ViT-GPT2 preset: build and export (minutes)")
        source = build_preset("full", config.work)
        full_artifact = config.work / "vit-gpt2-full"
        if not (full_artifact / "manifest.json").is_file():
            export_model(source, full_artifact, ExportConfig())
        generation = {"max_new_tokens": FULL_MAX_NEW_TOKENS}
        full = _measure_model("full", full_artifact, config.full_images, config, generation, log)
        report["models"]["vit-gpt2-full"] = full
    report["machine"]["load_average_end"] = os.getloadavg()
    report["projection"] = project(report)
    (config.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (config.out / "report.md").write_text(markdown(report))
    return report


# Data set sizes the projection is worked out for.
SCALES = {"1M": 1_000_000, "100M": 100_000_000}
# What the driver keeps per image in memory: its DatasetItem (path, file_name) and journal key (sha256).
DRIVER_BYTES_PER_IMAGE = 400
# What reaches the driver per image from the actors: file_name, sha256, state and the caption.
RESULT_BYTES_PER_IMAGE = 200


def project(report: dict) -> dict:
    """One node's best images/s, per model, worked out for SCALES on this machine's kind of node."""
    cores = report["machine"]["cores"]
    projection = {}
    for name, model in report["models"].items():
        local = max(row["images_per_s"] for row in model["local"].values())
        ray_rate = max((row["marginal_images_per_s"] or 0.0) for row in model["ray"].values())
        node = max(local, ray_rate)
        scales = {
            label: {
                "one_node_hours": count / node / 3600,
                "core_hours": count * cores / node / 3600,
                "nodes_for_one_day": -(-count // int(node * 86_400)) if node * 86_400 >= 1 else None,
                "object_store_gb": count * (model["file_bytes"] + model["pixel_bytes"]) / 1e9,
                "driver_memory_gb": count * DRIVER_BYTES_PER_IMAGE / 1e9,
                "results_to_driver_gb": count * RESULT_BYTES_PER_IMAGE / 1e9,
            }
            for label, count in SCALES.items()
        }
        projection[name] = {
            "node_images_per_s": node,
            "core_seconds_per_image": cores / node,
            "node_object_store_mb_per_s": node * (model["file_bytes"] + model["pixel_bytes"]) / 1e6,
            "scales": scales,
        }
    return projection


def _rate_rows(name: str, model: dict, ray_batch: int) -> list[str]:
    rows = []
    for batch, row in model["pipeline"].items():
        rows.append(f"| {name} | bare pipeline (decoded images) | {batch} | {row['images_per_s']:.1f} | |")
    for batch, row in model["local"].items():
        rows.append(f"| {name} | local engine, files to metadata | {batch} | {row['images_per_s']:.1f} | |")
    for workers, row in model["ray"].items():
        rows.append(
            f"| {name} | Ray, {workers} actor(s) x 1 thread | {ray_batch} | {row['images_per_s']:.1f} | "
            f"{_ray_costs(row)} |"
        )
    return rows


def _ray_costs(row: dict) -> str:
    if row["marginal_images_per_s"] is None:
        return "marginal rate lost in noise (2N images took no longer than N)"
    return f"marginal {row['marginal_images_per_s']:.1f}/s, fixed {row['fixed_s']:.1f} s"


def markdown(report: dict) -> str:
    machine = report["machine"]
    lines = [
        "# Dataset captioning throughput",
        "",
        f"`python -m modelkiln.benchmarks.captioning.dataset --out {report['config']['out']}` "
        f"({report['config']['repeats']} runs per figure, the best counts).",
        "",
        f"{machine['cpu']}, {machine['cores']} cores; Python {machine['python']}, onnxruntime "
        f"{machine['onnxruntime']}, Ray {machine['ray']}. Load average (1/5/15 min) at the start "
        f"{', '.join(f'{v:.2f}' for v in machine['load_average'])}, at the end "
        f"{', '.join(f'{v:.2f}' for v in machine['load_average_end'])}.",
        "",
        "| model | path | batch | images/s | Ray: marginal rate, fixed cost per run |",
        "|---|---|---|---|---|",
    ]
    for name, model in report["models"].items():
        lines += _rate_rows(f"{name} ({model['images']} images)", model, report["config"]["ray_batch"])
    lines += [
        "",
        "Ray start-up (`ray.init`, local, this machine's cores): "
        + ", ".join(f"{name} run {model['ray_init_s']:.1f} s" for name, model in report["models"].items())
        + ".",
        "",
        "## Projection",
        "",
    ]
    lines += [
        "| model | one node images/s | core-s per image | data set | one node | core-hours | nodes for a day | "
        "through the object store | driver memory |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in report["projection"].items():
        for label, scale in row["scales"].items():
            lines.append(
                f"| {name} | {row['node_images_per_s']:.1f} | {row['core_seconds_per_image']:.4f} | {label} | "
                f"{scale['one_node_hours']:.1f} h | {scale['core_hours']:.1f} | {scale['nodes_for_one_day']} | "
                f"{scale['object_store_gb']:.0f} GB | {scale['driver_memory_gb']:.1f} GB |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="report folder (report.json, report.md)")
    parser.add_argument("--work", type=Path, help="images, artifacts and outputs (default OUT/work)")
    parser.add_argument("--images", type=int, default=600, help="drawn images for the shipped captioner")
    parser.add_argument(
        "--full-images", type=int, default=16, help="images for the full ViT-GPT2 preset; 0 skips"
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs per figure; the best counts")
    args = parser.parse_args(argv)
    config = DatasetBenchConfig(
        out=args.out, work=args.work or args.out / "work", images=args.images, full_images=args.full_images,
        repeats=args.repeats,
    )  # fmt: skip
    report = run_bench(config, lambda message: print(message, flush=True))
    print((config.out / "report.md").read_text())
    return 0 if report else 1


if __name__ == "__main__":
    raise SystemExit(main())
