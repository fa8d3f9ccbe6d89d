"""The sweep's bookkeeping: trials recorded, reruns skip finished trials, budget verdicts, halving rungs."""

from __future__ import annotations

from pathlib import Path

import pytest

from medcap_helpers import runs
from medcap_helpers.config import MedcapConfig
from medcap_helpers.sweep import (
    choose_trial,
    halving_schedule,
    run_sweep,
    schedule_markdown,
    training_sample,
    trial_config,
)


def make_runner(peak_gpu_gb, score=None):
    calls: list[tuple[int, int]] = []
    score = score or (lambda c: c.lora_r / 100 + c.lora_alpha / 1000)

    def run_trial(config: MedcapConfig) -> dict:
        calls.append((config.lora_r, config.lora_alpha))
        if config.sweep_strategy == "grid":
            assert config.num_train_epochs == config.sweep_epochs and config.max_train_examples is None
        assert config.run_dir.endswith(f"r{config.lora_r}_alpha{config.lora_alpha}")
        return {"val_cider": score(config), "trainable_params": config.lora_r * 1000,
                "peak_gpu_gb": peak_gpu_gb(config), "examples_seen": config.max_train_examples,
                "epochs": config.num_train_epochs}

    return run_trial, calls


def test_rerunning_the_sweep_skips_finished_trials(tmp_path) -> None:
    config = MedcapConfig.from_profile("smoke", run_dir=str(tmp_path), sweep_ranks=(4, 8), sweep_alphas=(16, 32),
                                       sweep_strategy="grid")
    runner, calls = make_runner(lambda c: None)
    first = run_sweep(config, runner, n_train=100)
    assert len(calls) == 4 and first.skipped == []
    assert first.chosen["lora_r"] == 8 and first.chosen["lora_alpha"] == 32
    assert all(t["feasible"] is None for t in first.trials)  # CPU: budget can't be measured
    assert "can't be measured on the CPU" in first.budget_note

    # A half-finished trial (no trial.json) runs again; finished ones are read back.
    (tmp_path / "sweep" / "r8_alpha32" / "trial.json").unlink()
    runner2, calls2 = make_runner(lambda c: None)
    second = run_sweep(config, runner2, n_train=100)
    assert calls2 == [(8, 32)]
    assert sorted(second.skipped) == ["r4_alpha16", "r4_alpha32", "r8_alpha16"]
    assert [t["val_cider"] for t in second.trials] == [t["val_cider"] for t in first.trials]


def test_trials_over_budget_are_infeasible_and_not_chosen(tmp_path) -> None:
    config = MedcapConfig.from_profile("smoke", run_dir=str(tmp_path), sweep_ranks=(4, 32), sweep_alphas=(16,),
                                       sweep_vram_budget_gb=4.0, sweep_strategy="grid")
    runner, _ = make_runner(lambda c: 5.0 if c.lora_r == 32 else 3.0)
    result = run_sweep(config, runner, n_train=100)
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

    config = MedcapConfig.from_profile("smoke", run_dir=str(tmp_path), sweep_strategy="grid")
    trial = trial_config(config, 16, 64)
    assert (trial.lora_r, trial.lora_alpha, trial.num_train_epochs) == (16, 64, config.sweep_epochs)
    assert trial.run_dir.endswith("r16_alpha64")
    # The trial loads the parent run's tiny model and processor, not a new random one of its own.
    assert trial.model_name == str(local_model_dir(config).resolve())
    hub = config.replace(model_name="Salesforce/blip-image-captioning-large")
    assert trial_config(hub, 4, 16).model_name == hub.model_name


def test_halving_schedule_halves_the_trials_doubles_their_examples_and_stays_within_budget() -> None:
    rungs = halving_schedule(12, n_train=2069, budget_examples=10345)
    assert [r.trials for r in rungs] == [12, 6, 4, 2]  # halves rounded up to an even number: 2 GPUs share evenly
    assert [r.train_examples for r in rungs] == [184, 368, 736, 1472]
    assert sum(r.trials * r.train_examples for r in rungs) <= 10345
    assert [r.trials for r in halving_schedule(4, 10, 100)] == [4, 2]
    assert [r.trials for r in halving_schedule(2, 10, 100)] == [2]
    assert [r.trials for r in halving_schedule(5, 10, 100)] == [5, 4, 2]
    assert [r.trials for r in halving_schedule(16, 10, 100)] == [16, 8, 4, 2]
    assert halving_schedule(5, 10, 1)[0].train_examples == 1  # a tiny budget still trains every trial
    with pytest.raises(ValueError):
        halving_schedule(0, 10, 100)


