"""``kiln demo``: the whole job on the captioner the project ships, with no download.

Exports the shipped shapes captioner (a real ``VisionEncoderDecoderModel``, ViT + GPT-2), draws fresh
images, captions them with the ONNX artifact, validates the artifact against PyTorch and prints what
it did::

    kiln demo --out kiln-demo
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from modelkiln import runtime
from modelkiln.exporters.export import ExportConfig, export_model
from modelkiln.fixtures import CAPTIONER_DIR, shapes
from modelkiln.validation import ValidateConfig, validate_artifact

DEMO_SEEDS = 50_000  # first seed of the drawn demo images, away from the training seeds


def _draw(folder: Path, count: int) -> list[tuple[Path, str]]:
    folder.mkdir(parents=True, exist_ok=True)
    drawn = []
    for i in range(count):
        image, truth = shapes.draw(DEMO_SEEDS + i)
        path = folder / f"shape_{i:02d}.png"
        image.save(path)
        drawn.append((path, truth))
    return drawn


def run_demo(out: Path, num_images: int, console: Console) -> int:
    artifact = out / "shapes-captioner"
    # 1. Export the shipped captioner; the demo owns its folder, so a re-run replaces it.
    with console.status("exporting the shipped shapes captioner"):
        manifest = export_model(CAPTIONER_DIR, artifact, ExportConfig(overwrite=True))
    size = sum((artifact / name).stat().st_size for name in manifest.files)
    console.print(
        f"1. exported {manifest.family} to {artifact} ({size / 1e6:.2f} MB, {len(manifest.files)} files)"
    )
    # 2. Draw fresh images and caption them with the ONNX artifact (no PyTorch involved).
    drawn = _draw(out / "images", num_images)
    pipe = runtime.load(artifact)
    captions = [result[0]["generated_text"] for result in pipe([path for path, _ in drawn])]
    table = Table("image", "true caption", "artifact caption", "")
    correct = 0
    for (path, truth), caption in zip(drawn, captions, strict=True):
        correct += caption == truth
        table.add_row(path.name, truth, caption, "✓" if caption == truth else "✗")
    console.print(f"2. captioned {num_images} drawn images: {correct}/{num_images} exactly right")
    console.print(table)
    # 3. Validate against PyTorch: component diffs and token-exact captions, greedy and beam 4.
    with console.status("validating against PyTorch"):
        report = validate_artifact(artifact, str(CAPTIONER_DIR), ValidateConfig(num_images=num_images))
    worst = max(row["max_abs_diff"] for row in report["components"].values())
    matches = ", ".join(f"{mode} {row['matches']}/{row['total']}" for mode, row in report["captions"].items())
    verdict = "passed" if report["passed"] else "FAILED"
    console.print(
        f"3. validation {verdict}: max abs diff {worst:.2e}; captions token-exact with PyTorch: {matches}"
    )
    console.print(f"next: [bold]kiln caption {artifact} {out / 'images'}/shape_00.png[/bold]")
    return 0 if report["passed"] else 1
