"""QLoRA training through the HF Trainer on CPU: overfitting, run folder, resume, loss scaling."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image, ImageDraw

from medcap_helpers import errors, generation, runs
from medcap_helpers import model as M
from medcap_helpers.checkpoints import last_complete_checkpoint, load_adapter_model
from medcap_helpers.config import MedcapConfig
from medcap_helpers.processing import CaptionCollator
from medcap_helpers.train import MedcapTrainer, metric_log_key, train

REPORTS = [
    "Heart size is normal. Lungs are clear.",
    "Small left pleural effusion.",
    "No acute cardiopulmonary disease.",
    "Mild cardiomegaly with clear lungs.",
    "Right upper lobe opacity, possible pneumonia.",
    "Degenerative changes of the spine.",
    "The trachea is midline. No pneumothorax.",
    "Low lung volumes with bibasilar atelectasis.",
]
COLOURS = [(255, 0, 0), (0, 0, 255), (0, 160, 0), (255, 255, 255), (0, 0, 0), (255, 255, 0), (128, 0, 128),
           (0, 200, 200)]


def synthetic_rows() -> list[dict]:
    """Eight distinct images (solid colour + an offset square of another colour), one report each."""
    rows = []
    for i, text in enumerate(REPORTS):
        image = Image.new("RGB", (96, 96), COLOURS[i])
        ImageDraw.Draw(image).rectangle([i * 8, i * 8, i * 8 + 30, i * 8 + 30], fill=COLOURS[(i + 3) % 8])
        rows.append({"image": image, "text": text, "study_id": f"s{i}", "image_id": f"i{i}"})
    return rows


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def smoke_config(run_dir, **overrides) -> MedcapConfig:
    values = dict(run_dir=str(run_dir), tiny_init_range=0.1, learning_rate=1e-2, lr_scheduler_type="constant",
                  per_device_train_batch_size=4, gradient_accumulation_steps=1, logging_steps=1,
                  max_target_tokens=32, max_new_tokens=24, num_beams=1, eval_batch_size=8, lora_dropout=0.0,
                  load_in_4bit=True, gradient_checkpointing=True, best_model_metric="CIDEr",
                  cache_vision_embeddings=False)  # these tests train on pixels; tests/test_vision_cache.py on the cache
    values.update(overrides)
    return MedcapConfig.from_profile("smoke", **values)


def qlora_model(config: MedcapConfig):
    base, processor = M.load_model_and_processor(config, texts=REPORTS)
    return M.attach_lora(base, config), processor


OVERFIT_EPOCHS = 20
"""Enough for every seed: with seeds 0-11 all 8 reports were copied exactly, the best epoch (by
validation CIDEr) was epoch 8-15; after 12 epochs 3 of those 12 seeds still had only 5-6 exact."""


@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
    """A 4-bit tiny BLIP trained with QLoRA for 20 epochs on the 8 synthetic examples (validated on them)."""
    config = smoke_config(tmp_path_factory.mktemp("overfit_run"), num_train_epochs=float(OVERFIT_EPOCHS))
    model, processor = qlora_model(config)
    rows = synthetic_rows()
    result = train(config, model, processor, {"train": rows, "validation": rows})
    return config, model, processor, rows, result


def test_qlora_tiny_model_overfits_eight_reports(overfit):
    import bitsandbytes as bnb

    config, model, processor, rows, result = overfit
    base = M.unwrap_model(model)
    assert isinstance(base.text_decoder.bert.encoder.layer[0].attention.self.key, bnb.nn.Linear4bit)
    assert isinstance(base.vision_model.encoder.layers[0].self_attn.qkv, bnb.nn.Linear4bit)

    losses = [epoch["train_loss"] for epoch in result.history]
    assert len(losses) == OVERFIT_EPOCHS and all(loss is not None for loss in losses)
    # two optimizer steps per epoch: the first of them takes part of the epoch's training time
    assert all(0 < e["first_step_seconds"] < e["train_seconds"] for e in result.history)
    assert losses[-1] < losses[0] / 2, f"training loss did not halve: {losses}"

    reports = generation.generate_reports(model, processor, [row["image"] for row in rows], max_new_tokens=24,
                                 num_beams=1, progress=False)
    exact = [normalise(p) == normalise(row["text"]) for p, row in zip(reports, rows)]
    assert exact[0], f"first training image: {reports[0]!r} vs {rows[0]['text']!r}"
    assert sum(exact) >= 7, list(zip(reports, REPORTS))  # 8 of 8 for each of seeds 0-11; one spare
    assert result.best_cider is not None and result.best_cider > 5.0  # CIDEr-D of near-perfect copies


def test_validation_cider_selects_the_best_epoch(overfit):
    _, _, _, _, result = overfit
    ciders = [epoch["val_cider"] for epoch in result.history]
    assert all(isinstance(c, float) for c in ciders)
    assert result.best_cider == max(ciders)
    assert result.best_epoch == result.history[ciders.index(max(ciders))]["epoch"]
    assert ciders[-1] > ciders[0]
    first = result.history[0]
    assert {"CIDEr", "BLEU-1", "BLEU-4", "ROUGE-L"} <= set(first["val_scores"])
    assert first["eval_loss"] is not None and first["eval_loss"] > result.history[-1]["eval_loss"]
    best_step = int(result.best_checkpoint.rsplit("-", 1)[1])
    assert best_step == 2 * result.best_epoch  # two optimizer steps per epoch
    assert metric_log_key("BLEU-4") == "bleu_4" and metric_log_key("ROUGE-L") == "rouge_l"


def test_run_folder_holds_adapter_and_train_metrics(overfit):
    config, model, processor, rows, result = overfit
    run = config.run_path
    assert result.adapter_dir == run / "adapter"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "adapter" / "tokenizer.json").is_file()  # the processor travels with the adapter
    assert not list(run.glob("adapter/*.bin"))

    metrics = runs.read_stage_metrics(run, "train")
    assert len(metrics["epochs"]) == OVERFIT_EPOCHS
    for epoch in metrics["epochs"]:
        assert isinstance(epoch["val_cider"], float) and epoch["train_loss"] > 0 and epoch["eval_loss"] > 0
        assert epoch["peak_memory"]["peak_rss_gb"] > 0  # training part of the epoch
        assert epoch["peak_memory"]["validation_peak_rss_gb"] >= epoch["peak_memory"]["peak_rss_gb"]
    assert metrics["best_epoch"] == result.best_epoch and metrics["best_val_cider"] == result.best_cider
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    assert metrics["wall_time_s"] > 0
    assert result.peak_memory and all("peak_rss_gb" in p for p in result.peak_memory)


def test_the_kept_epochs_validation_reports_are_saved_for_stage_05(overfit):
    config, model, processor, rows, result = overfit
    ids = [row["image_id"] for row in rows]
    saved = runs.load_best_epoch_predictions(config.run_path, ids)
    assert saved is not None and len(saved) == len(rows)
    # They are the reports the kept adapter writes: stage 05 need not generate them again.
    assert saved == generation.generate_reports(model, processor, [row["image"] for row in rows],
                                                max_new_tokens=config.max_new_tokens, progress=False)
    assert runs.load_best_epoch_predictions(config.run_path, ids[::-1]) is None, "other studies: not reused"


def test_saved_adapter_reloads_onto_a_fresh_four_bit_base(overfit):
    config, model, processor, rows, result = overfit
    images = [row["image"] for row in rows[:4]]
    in_memory = generation.generate_reports(model, processor, images, max_new_tokens=24, progress=False)
    reloaded = load_adapter_model(config, result.adapter_dir)
    assert M.is_quantized(reloaded)
    assert generation.generate_reports(reloaded, processor, images, max_new_tokens=24, progress=False) == in_memory
    with pytest.raises(errors.ModelLoadError, match="adapter"):
        load_adapter_model(config, config.run_path / "no_adapter_here")


def test_training_resumes_from_the_last_checkpoint(tmp_path):
    rows = synthetic_rows()
    dataset = {"train": rows, "validation": rows[:2]}
    config = smoke_config(tmp_path / "run", num_train_epochs=1.0)
    model, processor = qlora_model(config)
    first = train(config, model, processor, dataset)
    assert first.resumed_from is None and first.global_step == 2

    longer = config.replace(num_train_epochs=2.0)
    model, processor = qlora_model(longer)  # a fresh process would rebuild the model like this
    second = train(longer, model, processor, dataset)
    assert second.resumed_from is not None and second.resumed_from.endswith("checkpoint-2")
    assert second.global_step == 4
    assert [epoch["epoch"] for epoch in second.history] == [1.0, 2.0]
    assert second.history[0]["train_loss"] == pytest.approx(first.history[0]["train_loss"])
    state = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def test_logged_loss_is_a_mean_under_gradient_accumulation(tmp_path):
    """BLIP returns a mean loss; the Trainer must divide by the accumulation steps, not treat it as a sum."""
    rows = synthetic_rows()
    config = smoke_config(tmp_path / "run", num_train_epochs=1.0, per_device_train_batch_size=1,
                          gradient_accumulation_steps=8, gradient_checkpointing=False)
    model, processor = qlora_model(config)
    collator = CaptionCollator(processor, config.max_target_tokens)
    model.train()
    with torch.no_grad():
        expected = sum(model(**collator([row])).loss.item() for row in rows) / len(rows)
    result = train(config, model, processor, {"train": rows, "validation": rows[:2]})
    state = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-1" / "trainer_state.json").read_text())
    logged = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert logged[0] == pytest.approx(expected, rel=1e-3)
    assert result.history[0]["train_loss"] == pytest.approx(expected, rel=1e-3)


def test_trainer_does_not_pass_loss_kwargs_to_blip(overfit):
    # BLIP.forward has **kwargs, which the Trainer would read as "handles num_items_in_batch"
    config, model, processor, rows, _ = overfit
    from medcap_helpers.train import training_arguments

    trainer = MedcapTrainer(model=model, args=training_arguments(config, config.run_path / "tmp_args",
                                                                 torch.device("cpu")),
                            train_dataset=rows, eval_dataset=rows, data_collator=CaptionCollator(processor, 16))
    assert trainer.model_accepts_loss_kwargs is False


def test_last_complete_checkpoint_needs_trainer_state(tmp_path):
    assert last_complete_checkpoint(tmp_path / "absent") is None
    for step in (2, 4, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-10.tmp").mkdir()
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-4"  # checkpoint-6 is half-written


def test_train_needs_a_validation_split(tmp_path):
    config = smoke_config(tmp_path / "run")
    model, processor = qlora_model(config)
    with pytest.raises(KeyError, match="validation"):
        train(config, model, processor, {"train": synthetic_rows()})


def test_one_process_trains_on_one_gpu_even_where_several_are_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a two-GPU machine the Trainer doubled every batch (n_gpu=2) and put it all on one GPU."""
    from types import SimpleNamespace

    from medcap_helpers.train import one_gpu_per_process

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert one_gpu_per_process(SimpleNamespace(n_gpu=2, _n_gpu=2))._n_gpu == 1
    assert one_gpu_per_process(SimpleNamespace(n_gpu=0, _n_gpu=0))._n_gpu == 0  # the CPU stays the CPU
    monkeypatch.setenv("WORLD_SIZE", "2")  # a torchrun process: DDP, where the Trainer's n_gpu is 1 already
    assert one_gpu_per_process(SimpleNamespace(n_gpu=2, _n_gpu=2))._n_gpu == 2


