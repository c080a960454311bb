"""The summary of a build: one row per artifact, the failures, and the same as Markdown for people."""

from __future__ import annotations

import json
from pathlib import Path

from modelkiln.build.directory import Build
from modelkiln.build.recipe import EXPORT_NAME, is_figure
from modelkiln.manifest import sha256_file


def _size(directory: Path) -> int | None:
    if not directory.is_dir():
        return None
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def _figures(quality: dict | None) -> dict[str, float]:
    return {k: v for k, v in (quality or {}).items() if is_figure(v)}


def _rows(build: Build, export: dict, validation: dict | None, variants: list[dict]) -> list[dict]:
    """One row per artifact: the export first, then every variant in recipe order."""
    export_row = {
        "name": EXPORT_NAME,
        "scheme": None,
        "precision": export["precision"],
        "artifact": export["artifact"],
        "artifact_sha256": export["artifact_sha256"],
        "size_bytes": _size(build.out / export["artifact"]),
        "quality": {},
        "gates": [],
        "passed": validation is None or validation["passed"],
        "error": None,
    }
    rows = [export_row]
    for variant in variants:
        kept = variant["passed"]
        rows.append(
            {
                "name": variant["name"],
                "scheme": variant["scheme"],
                "precision": variant.get("precision"),
                "artifact": variant.get("artifact") if kept else None,
                "artifact_sha256": variant.get("artifact_sha256") if kept else None,
                "size_bytes": _size(build.out / variant["artifact"]) if kept else None,
                "quality": _figures(variant.get("quality")),
                "gates": variant["gates"],
                "passed": kept,
                "error": variant.get("error"),
            }
        )
    return rows


def _failures(validation: dict | None, rows: list[dict]) -> list[str]:
    failures = []
    if validation is not None and not validation["passed"]:
        failures.append(f"validation of {EXPORT_NAME} against PyTorch failed; see {validation['report']}")
    for row in rows[1:]:
        if row["error"]:
            failures.append(f"{row['name']}: {row['error']}")
        for gate in row["gates"]:
            if not gate["passed"]:
                failures.append(
                    f"{row['name']}: {gate['gate']} {gate['limit']} not met ({gate['value']:.4g})"
                )
    return failures


def summarise(build: Build, export: dict, validation: dict | None, variants: list[dict], bench) -> dict:
    rows = _rows(build, export, validation, variants)
    failures = _failures(validation, rows)
    return {
        "recipe": build.recipe.path.name,
        "recipe_sha256": sha256_file(build.recipe.path),
        "passed": not failures,
        "failures": failures,
        "source": {
            "model": build.recipe.source.model,
            "family": export["family"],
            "weights_sha256": build.weights_sha256,
        },
        "steps": dict(build.statuses),
        "validation": validation,
        "artifacts": rows,
        "bench": bench,
    }


def _mb(size: int | None) -> str:
    return "-" if size is None else f"{size / 1e6:.2f}"


def _validation_lines(build: Build, validation: dict | None) -> list[str]:
    """Every check of the validation report that has a pass/fail, whatever the family's report holds."""
    if validation is None:
        return ["Validation is off in this recipe."]
    report = json.loads((build.out / validation["report"]).read_text())
    lines = ["| check | result | detail |", "|---|---|---|"]
    for group, checks in report.items():
        if not isinstance(checks, dict):
            continue
        for name, check in checks.items():
            if isinstance(check, dict) and "passed" in check:
                detail = (
                    f"max abs diff {check['max_abs_diff']:.2e} (limit {check['limit']:.2e})"
                    if "max_abs_diff" in check
                    else f"{check.get('matches', '-')}/{check.get('total', '-')} match"
                )
                lines.append(f"| {group}: {name} | {'ok' if check['passed'] else 'FAIL'} | {detail} |")
    return lines


def markdown(build: Build, summary: dict) -> str:
    fp32 = summary["artifacts"][0]["size_bytes"]
    lines = [
        f"# kiln build {summary['recipe']}: {'passed' if summary['passed'] else 'FAILED'}",
        "",
        f"Source `{summary['source']['model']}` ({summary['source']['family']}, "
        f"weights sha256 {summary['source']['weights_sha256'][:16]}...).",
        "",
        "| artifact | scheme | precision | size MB | of fp32 | quality vs fp32 | gates | result |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["artifacts"]:
        ratio = f"{row['size_bytes'] / fp32:.0%}" if row["size_bytes"] and fp32 else "-"
        # The parent's own figures and the image count describe the measurement, not the variant.
        shown = {k: v for k, v in row["quality"].items() if k != "images" and not k.startswith("parent_")}
        quality = ", ".join(f"{k} {v:.3g}" for k, v in shown.items()) or "-"
        gates = ", ".join(f"{g['gate']} {g['limit']:g}: {g['value']:.3g}" for g in row["gates"]) or "-"
        result = "ok" if row["passed"] else "FAILED"
        lines.append(
            f"| {row['name']} | {row['scheme'] or 'export'} | {row['precision'] or '-'} | "
            f"{_mb(row['size_bytes'])} | {ratio} | {quality} | {gates} | {result} |"
        )
    lines += ["", "## Validation against PyTorch", "", *_validation_lines(build, summary["validation"])]
    if summary["bench"]:
        lines += ["", f"## Benchmark ({summary['bench']['report']})", "", "| variant | p50 ms | vs eager |"]
        lines.append("|---|---|---|")
        rows = summary["bench"]["rows"]
        lines += [f"| {r['name']} | {r['p50_ms']:.1f} | {r['speedup_vs_eager']:.2f}x |" for r in rows]
    if summary["failures"]:
        lines += ["", "## Failures", "", *(f"- {failure}" for failure in summary["failures"])]
    lines += ["", "## Steps", "", *(f"- {step}: {status}" for step, status in summary["steps"].items())]
    return "\n".join(lines) + "\n"
