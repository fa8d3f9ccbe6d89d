"""A training run killed with SIGKILL mid-epoch resumes when the same command is run again.

Real processes (``tests/train_worker.py``: build_dataset -> load_model_and_processor -> train), not mocks:
the first is killed in the middle of epoch 2, once epoch 1's checkpoint is complete; the rerun must
continue from that checkpoint and end with a ``metrics/train.json`` shaped like an uninterrupted run's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medcap_helpers.checkpoints import last_complete_checkpoint

WORKER = Path(__file__).with_name("train_worker.py")
REPO_ROOT = WORKER.parents[1]
EPOCHS, STEPS_PER_EPOCH = 3, 2
TIMEOUT_S = 180


def start(run_dir: Path, log: Path, step_delay: float = 0.0) -> subprocess.Popen:
    """The worker with its stdout (``step N`` lines) in ``log`` and its stderr (progress bars) beside it."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log, "w") as out, open(log.with_suffix(".err"), "w") as err:
        return subprocess.Popen([sys.executable, str(WORKER), str(run_dir), "--step-delay", str(step_delay)],
                                cwd=REPO_ROOT, env=env, stdout=out, stderr=err)


def log_tail(log: Path) -> str:
    return log.read_text()[-1000:] + "\n--- stderr ---\n" + log.with_suffix(".err").read_text()[-3000:]


def uninterrupted_run(run_dir: Path) -> dict:
    """The same run as the worker's, in this process, never interrupted (one thread: the worker runs alongside)."""
    import torch

    from medcap_helpers import data, model, train

    spec = importlib.util.spec_from_file_location("train_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    config = worker.worker_config(str(run_dir))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dataset, _ = data.build_dataset(config, progress=False)
        base, processor = model.load_model_and_processor(config, dataset)
        train.train(config, base, processor, dataset)
    finally:
        torch.set_num_threads(threads)
    return json.loads((run_dir / "metrics" / "train.json").read_text())


def finish(process: subprocess.Popen, log: Path) -> str:
    try:
        process.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert process.returncode == 0, f"worker failed:\n{log_tail(log)}"
    return log.read_text()


def wait_for(condition, process: subprocess.Popen, log: Path, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the worker exited ({process.returncode}) before {what}:\n{log_tail(log)}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def shape(metrics: dict) -> dict:
    """Keys of train.json and of each epoch entry (values differ between runs, the layout must not)."""
    return {"keys": sorted(metrics), "epochs": [e["epoch"] for e in metrics["epochs"]],
            "epoch_keys": [sorted(e) for e in metrics["epochs"]],
            "score_keys": [sorted(e["val_scores"]) for e in metrics["epochs"]],
            "memory_keys": [sorted(e["peak_memory"]) for e in metrics["epochs"]]}


def test_sigkilled_training_resumes_from_the_last_complete_checkpoint(tmp_path: Path) -> None:
    killed_dir = tmp_path / "killed"
    checkpoints = killed_dir / "checkpoints"
    victim_log = tmp_path / "victim.log"
    victim = start(killed_dir, victim_log, step_delay=1.0)
    # The uninterrupted reference runs here while the worker that will be killed starts up.
    uninterrupted = uninterrupted_run(tmp_path / "reference")

    first_step_of_epoch_2 = f"step {STEPS_PER_EPOCH + 1}\n"
    wait_for(lambda: list(checkpoints.glob("checkpoint-*/trainer_state.json"))
             and first_step_of_epoch_2 in victim_log.read_text(), victim, victim_log,
             "a complete checkpoint and a step of epoch 2")
    assert victim.poll() is None, "training ended before it could be interrupted"
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL

    # Killed mid-epoch: epoch 1's checkpoint is complete, nothing marks the run finished.
    assert last_complete_checkpoint(checkpoints) == checkpoints / f"checkpoint-{STEPS_PER_EPOCH}"
    assert not (killed_dir / "metrics" / "train.json").exists()
    assert not (killed_dir / "adapter").exists()
    # What a kill while the Trainer saved the next checkpoint leaves: a cut-off trainer_state.json.
    half = checkpoints / f"checkpoint-{2 * STEPS_PER_EPOCH}"
    half.mkdir()
    (half / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    (half / "trainer_state.json").write_text('{"best_metric": 0.0, "global_st')

    rerun_log = tmp_path / "rerun.log"
    rerun_text = finish(start(killed_dir, rerun_log), rerun_log)
    assert f"resumed_from={checkpoints / f'checkpoint-{STEPS_PER_EPOCH}'}" in rerun_text
    resumed = json.loads((killed_dir / "metrics" / "train.json").read_text())
    assert resumed["resumed_from"] == str(checkpoints / f"checkpoint-{STEPS_PER_EPOCH}")
    assert resumed["global_step"] == EPOCHS * STEPS_PER_EPOCH
    # The rerun's steps continue from the checkpoint: it never runs step 1 or 2 again.
    steps = [int(line.split()[1]) for line in rerun_text.splitlines() if line.startswith("step ")]
    assert steps == list(range(STEPS_PER_EPOCH + 1, EPOCHS * STEPS_PER_EPOCH + 1))
    assert (killed_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(killed_dir.glob(".adapter.*"))
    state = json.loads((checkpoints / f"checkpoint-{EPOCHS * STEPS_PER_EPOCH}" / "trainer_state.json").read_text())
    assert state["global_step"] == EPOCHS * STEPS_PER_EPOCH

    assert uninterrupted["resumed_from"] is None
    assert shape(resumed) == shape(uninterrupted)
    assert len(resumed["epochs"]) == EPOCHS
    # Epoch 1 comes from the killed process's checkpoint, epochs 2 and 3 from the rerun: every epoch is the
    # same computation as the reference's (the rerun restores weights, optimizer, scheduler and RNG state).
    for resumed_epoch, reference_epoch in zip(resumed["epochs"], uninterrupted["epochs"], strict=True):
        for loss in ("train_loss", "eval_loss"):
            assert resumed_epoch[loss] is not None, (resumed_epoch["epoch"], loss)
            assert resumed_epoch[loss] == pytest.approx(reference_epoch[loss], rel=1e-5), (resumed_epoch["epoch"], loss)
