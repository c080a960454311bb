"""``kiln demo``: the whole job on the two models the project ships, with no download.

Captioning: exports the shipped shapes captioner (a real ``VisionEncoderDecoderModel``, ViT + GPT-2),
draws fresh images, captions them with the ONNX artifact and validates the artifact against PyTorch.
Text to image: exports the shipped shapes ``StableDiffusion3Pipeline``, generates an image per prompt
with the ONNX artifact, reads each back with the captioner artifact and saves a contact sheet::

    kiln demo --out kiln-demo      # kiln-demo/contact-sheet.png: the images with their prompts
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw
from rich.console import Console
from rich.table import Table

from modelkiln import runtime
from modelkiln.exporters.export import ExportConfig, export_model
from modelkiln.fixtures import CAPTIONER_DIR, TEXT_TO_IMAGE_DIR, shapes
from modelkiln.validation import ValidateConfig, validate_artifact

DEMO_SEEDS = 50_000  # first seed of the drawn demo images, away from the training seeds
DEMO_PROMPTS = (  # one of every colour, shape, size and background, and two blues
    "a small red circle on a white background",
    "a large blue square on a gray background",
    "a small yellow triangle on a black background",
    "a large green circle on a blue background",
    "a large purple triangle on a white background",
    "a small orange square on a black background",
)
SHEET_SCALE = 3  # contact-sheet pixels per generated pixel: 48 px images are hard to see at 1:1


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
    """0 when the captioner artifact validates against PyTorch. The text-to-image half reports how many
    images read back as their prompt: a figure of the tiny model's skill, not a pass/fail of the tools."""
    passed = _captioning_demo(out, num_images, console)
    _text_to_image_demo(out, out / "shapes-captioner", console)
    return 0 if passed else 1


def _export_shipped(source: Path, artifact: Path, what: str, console: Console):
    """Export a shipped model; the demo owns its folders, so a re-run replaces them."""
    with console.status(f"exporting the shipped {what}"):
        return export_model(source, artifact, ExportConfig(overwrite=True))


def _mb(artifact: Path, manifest) -> str:
    return f"{sum((artifact / name).stat().st_size for name in manifest.files) / 1e6:.2f} MB"


def _captioning_demo(out: Path, num_images: int, console: Console) -> bool:
    artifact = out / "shapes-captioner"
    # 1. Export the shipped captioner.
    manifest = _export_shipped(CAPTIONER_DIR, artifact, "shapes captioner", console)
    console.print(
        f"1. exported {manifest.family} to {artifact} ({_mb(artifact, manifest)}, {len(manifest.files)} files)"
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
    return report["passed"]


def _text_to_image_demo(out: Path, captioner: Path, console: Console) -> int:
    """Prompts in, images out, captions read back: how many images show their prompt."""
    artifact = out / "shapes-sd3"
    # 4. Export the shipped text-to-image pipeline through the same path as any SD3 checkpoint.
    manifest = _export_shipped(TEXT_TO_IMAGE_DIR, artifact, "shapes text-to-image pipeline", console)
    console.print(
        f"4. exported {manifest.family} to {artifact} ({_mb(artifact, manifest)}, {len(manifest.components)} graphs)"
    )
    # 5. Generate one image per prompt with the ONNX artifact; 6. read each back with the captioner.
    with console.status(f"generating {len(DEMO_PROMPTS)} images"):
        images = runtime.load(artifact)(list(DEMO_PROMPTS), seed=DEMO_SEEDS).images
    folder = out / "generated"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"prompt_{i:02d}.png" for i in range(len(images))]
    for image, path in zip(images, paths, strict=True):
        image.save(path)
    captions = [result[0]["generated_text"] for result in runtime.load(captioner)(paths)]
    table = Table("prompt", "caption read back", "")
    for prompt, caption in zip(DEMO_PROMPTS, captions, strict=True):
        table.add_row(prompt, caption, "✓" if caption == prompt else "✗")
    right = sum(c == p for c, p in zip(captions, DEMO_PROMPTS, strict=True))
    console.print(
        f"5. generated {len(images)} images; the captioner read {right}/{len(images)} back as their prompt"
    )
    console.print(table)
    sheet = out / "contact-sheet.png"
    contact_sheet(images, list(DEMO_PROMPTS), captions).save(sheet)
    console.print(f"6. contact sheet: {sheet}")
    console.print(f'next: [bold]kiln generate {artifact} "a large red square on a black background"[/bold]')
    return right


def contact_sheet(images: list[Image.Image], prompts: list[str], captions: list[str]) -> Image.Image:
    """The images in a row, enlarged, each over its prompt and the caption read back (marked ✓/✗)."""
    side = images[0].width * SHEET_SCALE
    cell, text_height = max(side, 250), 40
    sheet = Image.new("RGB", (cell * len(images), side + text_height), "white")
    canvas = ImageDraw.Draw(sheet)
    for i, (image, prompt, caption) in enumerate(zip(images, prompts, captions, strict=True)):
        left = i * cell
        sheet.paste(image.resize((side, side), Image.Resampling.NEAREST), (left + (cell - side) // 2, 0))
        canvas.text((left + 4, side + 4), prompt, fill="black")
        mark = "ok" if caption == prompt else f"read: {caption}"
        canvas.text((left + 4, side + 20), mark, fill="darkgreen" if caption == prompt else "firebrick")
    return sheet
