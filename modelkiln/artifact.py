"""Atomic artifact directories: build in a hidden sibling, rename into place only when complete.

An interrupted or failed export must never leave a directory that looks like a finished artifact, so
every writer works in ``.<name>.partial-<random>`` beside the target and renames it at the end::

    with staged_artifact("out/vit-gpt2", overwrite=False) as staging:
        ...write graphs and files into staging...
        finish(staging, manifest)          # hashes files, writes manifest.json last
    # here out/vit-gpt2 exists and is complete; on an exception nothing is left behind
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from modelkiln.errors import ArtifactError, OutputExistsError
from modelkiln.manifest import Manifest, hash_files, write_manifest


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output unless asked to overwrite it; return the absolute target path."""
    target = Path(out).absolute()
    if target.exists() and not overwrite:
        raise OutputExistsError(
            f"{target} already exists. Choose another --out, or pass --overwrite to replace it."
        )
    if target.exists() and not target.is_dir():
        raise OutputExistsError(f"{target} exists and is not a directory. Choose another --out.")
    return target


@contextlib.contextmanager
def staged_artifact(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging directory that becomes ``out`` when the block finishes without error."""
    target = check_output_dir(out, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    # mkdtemp makes the folder private (0700); a finished artifact gets the usual umask permissions.
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    try:
        yield staging
        _promote(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _promote(staging: Path, target: Path) -> None:
    """Swap the finished staging directory into place; an old artifact is removed only afterwards."""
    if not (staging / "manifest.json").is_file():
        raise ArtifactError(f"internal error: {staging} has no manifest; the artifact was not finished")
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def finish(staging: Path, manifest: Manifest) -> Manifest:
    """Hash every file in the staging directory and write the manifest (always the last file)."""
    complete = replace(manifest, files=hash_files(staging))
    write_manifest(staging, complete)
    return complete