def test_halving_keeps_the_better_half_each_rung_and_chooses_from_the_last(tmp_path) -> None:
    config = MedcapConfig.from_profile("smoke", run_dir=str(tmp_path), sweep_ranks=(4, 8, 16), sweep_alphas=(16, 32),
                                       num_train_epochs=2.0, sweep_budget_share=1.0)
    # Each rung's leader falls behind once the trials train longer: only the last rung decides.
    score = {(16, 32): [0.9, 0.2, 0.1], (8, 32): [0.8, 0.5, 0.6], (16, 16): [0.7, 0.6, 0.3]}
    rung_of = {}

    def scored(c: MedcapConfig) -> float:
        key = (c.lora_r, c.lora_alpha)
        rung_of[key] = rung_of.get(key, -1) + 1
        return score.get(key, [0.1, 0.1, 0.1])[rung_of[key]]

    runner, _ = make_runner(lambda c: None, scored)
    result = run_sweep(config, runner, n_train=40)
    # 6 settings, then 4, then 2, on 3, 6 and 12 examples: 6*3 + 4*6 + 2*12 = 66 <= 80 = 2 epochs of 40
    assert [t["rung"] for t in result.trials] == [0] * 6 + [1] * 4 + [2] * 2
    assert [t["train_examples"] for t in result.trials] == [3] * 6 + [6] * 4 + [12] * 2
    assert sum(t["train_examples"] for t in result.trials) <= 40 * config.num_train_epochs
    assert [(t["lora_r"], t["lora_alpha"]) for t in result.trials if t["rung"] == 1] == [(16, 32), (8, 32), (16, 16), (4, 16)]
    assert [(t["lora_r"], t["lora_alpha"]) for t in result.trials if t["rung"] == 2] == [(16, 16), (8, 32)]
    assert (result.chosen["lora_r"], result.chosen["lora_alpha"]) == (8, 32)  # best of the last rung only
    assert runs.read_json(tmp_path / "sweep" / "chosen.json")["lora_r"] == 8
    assert "11 trials" not in schedule_markdown(config, 40) and "6 trials x 3 examples" in schedule_markdown(config, 40)

    # A rerun reads every finished trial back and trains nothing.
    rerun_runner, rerun_calls = make_runner(lambda c: None, scored)
    again = run_sweep(config, rerun_runner, n_train=40)
    assert rerun_calls == [] and len(again.skipped) == 12 and again.chosen == result.chosen


def test_a_rung_beyond_the_training_set_trains_several_epochs_on_all_of_it(tmp_path) -> None:
    config = MedcapConfig.from_profile("smoke", run_dir=str(tmp_path))
    rung = halving_schedule(4, n_train=210, budget_examples=0.6 * 210 * 20)[1]
    trial = trial_config(config, 4, 16, rung, n_train=210)
    assert rung.train_examples == 630
    assert (trial.max_train_examples, trial.num_train_epochs) == (210, 3.0)
    assert trial.run_dir.endswith("sweep/rung1/r4_alpha16")
    with pytest.raises(ValueError):
        trial_config(config, 4, 16, rung)


def test_trials_train_with_the_batch_settings_03_fitted_to_the_budget(tmp_path) -> None:
    config = MedcapConfig.from_profile("smoke", run_dir=str(tmp_path), vram_budget_gb=4.0)
    assert trial_config(config, 4, 16).per_device_train_batch_size == config.per_device_train_batch_size
    settings = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "gradient_checkpointing": True,
                "learning_rate": 1.0}
    runs.write_stage_metrics(tmp_path, "03_qlora_train", {"training_settings": settings, "budget_fit": {"chosen": {}}})
    trial = trial_config(config, 4, 16)
    assert (trial.per_device_train_batch_size, trial.gradient_accumulation_steps, trial.gradient_checkpointing) == \
        (4, 2, True)
    assert trial.learning_rate == config.learning_rate, "only the batch settings are taken over"


def test_training_sample_is_fixed_by_the_seed_and_never_larger_than_the_split() -> None:
    rows = [{"text": str(i)} for i in range(50)]
    first = training_sample(rows, 10, seed=3)
    assert first == training_sample(rows, 10, seed=3) and len({r["text"] for r in first}) == 10
    assert first != training_sample(rows, 10, seed=4)
    assert training_sample(rows, 80, seed=3) is rows and training_sample(rows, None, seed=3) is rows


