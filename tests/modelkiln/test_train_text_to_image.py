"""The fixture training script's cheap parts (training itself never runs in CI): its argument checks,
the command it records, the resumed start and what it writes beside the pipeline."""

from __future__ import annotations

import json
import shlex

import pytest

pytest.importorskip("diffusers")

from modelkiln.fixtures import TEXT_TO_IMAGE_DIR
from modelkiln.fixtures import train_text_to_image as train
from modelkiln.manifest import CALIBRATION_PROMPTS_NAME


def test_resume_from_a_folder_it_did_not_write_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--out", str(tmp_path / "out"), "--resume", str(tmp_path)])
    assert exit_info.value.code == 2
    assert (
        f"--resume {tmp_path}: no training.json there; give a folder this script wrote"
        in capsys.readouterr().err
    )


def test_a_non_positive_count_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--out", str(tmp_path), "--steps", "0"])
    assert (
        "--steps, --vae-steps, --batch-size, --threads and --eval-steps must be at least 1"
        in capsys.readouterr().err
    )


def test_recorded_command_spells_out_every_setting_and_parses_back_to_them(tmp_path):
    args = train.parse_args(["--out", str(tmp_path / "somewhere"), "--steps", "8000", "--lr", "5e-4"])
    command = train.reproduction(args)
    assert "somewhere" not in command and command.startswith(
        "python -m modelkiln.fixtures.train_text_to_image --out DIR --vae-steps 1000 --steps 8000"
    )
    again = train.parse_args(shlex.split(command)[3:])
    assert {**vars(again), "out": None} == {**vars(args), "out": None}


def test_resumed_start_continues_the_shipped_fixture_with_its_own_encoders_and_scaling():
    transformer, text, vae, scaling = train.resumed_start(TEXT_TO_IMAGE_DIR)
    config = json.loads((TEXT_TO_IMAGE_DIR / "vae" / "config.json").read_text())
    assert scaling == (config["shift_factor"], config["scaling_factor"])
    states, pooled = text(["a small red circle on a white background"], zeros=3)
    # Two 32-wide encoders side by side: CLIP's tokens, then the zeros that stand for T5.
    assert states.shape == (1, train.CLIP_LENGTH + 3, 2 * train.TEXT_WIDTH) and pooled.shape == (1, 64)
    assert not states[0, train.CLIP_LENGTH :].any()
    assert transformer.config.joint_attention_dim == 2 * train.TEXT_WIDTH
    assert vae.config.latent_channels == train.LATENT_CHANNELS


def test_saved_folder_forgets_where_its_parent_was_loaded_and_ships_calibration_prompts(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(
        json.dumps({"_name_or_path": "/home/me/run1", "a": 1})
    )
    train.forget_load_paths(tmp_path)
    assert json.loads((tmp_path / "transformer" / "config.json").read_text()) == {"a": 1}
    train.write_calibration_prompts(tmp_path)
    assert (tmp_path / CALIBRATION_PROMPTS_NAME).read_text() == (
        TEXT_TO_IMAGE_DIR / CALIBRATION_PROMPTS_NAME
    ).read_text()
