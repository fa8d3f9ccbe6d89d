"""Out of memory in training or generation: a short message with the settings and what to change.

CUDA is simulated on the CPU: the training step or the generation of a batch
(``generation.multiview_generate``) raises ``torch.cuda.OutOfMemoryError`` as PyTorch's allocator does.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from medcap_helpers import budget, devices, generation
from medcap_helpers.checkpoints import last_complete_checkpoint
from medcap_helpers.devices import OutOfMemory
from medcap_helpers.generation import generate_reports
from medcap_helpers.train import MedcapTrainer, train
from tests.test_train import qlora_model, smoke_config, synthetic_rows

CUDA_OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 3.81 GiB of which "
            "1.02 GiB is free.\nIncluding non-PyTorch memory, this process has 2.70 GiB memory in use.")


def oom_after_step(limit: int, error: BaseException | None = None):  # noqa: ANN201
    """A ``training_step`` that runs normally until ``global_step`` reaches ``limit``, then fails."""
    original = MedcapTrainer.training_step

    def training_step(self, model, inputs, num_items_in_batch=None):  # noqa: ANN001, ANN202
        if self.state.global_step >= limit:
            raise error if error is not None else torch.cuda.OutOfMemoryError(CUDA_OOM)
        return original(self, model, inputs, num_items_in_batch)

    return training_step


def test_training_oom_names_the_settings_keeps_checkpoints_and_a_rerun_resumes(tmp_path, monkeypatch):
    rows = synthetic_rows()
    dataset = {"train": rows, "validation": rows[:2]}
    config = smoke_config(tmp_path / "run", num_train_epochs=2.0, gradient_checkpointing=False,
                          per_device_train_batch_size=4, gradient_accumulation_steps=1, max_target_tokens=32,
                          max_new_tokens=4)
    model, processor = qlora_model(config)
    monkeypatch.setattr(MedcapTrainer, "training_step", oom_after_step(2))  # epoch 2's first step
    with pytest.raises(OutOfMemory) as caught:
        train(config, model, processor, dataset)
    message = str(caught.value)
    assert isinstance(caught.value, torch.cuda.OutOfMemoryError)  # callers catching torch's OOM still do
    assert message.startswith("Out of memory while training: CUDA out of memory. Tried to allocate 2.00 GiB")
    for fragment in ("per_device_train_batch_size=4", "gradient_accumulation_steps=1", "max_target_tokens=32",
                     "gradient_checkpointing=False", "per_device_train_batch_size=2, gradient_accumulation_steps=2",
                     "gradient_checkpointing=True", "--vram-budget-gb"):
        assert fragment in message
    checkpoint = config.run_path / "checkpoints" / "checkpoint-2"
    assert f"rerunning continues from {checkpoint}" in message
    assert len(message) < 1000 and "Traceback" not in message and "Including non-PyTorch" not in message
    # Partial results stay; nothing claims the training finished.
    assert last_complete_checkpoint(config.run_path / "checkpoints") == checkpoint
    assert not (config.run_path / "metrics" / "train.json").exists()
    assert not (config.run_path / "adapter").exists()

    monkeypatch.undo()
    model, processor = qlora_model(config)
    result = train(config, model, processor, dataset)
    assert result.resumed_from == str(checkpoint) and result.global_step == 4


def test_oom_in_the_validation_reports_says_generation_and_keeps_checkpoints(tmp_path, monkeypatch):
    rows = synthetic_rows()
    config = smoke_config(tmp_path / "run", num_train_epochs=1.0, eval_batch_size=2, num_beams=2, max_new_tokens=16)
    model, processor = qlora_model(config)
    tried = []

    def generate(model, pixel_values, **kwargs):  # noqa: ANN001, ANN003, ANN202
        tried.append(pixel_values.shape[0])
        raise torch.cuda.OutOfMemoryError(CUDA_OOM)

    monkeypatch.setattr(generation, "multiview_generate", generate)
    with pytest.raises(OutOfMemory) as caught:
        train(config, model, processor, {"train": rows, "validation": rows[:4]})
    assert tried == [2, 1], "a batch that runs out of memory is retried smaller, down to one study"
    message = str(caught.value)
    assert message.startswith("Out of memory while generating reports: CUDA out of memory")
    for fragment in ("batch_size=2", "num_beams=2", "max_new_tokens=16", "eval_batch_size=1", "num_beams=1",
                     "0 of 4 reports were generated", "No checkpoint was saved yet"):
        assert fragment in message


def test_generation_shrinks_a_batch_that_runs_out_of_memory_keeps_going_and_remembers_it(tmp_path, monkeypatch):
    config = smoke_config(tmp_path / "run")
    model, processor = qlora_model(config)
    images = [row["image"] for row in synthetic_rows()[:5]]
    expected = generate_reports(model, processor, images, max_new_tokens=4, batch_size=1, progress=False)
    tried = []
    real_generate = generation.multiview_generate

    def generate(model, pixel_values, **kwargs):  # noqa: ANN001, ANN003, ANN202
        tried.append(pixel_values.shape[0])
        if pixel_values.shape[0] > 2:  # the device holds two studies at a time
            raise torch.cuda.OutOfMemoryError(CUDA_OOM)
        return real_generate(model, pixel_values, **kwargs)

    monkeypatch.setattr(generation, "multiview_generate", generate)
    model.train()
    with pytest.warns(RuntimeWarning) as warned:
        reports = generate_reports(model, processor, images, max_new_tokens=4, batch_size=4, progress=False)
    assert [str(w.message) for w in warned] == [
        f"Generating reports: a batch of {n} studies ran out of GPU memory; going on with batches of {n * 3 // 4}."
        for n in (4, 3)]
    assert tried == [4, 3, 2, 2, 1], "4 fails, 3 fails, then batches of 2 (the last holds what is left)"
    assert reports == expected, "no report is lost or repeated when a batch is retried"
    assert model.training, "generate_reports restores the model's train/eval mode"
    tried.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a later call of the process starts at the size that fit: no retry
        assert generate_reports(model, processor, images, max_new_tokens=4, batch_size=4, progress=False) == expected
    assert tried == [2, 2, 1]
    tried.clear()  # other settings are another key: their first batch is tried at its own size
    with pytest.warns(RuntimeWarning, match="a batch of 4 studies"):
        generate_reports(model, processor, images, max_new_tokens=5, batch_size=4, progress=False)
    assert tried[0] == 4


def test_generation_oom_at_one_study_names_beams_batch_and_length(tmp_path, monkeypatch):
    config = smoke_config(tmp_path / "run")
    model, processor = qlora_model(config)
    images = [row["image"] for row in synthetic_rows()[:4]]
    calls = []
    real_generate = generation.multiview_generate

    def generate(model, pixel_values, **kwargs):  # noqa: ANN001, ANN003, ANN202
        calls.append(pixel_values.shape[0])
        if len(calls) > 1:  # the first batch fits, nothing after it does
            raise torch.cuda.OutOfMemoryError(CUDA_OOM)
        return real_generate(model, pixel_values, **kwargs)

    monkeypatch.setattr(generation, "multiview_generate", generate)
    model.train()
    with pytest.raises(OutOfMemory) as caught:
        generate_reports(model, processor, images, max_new_tokens=4, num_beams=3, batch_size=2, progress=False)
    assert calls == [2, 2, 1]
    message = str(caught.value)
    for fragment in ("Out of memory while generating reports", "batch_size=2", "num_beams=3", "max_new_tokens=4",
                     "eval_batch_size=1", "num_beams=1", "2 of 4 reports were generated"):
        assert fragment in message
    assert model.training, "generate_reports restores the model's train/eval mode after an OOM too"


def test_other_errors_are_not_disguised_as_oom(tmp_path, monkeypatch):
    rows = synthetic_rows()
    config = smoke_config(tmp_path / "run", num_train_epochs=1.0, max_new_tokens=4)
    model, processor = qlora_model(config)
    monkeypatch.setattr(MedcapTrainer, "training_step", oom_after_step(0, RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="^shape mismatch$") as caught:
        train(config, model, processor, {"train": rows, "validation": rows[:2]})
    assert not isinstance(caught.value, OutOfMemory)


def test_the_budget_probe_and_sweep_still_recognise_the_explained_oom():
    explained = OutOfMemory("Out of memory while training: CUDA out of memory.")
    assert devices.is_out_of_memory(explained)
    candidates = budget.candidate_settings(2)

    def probe(candidate):  # noqa: ANN001, ANN202
        if candidate.per_device_train_batch_size == 2:
            raise explained
        return 1.0, 5.0

    fit = budget.fit_to_budget(candidates, probe, budget_gb=4.0)
    assert [o.status for o in fit.tried][:2] == ["out of memory", "out of memory"]
    assert fit.chosen is not None and fit.chosen.per_device_train_batch_size == 1
