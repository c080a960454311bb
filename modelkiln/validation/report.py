"""The report both validations return: every check group, the settings, and whether the source still
matches the artifact's manifest; recorded in the manifest when the config asks."""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

from modelkiln.manifest import Manifest, write_manifest


def finish_report(
    artifact_dir: str | os.PathLike,
    manifest: Manifest,
    source: Any,
    model: str,
    config: Any,
    checks: dict[str, dict[str, dict]],
    inputs: dict[str, str] | None = None,
) -> dict:
    """The report: passed when every row of every check group (name -> row with "passed") passed;
    ``inputs`` describes what was compared (e.g. which images)."""
    passed = all(row["passed"] for rows in checks.values() for row in rows.values())
    report = {
        "passed": passed,
        "model": model,
        "source_matches_manifest": source.weights_sha256 == manifest.source.weights_sha256,
        **(inputs or {}),
        "settings": {k: v for k, v in asdict(config).items() if k not in {"update_manifest", "allow_pickle"}},
        **checks,
    }
    # Recorded in the artifact itself: `kiln inspect` shows it and a build checks it is still there.
    if config.update_manifest:
        write_manifest(artifact_dir, manifest.with_validation(report))
    return report
