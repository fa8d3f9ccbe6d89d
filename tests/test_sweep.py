"""The sweep's bookkeeping: trials recorded, reruns skip finished trials, budget verdicts."""

from __future__ import annotations

from medcap_helpers.config import MedcapConfig
from medcap_helpers.sweep import choose_trial, run_sweep


def make_runner(peak_gpu_gb):
    calls: list[tuple[int, int]] = []

    def run_trial(config: MedcapConfig) -> dict:
        calls.append((config.lora_r, config.lora_alpha))
        assert config.num_train_epochs == config.sweep_epochs
        assert config.run_dir.endswith(f"r{config.lora_r}_alpha{config.lora_alpha}")
        return {"val_cider": config.lora_r / 100 + config.lora_alpha / 1000,
                "trainable_params": config.lora_r * 1000, "peak_gpu_gb": peak_gpu_gb(config)}

    return run_trial, calls


def test_rerunning_the_sweep_skips_finished_trials(tmp_path) -> None:
    config = MedcapConfig.from_profile("smoke", run_dir=str(tmp_path), sweep_ranks=(4, 8), sweep_alphas=(16, 32))
    runner, calls = make_runner(lambda c: None)
    first = run_sweep(config, runner)
    assert len(calls) == 4 and first.skipped == []
    assert first.chosen["lora_r"] == 8 and first.chosen["lora_alpha"] == 32
    assert all(t["feasible"] is None for t in first.trials)  # CPU: budget can't be measured
    assert "can't be measured on the CPU" in first.budget_note

    # A half-finished trial (no trial.json) runs again; finished ones are read back.
    (tmp_path / "sweep" / "r8_alpha32" / "trial.json").unlink()
    runner2, calls2 = make_runner(lambda c: None)
    second = run_sweep(config, runner2)
    assert calls2 == [(8, 32)]
    assert sorted(second.skipped) == ["r4_alpha16", "r4_alpha32", "r8_alpha16"]
    assert [t["val_cider"] for t in second.trials] == [t["val_cider"] for t in first.trials]


def test_trials_over_budget_are_infeasible_and_not_chosen(tmp_path) -> None:
    config = MedcapConfig.from_profile("smoke", run_dir=str(tmp_path), sweep_ranks=(4, 32), sweep_alphas=(16,),
                                       sweep_vram_budget_gb=4.0)
    runner, _ = make_runner(lambda c: 5.0 if c.lora_r == 32 else 3.0)
    result = run_sweep(config, runner)
    verdicts = {t["lora_r"]: t["feasible"] for t in result.trials}
    assert verdicts == {4: True, 32: False}
    assert result.chosen["lora_r"] == 4  # the better-scoring r=32 exceeds the budget
    assert (tmp_path / "sweep" / "chosen.json").exists()


def test_choose_trial_prefers_smaller_rank_on_ties() -> None:
    trials = [{"lora_r": 16, "lora_alpha": 32, "val_cider": 0.5, "feasible": None},
              {"lora_r": 4, "lora_alpha": 32, "val_cider": 0.5, "feasible": None}]
    assert choose_trial(trials)["lora_r"] == 4
    assert choose_trial([]) is None


def test_tiny_model_trials_reuse_the_main_runs_model(tmp_path) -> None:
    from medcap_helpers.processing import local_model_dir
    from medcap_helpers.sweep import trial_config

    config = MedcapConfig.from_profile("smoke", run_dir=str(tmp_path))
    trial = trial_config(config, 16, 64)
    assert (trial.lora_r, trial.lora_alpha, trial.num_train_epochs) == (16, 64, config.sweep_epochs)
    assert trial.run_dir.endswith("r16_alpha64")
    # The trial loads the parent run's tiny model and processor, not a new random one of its own.
    assert trial.model_name == str(local_model_dir(config).resolve())
    hub = config.replace(model_name="Salesforce/blip-image-captioning-large")
    assert trial_config(hub, 4, 16).model_name == hub.model_name
