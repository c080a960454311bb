"""Folders of drawn shapes and the exported shipped captioner, for the dataset captioning tests.

artifact = shapes_captioner(tmp_path_factory)     # exported once per test run, shared by workers
truths = draw_folder(tmp_path / "photos", 24)     # {file_name: true caption}, some in a subfolder
"""

from __future__ import annotations

from pathlib import Path

from conftest import _exported

from modelkiln.fixtures import CAPTIONER_DIR, shapes

FIRST_SEED = 70_000  # away from the training seeds and the demo's


def shapes_captioner(tmp_path_factory) -> Path:
    """The trained captioner the project ships, exported: its captions are checkable (98% exact), and
    confident enough that batching cannot flip a token, so two engines must agree image for image."""
    return _exported(tmp_path_factory, "shapes-captioner-art", CAPTIONER_DIR)


def draw_folder(folder: Path, count: int, seed: int = FIRST_SEED) -> dict[str, str]:
    """``count`` drawn PNGs, every third in ``sub/``; returns file_name (relative to folder) -> caption."""
    truths = {}
    for index in range(count):
        image, caption = shapes.draw(seed + index)
        name = f"sub/shape_{index:03d}.png" if index % 3 == 0 else f"shape_{index:03d}.png"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(folder / name)
        truths[name] = caption
    return truths


def add_broken_images(folder: Path) -> list[str]:
    """A file that is not an image and a truncated JPEG; their file_names."""
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    image, _ = shapes.draw(1)
    image.save(folder / "whole.jpg")
    (folder / "truncated.jpg").write_bytes((folder / "whole.jpg").read_bytes()[:300])
    (folder / "whole.jpg").unlink()
    return ["corrupt.png", "truncated.jpg"]