def test_group_by_length_batches_reports_of_similar_length(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One epoch of 64 reports of 1-4 sentences in batches of 2: grouped by length, the same reports are
    trained on with far less padding than in random batches."""
    from datasets import Dataset

    from medcap_helpers import train as T
    from medcap_helpers.errors import ConfigError

    seen: list[list[int]] = []
    original = T.CaptionCollator.__call__

    def recording(self, rows):  # noqa: ANN001, ANN202
        if "length" in rows[0]:
            seen.append([row["length"] for row in rows])
        return original(self, rows)

    monkeypatch.setattr(T.CaptionCollator, "__call__", recording)
    rows = Dataset.from_list([{**row, "text": " ".join([row["text"]] * (1 + (i * 5 + j) % 4))}
                              for j in range(8) for i, row in enumerate(synthetic_rows())])
    validation = Dataset.from_list(synthetic_rows())
    padded: dict[bool, int] = {}
    for grouped in (False, True):
        seen.clear()
        config = smoke_config(tmp_path / str(grouped), group_by_length=grouped, per_device_train_batch_size=2,
                              num_train_epochs=1.0, load_in_4bit=False, gradient_checkpointing=False,
                              max_target_tokens=48)
        model, processor = qlora_model(config)
        if not grouped:  # random batches carry no length: add it for the count only
            rows_for_run = T.with_token_lengths(rows, processor.tokenizer, config.max_target_tokens)
        else:
            rows_for_run = rows
        T.train(config, model, processor, {"train": rows_for_run, "validation": validation})
        expected = list(T.with_token_lengths(rows, processor.tokenizer, config.max_target_tokens)["length"])
        training = seen[:32]  # then the validation loss's 4 batches
        assert len(seen) in (32, 36) and sorted(n for batch in training for n in batch) == sorted(expected)
        padded[grouped] = sum(max(batch) * len(batch) for batch in training)
    assert padded[True] < 0.9 * padded[False], padded

    with pytest.raises(ConfigError, match="group_by_length"):
        T.train(config, model, processor, {"train": synthetic_rows(), "validation": synthetic_rows()})
