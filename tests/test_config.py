"""The one config: profiles, overrides, validation messages, round-trip through JSON and the CLI."""

from __future__ import annotations

import json

import pytest

from medcap_helpers.cli import main, parse_assignment
from medcap_helpers.config import BLIP_LARGE_ID, TINY_MODEL, ConfigError, MedcapConfig


def test_profiles_differ_where_they_should() -> None:
    smoke, full = MedcapConfig.from_profile("smoke"), MedcapConfig.from_profile("full")
    assert (smoke.model_name, smoke.data_source, smoke.device) == (TINY_MODEL, "smoke", "cpu")
    assert (full.model_name, full.data_source, full.device) == (BLIP_LARGE_ID, "openi", "cuda")
    # Batches of 16 studies, the learning rate scaled from the seed's (batch 4, 2e-4) by the square root of the
    # batch; the same epochs and schedule. The 4 GB budget fits micro-batch and checkpointing, not the batch.
    assert (full.per_device_train_batch_size, full.gradient_accumulation_steps, full.learning_rate,
            full.num_train_epochs, full.lr_scheduler_type) == (16, 1, 4e-4, 5.0, "cosine")
    assert full.learning_rate == pytest.approx(2e-4 * (full.effective_batch_size / 4) ** 0.5)
    assert full.vram_budget_gb == 4.0 and full.sweep_strategy == "halving" and full.sweep_budget_share == 1.0
    # The seed's settings stay one override away.
    seed = MedcapConfig.from_profile("full", per_device_train_batch_size=1, gradient_accumulation_steps=4,
                                     learning_rate=2e-4, vram_budget_gb=None)
    assert (seed.effective_batch_size, seed.vram_budget_gb) == (4, None)
    assert full.lora_r == 8 and full.lora_alpha == 32 and full.lora_target_modules == ("query", "value", "dense")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lora_r": 0}, "lora_r must be a whole number >= 1"),
        ({"sweep_strategy": "random"}, "sweep_strategy='random' is not one of 'halving', 'grid'"),
        ({"sweep_budget_share": 0}, "sweep_budget_share must be a positive share of one training run"),
        ({"sweep_eval_examples": 0}, "sweep_eval_examples must be a whole number >= 1"),
        ({"learning_rate": -1e-4}, "learning_rate must be a number in (0, 1)"),
        ({"lora_target_modules": ("query", "attn")}, "Unknown LoRA target module(s) ['attn']"),
        ({"split_ratios": (0.5, 0.5, 0.5)}, "split_ratios must sum to 1"),
        ({"target": "summary"}, "target='summary' is not one of"),
        ({"data_source": "openi", "data_path": None}, "needs data_path"),
        ({"split_mode": "r2gen", "data_source": "xrv_reports"}, "has no such ids"),
        ({"vram_budget_gb": 0}, "vram_budget_gb must be a positive number"),
        ({"num_beams": 1.5}, "num_beams must be a whole number"),
        ({"lora_dropout": 1.0}, "lora_dropout must be in [0, 1)"),
    ],
)
def test_invalid_values_are_named_in_the_error(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        MedcapConfig.from_profile("smoke", **overrides)
    assert message in str(err.value)


def test_unknown_setting_is_rejected() -> None:
    with pytest.raises(ConfigError, match="Unknown setting"):
        MedcapConfig.from_profile("smoke", lora_rank=8)


def test_json_round_trip_keeps_every_value(tmp_path) -> None:
    config = MedcapConfig.from_profile("full", lora_r=16, sweep_ranks=(4, 8), vram_budget_gb=4.0)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    assert MedcapConfig.load(path) == config


def test_replace_revalidates() -> None:
    with pytest.raises(ConfigError):
        MedcapConfig.from_profile("smoke").replace(gradient_accumulation_steps=0)


def test_cli_assignments_are_literals() -> None:
    assert parse_assignment("lora_r=16") == ("lora_r", 16)
    assert parse_assignment("sweep_ranks=(4, 8)") == ("sweep_ranks", (4, 8))
    assert parse_assignment("model_name=Salesforce/blip") == ("model_name", "Salesforce/blip")
    with pytest.raises(ConfigError, match="Unknown setting"):
        parse_assignment("rank=3")


def test_a_switch_takes_the_words_people_type_and_nothing_else(capsys) -> None:
    for word, value in (("false", False), ("True", True), ("off", False), ("yes", True), ("0", False)):
        assert parse_assignment(f"sdpa_attention={word}") == ("sdpa_attention", value)
    # before, "false" stayed a string, which is truthy: the setting was switched on
    with pytest.raises(ConfigError, match="sdpa_attention must be True or False, got 'maybe'"):
        MedcapConfig.from_profile("smoke", sdpa_attention="maybe")
    with pytest.raises(ConfigError, match="must be True or False"):
        MedcapConfig.from_profile("smoke", dequantize_frozen_weights=1)
    assert main(["config", "--set", "dequantize_frozen_weights=maybe"]) == 2
    assert "dequantize_frozen_weights must be True or False" in capsys.readouterr().err


def test_cli_reports_config_errors_without_a_traceback(capsys) -> None:
    assert main(["config", "--set", "lora_r=0"]) == 2
    assert "configuration error: lora_r must be" in capsys.readouterr().err
    assert main(["config", "--profile", "full", "--set", "lora_r=4"]) == 0
    assert json.loads(capsys.readouterr().out)["lora_r"] == 4


def test_cli_unwritable_run_folder_is_a_clear_error(tmp_path, capsys) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    assert main(["run", "--out", str(blocked / "run"), "--stages", "01"]) == 2
    assert "Cannot write to the run folder" in capsys.readouterr().err