@pytest.mark.slow
def test_trials_in_two_processes_record_what_one_process_records(smoke_run: dict, tmp_path: Path) -> None:
    """Two GPUs in a real sweep; here this process and one worker process on the CPU, the worker started
    once for both rungs, each taking its next trial from the shared queue."""
    import os
    import shutil
    import time

    from medcap_helpers import sweep
    from medcap_helpers.data import load_saved_dataset

    started: list[list[int | None]] = []
    original_close = sweep.TrialWorkers.close

    def close_and_note(workers: sweep.TrialWorkers) -> None:
        started.append(workers.pids)
        original_close(workers)

    def after_a_worker_trial(run_trial: sweep.TrialRunner, rung0: Path) -> sweep.TrialRunner:
        """This process's first trial waits until the worker has recorded one: both take part, however
        fast this process trains and however slowly the worker starts."""
        def run(config: MedcapConfig) -> dict:
            deadline = time.monotonic() + 300
            while not list(rung0.glob("*/trial.json")) and time.monotonic() < deadline:
                time.sleep(0.2)
            return run_trial(config)
        return run

    results = {}
    for processes in (1, 2):
        run = tmp_path / f"run{processes}"
        shutil.copytree(smoke_run["dir"], run, symlinks=True,
                        ignore=shutil.ignore_patterns("kernel-ipc-*", ".lock*", "sweep"))
        config = MedcapConfig.load(run / "config.json").replace(
            run_dir=str(run), sweep_ranks=(2, 4), sweep_alphas=(16, 64), sweep_budget_share=0.05)
        dataset = load_saved_dataset(run)[0]
        run_trial = sweep.trial_runner(dataset)
        if processes == 2:
            run_trial = after_a_worker_trial(run_trial, run / "sweep" / "rung0")
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sweep.TrialWorkers, "close", close_and_note)
            results[processes] = run_sweep(config, run_trial, n_train=len(dataset["train"]), processes=processes)
    one, two = results[1], results[2]
    assert [t["rung"] for t in two.trials] == [0, 0, 0, 0, 1, 1]
    keys = ("lora_r", "lora_alpha", "val_cider", "val_ce_micro_f1", "trainable_params", "train_examples")
    assert [{k: t[k] for k in keys} for t in two.trials] == [{k: t[k] for k in keys} for t in one.trials]
    assert len(started) == 1 and len(started[0]) == 1  # one worker for both rungs (none for one process)
    assert {t["process_id"] for t in two.trials} == {os.getpid(), started[0][0]}  # both trained trials
    assert {t["process_id"] for t in one.trials} == {os.getpid()}


def test_a_failing_trial_in_this_process_stops_the_rung_and_names_the_setting(tmp_path: Path) -> None:
    """The calling process trains too: its failure ends the rung like a worker's, trials not yet taken stay undone."""
    from medcap_helpers.errors import StageFailed
    from medcap_helpers.sweep import TrialWorkers

    config = MedcapConfig.from_profile("smoke", run_dir=str(tmp_path / "no-saved-dataset"))
    workers = TrialWorkers(config, n_train=10, processes=1)  # no worker process: this process takes every trial
    tried = []

    def fail(rank: int, alpha: int) -> None:
        tried.append((rank, alpha))
        raise RuntimeError("CUDA out of memory (as a test)")

    try:
        with pytest.raises(StageFailed, match=r"(?s)r=4 alpha=16.*CUDA out of memory"):
            workers.run(halving_schedule(3, 10, 10)[0], [(4, 16), (4, 64), (8, 16)], run_here=fail)
        assert tried == [(4, 16)]  # the first failure stops the rung: the other two are not started
        assert workers._take() is None
    finally:
        workers.close()


def test_a_failing_trial_in_a_worker_process_stops_the_sweep_with_its_error(tmp_path: Path) -> None:
    from medcap_helpers.errors import StageFailed
    from medcap_helpers.sweep import TrialWorkers

    config = MedcapConfig.from_profile("smoke", run_dir=str(tmp_path / "no-saved-dataset"))
    workers = TrialWorkers(config, n_train=10, processes=2)
    assert not any(process.daemon for process in workers._processes)  # a GPU trial's data loader starts children
    try:
        with pytest.raises(StageFailed, match="died|failed"):
            workers.run(halving_schedule(2, 10, 10)[0], [(4, 16), (4, 64)])
    finally:
        workers.close()


def test_trials_share_the_main_runs_vision_cache(tmp_path) -> None:
    config = MedcapConfig.from_profile("smoke", run_dir=str(tmp_path), sweep_strategy="grid")
    assert trial_config(config, 4, 16).vision_cache_dir == str(tmp_path / "vision_cache")
    shared = config.replace(vision_cache_dir=str(tmp_path / "elsewhere"))
    assert trial_config(shared, 4, 16).vision_cache_dir == shared.vision_cache_dir


def test_the_smoke_sweeps_trials_cached_nothing_of_their_own(smoke_run: dict) -> None:
    """04's trials train and generate from the tokens 02 and 03 cached: no trial folder holds a cache."""
    run_dir = Path(smoke_run["dir"])
    assert list((run_dir / "sweep").rglob("*.npy")) == []
    assert any((run_dir / "vision_cache").rglob("*.npy"))


def test_a_trial_worker_process_forks_its_data_loader_workers() -> None:
    """A process started with spawn would spawn its data loaders' workers too: a fresh interpreter each."""
    import subprocess
    import sys

    script = ("import multiprocessing as mp; mp.set_start_method('spawn'); "
              "from medcap_helpers.sweep import fork_data_loader_workers; "
              "fork_data_loader_workers(); print(mp.get_start_method())")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "fork"
