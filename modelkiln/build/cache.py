"""The step cache: each step is keyed by a hash of its inputs, and an unchanged step touches nothing.

A key covers the step's settings, its parents' artifact hashes, the source files' hash and the tool
versions; a step whose key matches its record and whose outputs are intact logs "cached".
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modelkiln.build.directory import STEPS_DIR, Build
from modelkiln.errors import KilnError
from modelkiln.manifest import artifact_hash, read_manifest, require_intact

CACHE_VERSION = 1  # bump when a step's meaning changes, so older cache records stop matching


def hash_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def step_key(build: Build, step: str, config: dict, parents: dict[str, str]) -> str:
    """A step's cache key: its settings, its inputs' hashes, the source and the tool versions."""
    return hash_json(
        {
            "cache_version": CACHE_VERSION,
            "step": step,
            "config": config,
            "parents": parents,
            "source": build.source_sha256,
            "tools": build.tools,
        }
    )


def write_text(path: Path, text: str) -> None:
    """Write atomically, and not at all when unchanged, so a cached re-run leaves every mtime alone."""
    if path.is_file() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def to_json(value: Any) -> str:
    return json.dumps(value, indent=2) + "\n"


def run_step(
    build: Build, step: str, key: str, work: Callable[[], dict], intact: Callable[[dict], bool]
) -> dict:
    """The recorded result when the key matches and the outputs are still there; else run and record."""
    record_path = build.out / STEPS_DIR / f"{step}.json"
    recorded = _recorded(record_path, key)
    if recorded is not None and intact(recorded):
        build.log(f"{step}: cached")
        build.statuses[step] = "cached"
        return recorded
    record_path.unlink(missing_ok=True)  # a half-done step must not look cached after a crash
    build.log(f"{step}: running")
    started = time.perf_counter()
    result = work()
    write_text(record_path, to_json({"key": key, "result": result}))
    build.log(f"{step}: done in {time.perf_counter() - started:.1f} s")
    build.statuses[step] = "built"
    return result


def _recorded(path: Path, key: str) -> dict | None:
    """The result a step record holds for this key; None when there is none, or it is for other inputs."""
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):  # none yet, or cut short by a crash: run the step
        return None
    return record.get("result") if isinstance(record, dict) and record.get("key") == key else None


def artifact_intact(build: Build, result: dict) -> bool:
    """The artifact the record names is there with the recorded content (every file present)."""
    directory = build.out / result["artifact"]
    try:
        manifest = read_manifest(directory)
        require_intact(directory, manifest, hashes=False)  # hashing GBs on every run would defeat caching
    except KilnError:
        return False
    return artifact_hash(manifest) == result["artifact_sha256"]
