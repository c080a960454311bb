"""The dataset benchmark's projection and report from a measured report (the measuring itself is a
benchmark, run by hand: python -m modelkiln.benchmarks.captioning.dataset)."""

from __future__ import annotations

import pytest

from modelkiln.benchmarks.captioning.dataset import markdown, project


def _report() -> dict:
    model = {
        "images": 600,
        "pipeline": {1: {"images_per_s": 200.0}},
        "local": {1: {"images_per_s": 100.0}, 32: {"images_per_s": 400.0}},
        "ray": {
            1: {"images_per_s": 150.0, "marginal_images_per_s": 300.0, "fixed_s": 6.0},
            2: {"images_per_s": 90.0, "marginal_images_per_s": None, "fixed_s": None},
        },
        "ray_init_s": 5.0,
        "file_bytes": 1_000.0,
        "pixel_bytes": 27_648,
    }
    machine = {
        "cpu": "Some CPU",
        "cores": 2,
        "load_average": (1.0, 1.0, 1.0),
        "load_average_end": (2.0, 2.0, 2.0),
    }
    machine |= {"python": "3.11", "onnxruntime": "1.32", "ray": "2.60"}
    return {"config": {"out": "o", "repeats": 2, "ray_batch": 32}, "machine": machine, "models": {"m": model}}


def test_projection_takes_the_best_rate_of_a_node():
    projection = project(_report())["m"]
    assert projection["node_images_per_s"] == 400.0  # the local engine's batch 32 beats Ray's marginal rate
    assert projection["core_seconds_per_image"] == pytest.approx(2 / 400)
    one_million = projection["scales"]["1M"]
    assert one_million["one_node_hours"] == pytest.approx(1e6 / 400 / 3600)
    assert one_million["nodes_for_one_day"] == 1
    assert projection["scales"]["100M"]["nodes_for_one_day"] == 3  # 100M / (400 * 86400) = 2.9
    assert one_million["object_store_gb"] == pytest.approx(1e6 * 28_648 / 1e9)


def test_report_names_the_machine_and_a_marginal_rate_lost_in_noise():
    report = _report()
    report["projection"] = project(report)
    text = markdown(report)
    assert "Some CPU, 2 cores" in text and "marginal 300.0/s, fixed 6.0 s" in text
    assert "marginal rate lost in noise" in text and "| m | 400.0 | 0.0050 | 100M |" in text
