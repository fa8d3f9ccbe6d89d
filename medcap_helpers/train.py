"""QLoRA training with the Hugging Face ``Trainer``: per-epoch generated-report CIDEr, best epoch, resume.

:func:`train` runs ``Trainer`` with one evaluation and one checkpoint per epoch. Each evaluation
computes the teacher-forced ``eval_loss`` and then *generates* a report for every validation image
(``config.max_new_tokens``, ``config.num_beams``) and scores it with
:func:`medcap_helpers.metrics.caption_scores` and :func:`medcap_helpers.metrics.clinical_efficacy_scores`;
the scores reach the Trainer as ``eval_cider``, ``eval_ce_micro_f1``, ``eval_bleu_1`` ... so
``load_best_model_at_end`` keeps the epoch with the best validation ``config.best_model_metric`` (CIDEr,
or CE micro-F1).
Training resumes from the last complete checkpoint in ``<run_dir>/checkpoints``. The best adapter
(safetensors) and the processor go to ``<run_dir>/adapter``; ``<run_dir>/metrics/train.json`` records
every epoch.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from medcap_helpers import runs, vision_cache
from medcap_helpers.checkpoints import (
    last_complete_checkpoint,
    remove_incomplete_checkpoints,
    save_adapter,
)
from medcap_helpers.config import MedcapConfig
from medcap_helpers.devices import (
    OutOfMemory,
    compute_dtype,
    is_out_of_memory,
    memory_snapshot,
    out_of_memory,
    pick_device,
    release_memory,
    reset_peak_memory,
    synchronize_gpu,
)
from medcap_helpers.errors import ConfigError
from medcap_helpers.frozen_weights import make_dequantized_weights, release_dequantized_weights
from medcap_helpers.generation import (
    compile_backend,
    generate_reports,
    generation_batch_size,
    generation_inputs,
    graph_step,
)
from medcap_helpers.metrics import (
    CE_MACRO_F1,
    CE_MICRO_F1,
    caption_scores,
    clinical_efficacy_scores,
)
from medcap_helpers.model import (
    attach_lora,
    check_tokenizer_matches,
    image_tokens_per_view,
    remove_input_grad_hooks,
    trainable_parameters,
)
from medcap_helpers.multiview import accept_views, caption_outputs
from medcap_helpers.pretrain import pretraining_record
from medcap_helpers.processing import CaptionCollator, pad_to_static_shape
from medcap_helpers.profiling import TorchProfilerCallback

if TYPE_CHECKING:  # pragma: no cover
    from transformers import BlipProcessor

Scorer = Callable[[list[str], list[str]], dict[str, float]]
TRAIN_SPLITS = ("train",)
VAL_SPLITS = ("validation", "val", "valid")
SCORE_NAMES = {"cider": "CIDEr", "bleu_1": "BLEU-1", "bleu_2": "BLEU-2", "bleu_3": "BLEU-3", "bleu_4": "BLEU-4",
               "rouge_l": "ROUGE-L", "meteor": "METEOR", "ce_micro_f1": CE_MICRO_F1, "ce_macro_f1": CE_MACRO_F1}
MEMORY_KEYS = ("max_allocated_gb", "max_reserved_gb", "device_used_gb", "process_gpu_gb", "other_processes_gpu_gb",
               "peak_rss_gb")
"""Per-epoch peaks kept from :func:`~medcap_helpers.model.memory_snapshot` (CUDA allocator/NVML; CPU RSS)."""
_ALL_MEMORY_KEYS = frozenset(MEMORY_KEYS) | {f"validation_{key}" for key in MEMORY_KEYS}


@dataclass
class TrainResult:
    """What :func:`train` produced. ``history`` has one dict per epoch (see :func:`epoch_history`)."""

    history: list[dict[str, Any]]
    best_epoch: float | None
    best_cider: float | None
    adapter_dir: Path
    peak_memory: list[dict[str, Any]]
    train_runtime_s: float
    trainable_params: int = 0
    total_params: int = 0
    global_step: int = 0
    resumed_from: str | None = None
    best_checkpoint: str | None = None
    log_history: list[dict[str, Any]] = field(default_factory=list)
    """The Trainer's raw log (per logging step), for loss curves."""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["adapter_dir"] = str(self.adapter_dir)
        return data


# --------------------------------------------------------------------------------------- helpers
def metric_log_key(score_name: str) -> str:
    """``"BLEU-4"`` -> ``"bleu_4"`` (the Trainer logs it as ``eval_bleu_4``)."""
    return re.sub(r"[^0-9a-z]+", "_", score_name.lower()).strip("_")


def _split(dataset_dict: Mapping[str, Any], names: Sequence[str], what: str) -> Any:
    for name in names:
        if name in dataset_dict and dataset_dict[name] is not None:
            return dataset_dict[name]
    raise KeyError(f"The dataset has no {what} split (looked for {list(names)}; it has {list(dataset_dict)}).")


LENGTH_COLUMN = "length"


def with_token_lengths(rows: Any, tokenizer: Any, max_length: int) -> Any:
    """``rows`` (a ``datasets.Dataset``) with each report's token count, as the collator will truncate it,
    in :data:`LENGTH_COLUMN`: what ``group_by_length`` sorts by, without decoding an image."""
    lengths = [len(ids) for ids in tokenizer(text_column(rows), truncation=True, max_length=max_length)["input_ids"]]
    if LENGTH_COLUMN in rows.column_names:
        rows = rows.remove_columns(LENGTH_COLUMN)
    return rows.add_column(LENGTH_COLUMN, lengths)


def text_column(rows: Any) -> list[str]:
    """The ``text`` of every row, without decoding images (column access on a ``datasets.Dataset``)."""
    if hasattr(rows, "column_names"):
        return [str(t) for t in rows["text"]]
    return [str(row["text"]) for row in rows]


def _default_scorer() -> Scorer:
    """:func:`medcap_helpers.metrics.caption_scores` without METEOR (a Java run per epoch; CIDEr selects),
    plus the clinical efficacy of the generated reports (CE micro-F1 and macro-F1, no interval)."""
    def validation_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
        scores = caption_scores(predictions, references, meteor=False)
        ce = clinical_efficacy_scores(predictions, references)
        scores.update({CE_MICRO_F1: ce[CE_MICRO_F1], CE_MACRO_F1: ce[CE_MACRO_F1]})
        return scores

    return validation_scores


def training_split(dataset_dict: Mapping[str, Any]) -> Any:
    return _split(dataset_dict, TRAIN_SPLITS, "training")


def validation_split(dataset_dict: Mapping[str, Any]) -> Any:
    return _split(dataset_dict, VAL_SPLITS, "validation")


# --------------------------------------------------------------------------------------- callbacks
class PeakMemoryCallback(TrainerCallback):
    """Record each epoch's peak memory, training and validation apart, in the log history and :attr:`records`.

    Training (epoch start to epoch end): ``max_allocated_gb``/``max_reserved_gb`` from the CUDA
    allocator and, when NVML is available, ``device_used_gb`` (whole device), ``process_gpu_gb`` (this
    process, as nvidia-smi lists it) and ``other_processes_gpu_gb`` (the others) at the epoch's end; on
    CPU ``peak_rss_gb`` (the process's lifetime peak, which cannot be reset). Validation (the evaluation after the
    epoch, report generation included): the same keys prefixed ``validation_``.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.records: list[dict[str, Any]] = []

    def _peaks(self, prefix: str = "") -> dict[str, float]:
        snap = memory_snapshot(self.device)
        return {prefix + key: snap[key] for key in MEMORY_KEYS if key in snap}

    def _append(self, state: Any, peaks: dict[str, float]) -> None:
        record = {"epoch": round(float(state.epoch or 0.0), 4), "step": state.global_step, **peaks}
        state.log_history.append(dict(record))
        self.records.append(record)

    def on_epoch_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        reset_peak_memory(self.device)

    def on_epoch_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        self._append(state, self._peaks())
        reset_peak_memory(self.device)  # the evaluation that follows is measured on its own

    def on_evaluate(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        self._append(state, self._peaks("validation_"))


class _EpochTrainLossCallback(TrainerCallback):
    """Write each epoch's mean training loss (from the trainer's running sum) and training time to the log
    history. The time runs from the epoch's start to its last optimizer step: validation and checkpoint
    saving, which follow, are not in it, so it gives the training throughput. The time to the epoch's first
    optimizer step is recorded too: it holds the start-up (data-loader workers, first batches, kernel
    selection), so the rest of the epoch gives the steady rate."""

    def __init__(self, trainer: MedcapTrainer) -> None:
        self.trainer = trainer
        self.started = 0.0
        self.first_step_seconds: float | None = None

    def on_epoch_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        self.trainer.reset_epoch_loss()
        self.first_step_seconds = None
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        if self.first_step_seconds is None:
            synchronize_gpu()
            self.first_step_seconds = time.perf_counter() - self.started

    def on_epoch_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        synchronize_gpu()  # the last step's kernels belong to this epoch
        state.log_history.append({"epoch": round(float(state.epoch or 0.0), 4), "step": state.global_step,
                                  "train_seconds_epoch": time.perf_counter() - self.started,
                                  "first_step_seconds_epoch": self.first_step_seconds,
                                  "train_loss_epoch": self.trainer.epoch_mean_loss()})


def _caption_loss(model: Any, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """What ``compile_training`` compiles: the batch's mean loss through the model's own call."""
    return model(**inputs).loss


def training_compile_backend(config: MedcapConfig, device: torch.device) -> str | None:
    """``"inductor"`` when ``config.compile_training`` asks for it on one GPU, else None (eager). Several
    data-parallel processes train eagerly: CUDA graphs under ``DistributedDataParallel`` are not measured."""
    one_process = int(os.environ.get("WORLD_SIZE", "1")) == 1
    return "inductor" if config.compile_training and device.type == "cuda" and one_process else None


# --------------------------------------------------------------------------------------- trainer
class MedcapTrainer(Trainer):
    """``Trainer`` whose evaluation also generates validation reports and scores them.

    BLIP's ``forward`` takes ``**kwargs`` but always returns a per-batch *mean* loss, so the Trainer
    must not pass ``num_items_in_batch`` nor skip dividing by the accumulation steps:
    ``model_accepts_loss_kwargs`` is forced to False.
    """

    def __init__(self, *args: Any, generation_rows: Sequence[Mapping[str, Any]] = (),
                 processor: BlipProcessor | None = None, medcap_config: MedcapConfig | None = None,
                 scorer: Scorer | None = None, compile_backend: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Every training batch is padded to one shape (pad_to_static_shape): one compile, and with inductor
        # its "reduce-overhead" mode records the step's kernels once as CUDA graphs and replays them.
        mode = {"mode": "reduce-overhead"} if compile_backend == "inductor" else {}
        self.compiled_loss = (torch.compile(_caption_loss, backend=compile_backend, dynamic=False, **mode)
                              if compile_backend else None)
        self.model_accepts_loss_kwargs = False
        self.generation_rows = generation_rows
        self.processor = processor
        self.medcap_config = medcap_config
        self.scorer = scorer
        self.last_predictions: list[str] = []
        self.predictions_by_step: dict[int, list[str]] = {}
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0
        self.compiled_steps = 0
        self.dequantized_weights_made = False
        self.add_callback(_EpochTrainLossCallback(self))

    # ----- per-epoch training loss
    def reset_epoch_loss(self) -> None:
        self._loss_sum, self._loss_count = None, 0

    def epoch_mean_loss(self) -> float | None:
        if not self._loss_count or self._loss_sum is None:
            return None
        return float(self._loss_sum.item()) / self._loss_count

    def training_step(self, model, inputs, num_items_in_batch=None):  # noqa: ANN001, ANN201
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        except Exception as err:  # noqa: BLE001 - only a compiler failing on its first step is handled
            if self.compiled_loss is None or self.compiled_steps or is_out_of_memory(err):
                raise
            # e.g. no working Triton or C compiler: the first compiled step fails in its forward or backward,
            # before anything was applied to the weights (gradients zeroed), so the step is taken eagerly
            warnings.warn(f"Compiling the training step failed ({type(err).__name__}: {str(err)[:300]}); "
                          "training goes on without it (compile_training=False avoids the attempt).",
                          RuntimeWarning, stacklevel=2)
            self.compiled_loss = None
            torch.compiler.reset()
            model.zero_grad(set_to_none=True)
            loss = super().training_step(model, inputs, num_items_in_batch)
        self.compiled_steps += self.compiled_loss is not None
        unscaled = loss.detach().float() * self.current_gradient_accumulation_steps
        self._loss_sum = unscaled if self._loss_sum is None else self._loss_sum + unscaled
        self._loss_count += 1
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001, ANN201
        if self.compiled_loss is not None and model.training:  # compile_training: the step's forward and backward
            accept_views(model)  # outside the compiled code: it sets the model's forward once
            if not self.dequantized_weights_made:  # likewise, once after each validation released them
                make_dequantized_weights(model)
                self.dequantized_weights_made = True
            inputs = self.static_shape(model, inputs)
            torch.compiler.cudagraph_mark_step_begin()
            loss = self.compiled_loss(model, inputs)
            return (loss, {"loss": loss}) if return_outputs else loss
        if "image_embeds" in inputs or inputs["pixel_values"].ndim == 5:  # cached tokens; two-view studies
            outputs = caption_outputs(model, inputs)
            return (outputs.loss, outputs) if return_outputs else outputs.loss
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def static_shape(self, model: Any, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``inputs`` padded to the micro-batch, ``max_target_tokens`` and, when studies train on both
        views, two views (:func:`~medcap_helpers.processing.pad_to_static_shape`: the same loss)."""
        config = self.medcap_config or MedcapConfig()
        view_tokens = image_tokens_per_view(model) if config.views == "both" else None
        pad_token_id = self.processor.tokenizer.pad_token_id if self.processor is not None else 0
        return pad_to_static_shape(dict(inputs), self.args.per_device_train_batch_size, config.max_target_tokens,
                                   pad_token_id, view_tokens)

    # ----- evaluation with generated reports
    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,  # noqa: ANN001, ANN201
                        metric_key_prefix="eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only=prediction_loss_only,
                                         ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        if description == "Evaluation" and self.generation_rows and self.processor is not None:
            output.metrics.update(self.generation_metrics(metric_key_prefix))
        return output

    def generation_metrics(self, prefix: str = "eval") -> dict[str, float]:
        """Generate a report per validation row and score it against the row's text.

        Data-parallel (:mod:`medcap_helpers.distributed`): each process generates a contiguous share of
        the rows and the shares are gathered in row order, so every process scores the same reports and
        picks the same best epoch.
        """
        from accelerate.utils import gather_object

        config = self.medcap_config or MedcapConfig()
        scorer = self.scorer or _default_scorer()
        rows = self.generation_rows
        release_dequantized_weights(self.model)  # generation's batches get that memory; training makes them again
        self.dequantized_weights_made = False
        with self.accelerator.split_between_processes(rows) as share:
            share_predictions = generate_reports(self.model, self.processor,
                                                 generation_inputs(self.model, self.processor, share, config),
                                                 max_new_tokens=config.max_new_tokens, num_beams=config.num_beams,
                                                 batch_size=generation_batch_size(self.model, config, self.args.device),
                                                 device=self.args.device,
                                                 min_new_tokens=config.min_new_tokens,
                                                 compile_backend=compile_backend(self.model, config),
                                                 graph_step=graph_step(self.model, config))
        predictions = gather_object(share_predictions)
        self.last_predictions = predictions
        self.predictions_by_step[self.state.global_step] = predictions
        scores = scorer(predictions, text_column(rows))  # caption_scores normalises both sides alike
        metrics = {f"{prefix}_{metric_log_key(name)}": float(value) for name, value in scores.items()}
        metrics[f"{prefix}_mean_report_words"] = sum(len(p.split()) for p in predictions) / max(len(predictions), 1)
        return metrics


# --------------------------------------------------------------------------------------- arguments
def dataloader_workers(device: torch.device) -> int:
    """Image-decoding worker processes for training on ``device``: none on the CPU (the cores train),
    up to 8 on a GPU, leaving one core for the training loop."""
    return 0 if device.type != "cuda" else max(0, min(8, (os.cpu_count() or 1) - 1))


def training_arguments(config: MedcapConfig, output_dir: str | Path, device: torch.device,
                       save_total_limit: int = 2) -> TrainingArguments:
    """``TrainingArguments`` from ``config``: per-epoch eval/save, best epoch by ``eval_cider``.

    Mixed precision follows the compute dtype on CUDA (bf16 or fp16), none on CPU. Activation
    checkpointing is non-reentrant (see :mod:`medcap_helpers.model`).
    """
    dtype = compute_dtype(config, device)
    on_cuda = device.type == "cuda"
    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    checkpointing_kwargs = {"use_reentrant": False} if config.gradient_checkpointing else None
    version_specific: dict[str, Any] = {}
    if "activation_checkpointing" in known:  # transformers >= 5.2x renamed gradient_checkpointing
        version_specific.update(activation_checkpointing=config.gradient_checkpointing,
                                activation_checkpointing_kwargs=checkpointing_kwargs)
    else:
        version_specific.update(gradient_checkpointing=config.gradient_checkpointing,
                                gradient_checkpointing_kwargs=checkpointing_kwargs)
    if config.group_by_length:  # the rows carry their token count in LENGTH_COLUMN (with_token_lengths)
        if "train_sampling_strategy" in known:  # newer transformers
            version_specific["train_sampling_strategy"] = "group_by_length"
        else:
            version_specific["group_by_length"] = True
        version_specific["length_column_name"] = LENGTH_COLUMN
    if "warmup_ratio" in known:
        version_specific["warmup_ratio"] = config.warmup_ratio
    else:  # newer transformers: a float < 1 in warmup_steps is the ratio
        version_specific["warmup_steps"] = float(config.warmup_ratio)
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.per_device_train_batch_size,
        # The validation loss is teacher-forced like training: the micro-batch that fits training fits it
        # (eval_batch_size sizes generation, which keeps far less per study).
        per_device_eval_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        num_train_epochs=config.num_train_epochs,
        lr_scheduler_type=config.lr_scheduler_type,
        weight_decay=config.weight_decay,
        optim=config.optim,
        bf16=on_cuda and dtype == torch.bfloat16,
        fp16=on_cuda and dtype == torch.float16,
        use_cpu=not on_cuda,
        seed=config.seed,
        remove_unused_columns=False,
        label_names=["labels"],
        prediction_loss_only=True,
        eval_strategy="epoch",
        save_strategy="epoch",
        load_best_model_at_end=True,
        metric_for_best_model=metric_log_key(config.best_model_metric),
        greater_is_better=True,
        save_total_limit=save_total_limit,
        logging_strategy="steps",
        logging_steps=config.logging_steps,
        report_to=[],
        disable_tqdm=False,
        # On a GPU, worker processes decode and resize the next batches' images while the GPU trains.
        dataloader_num_workers=dataloader_workers(device),
        # Not persistent: with pinned memory, persistent workers still holding prefetched batches are each
        # waited for 5 s and then killed when their loader goes (pytorch/pytorch#81794), a likely cause of
        # the ~25 s unaccounted for between sweep trials on the GPU machine (with this and the shared
        # vision cache, a one-GPU trial went from ~37 s to 5-12 s). Starting 8 forked workers per epoch
        # costs far less.
        dataloader_persistent_workers=False,
        dataloader_pin_memory=on_cuda,
        ddp_find_unused_parameters=False,  # data-parallel: every LoRA weight gets a gradient every step
        **version_specific,
    )
    return one_gpu_per_process(args)


def one_gpu_per_process(args: Any) -> Any:
    """``args`` with one GPU for this process. Started alone on a machine with several GPUs, the Trainer
    would multiply every batch by their number for ``nn.DataParallel``, and, as 4-bit models are not
    replicated, feed the whole multiplied batch to one GPU: N times the batch the budget fit measured, on
    N GPUs. Several GPUs train through :mod:`medcap_helpers.distributed` instead, one process each."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and args.n_gpu > 1:
        args._n_gpu = 1  # no public setting: the Trainer reads n_gpu, which returns this
    return args


# --------------------------------------------------------------------------------------- history
def epoch_history(log_history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One dict per epoch from the Trainer's log history.

    Keys: ``epoch``, ``step``, ``train_loss`` (mean over the epoch), ``train_seconds`` (the epoch's training
    time, validation excluded), ``first_step_seconds`` (its part up to the first optimizer step), ``eval_loss``,
    ``val_cider``,
    ``val_ce_micro_f1``, ``val_scores`` (``{"CIDEr": .., "CE micro-F1": .., "BLEU-1": .., ...}``),
    ``mean_report_words``, ``peak_memory``.
    """
    epochs: dict[float, dict[str, Any]] = {}

    def row(entry: Mapping[str, Any]) -> dict[str, Any]:
        epoch = round(float(entry.get("epoch", 0.0)), 4)
        return epochs.setdefault(epoch, {"epoch": epoch, "step": entry.get("step"), "train_loss": None,
                                         "train_seconds": None, "first_step_seconds": None, "eval_loss": None, "val_cider": None,
                                         "val_ce_micro_f1": None, "val_scores": {}, "peak_memory": {}})

    for entry in log_history:
        if "train_seconds_epoch" in entry:
            row(entry)["train_loss"] = entry["train_loss_epoch"]
            row(entry)["train_seconds"] = entry["train_seconds_epoch"]
            row(entry)["first_step_seconds"] = entry.get("first_step_seconds_epoch")
        elif any(k in _ALL_MEMORY_KEYS for k in entry) and not any(k.startswith("eval_") for k in entry):
            row(entry)["peak_memory"].update({k: v for k, v in entry.items() if k in _ALL_MEMORY_KEYS})
        elif "eval_loss" in entry or "eval_cider" in entry:
            current = row(entry)
            current["step"] = entry.get("step", current["step"])
            current["eval_loss"] = entry.get("eval_loss")
            for key, value in entry.items():
                name = key.removeprefix("eval_")
                if name in ("loss", "runtime", "samples_per_second", "steps_per_second", "model_preparation_time"):
                    continue
                if name == "mean_report_words":
                    current["mean_report_words"] = value
                elif key.startswith("eval_"):
                    current["val_scores"][SCORE_NAMES.get(name, name)] = value
            current["val_cider"] = entry.get("eval_cider")
            current["val_ce_micro_f1"] = entry.get("eval_ce_micro_f1")
    return [epochs[e] for e in sorted(epochs)]


def value_at_epoch(history: Sequence[Mapping[str, Any]], epoch: float | None, key: str) -> float | None:
    """``history``'s ``key`` (e.g. ``"val_ce_micro_f1"``) at ``epoch`` (the best one): None when absent."""
    return next((e.get(key) for e in history if epoch is not None and e.get("epoch") == epoch), None)


def best_epoch_of(history: Sequence[Mapping[str, Any]], metric: str = "CIDEr") -> tuple[float | None, float | None]:
    """(epoch, validation CIDEr) of the first epoch with the highest validation ``metric`` (the Trainer's
    choice, ``config.best_model_metric``: "CIDEr" or "CE micro-F1")."""
    best: tuple[float | None, float | None] = (None, None)
    best_value: float | None = None
    for entry in history:
        value = entry.get("val_cider") if metric == "CIDEr" else (entry.get("val_scores") or {}).get(metric)
        if value is not None and (best_value is None or value > best_value):
            best, best_value = (entry["epoch"], entry.get("val_cider")), value
    return best


# --------------------------------------------------------------------------------------- training
def train(config: MedcapConfig, model: Any, processor: BlipProcessor, dataset_dict: Mapping[str, Any],
          callbacks_extra: Sequence[TrainerCallback] | None = None, *, scorer: Scorer | None = None,
          save_total_limit: int = 2, max_generation_examples: int | None = None, lora: bool = True) -> TrainResult:
    """Fine-tune ``model`` (LoRA is attached when it is not a peft model yet) with the HF ``Trainer``.

    ``lora=False`` trains every weight of an unquantized model instead (full fine-tuning, used by the
    benchmarks to show what QLoRA saves); the model is then saved in ``<run_dir>/model``.

    ``dataset_dict`` maps ``"train"`` and ``"validation"`` (or ``"val"``) to sequences of
    ``{"image", "text"}`` rows (a ``datasets.Dataset`` or a list of dicts). Resumes from the last
    complete checkpoint in ``<run_dir>/checkpoints``. ``scorer`` defaults to
    :func:`medcap_helpers.metrics.caption_scores`; ``max_generation_examples`` caps the validation
    rows generated per epoch (default: all).
    """
    train_rows = _split(dataset_dict, TRAIN_SPLITS, "training")
    val_rows = _split(dataset_dict, VAL_SPLITS, "validation")
    if len(train_rows) == 0 or len(val_rows) == 0:
        raise ValueError(f"Training needs examples in both splits (train: {len(train_rows)}, "
                         f"validation: {len(val_rows)}).")
    if config.group_by_length:
        if not hasattr(train_rows, "column_names"):
            raise ConfigError("group_by_length needs the splits as datasets.Dataset (the run's saved dataset); "
                              "set group_by_length=False to train on lists of rows.")
        train_rows = with_token_lengths(train_rows, processor.tokenizer, config.max_target_tokens)
        val_rows = with_token_lengths(val_rows, processor.tokenizer, config.max_target_tokens)  # the loss's order
    if lora and not hasattr(model, "peft_config"):
        model = attach_lora(model, config)
    remove_input_grad_hooks(model)  # a hook registered elsewhere would crash BLIP with checkpointing
    check_tokenizer_matches(model, processor.tokenizer)
    scorer = scorer or _default_scorer()

    run_dir = runs.ensure_run_dir(config.run_dir)
    checkpoints_dir = run_dir / "checkpoints"
    device = pick_device(config)
    args = training_arguments(config, checkpoints_dir, device, save_total_limit=save_total_limit)
    generation_rows = val_rows
    if max_generation_examples is not None and max_generation_examples < len(val_rows):
        generation_rows = (val_rows.select(range(max_generation_examples)) if hasattr(val_rows, "select")
                           else list(val_rows[:max_generation_examples]))
    collator = CaptionCollator(processor, config.max_target_tokens)
    cache = vision_cache.prepare_cache(config, model, processor, [train_rows, val_rows])
    if cache is not None:  # the loss reads cached image tokens (generation too: generation_inputs)
        collator = vision_cache.CachedEmbeddingCollator(processor, config.max_target_tokens, cache)
        train_rows, val_rows = (vision_cache.without_image_decoding(rows) for rows in (train_rows, val_rows))
    memory_callback = PeakMemoryCallback(device)
    diagnostics = [TorchProfilerCallback(config.profile_dir)] if config.profile_dir else []
    trainer = MedcapTrainer(
        model=model, args=args, train_dataset=train_rows, eval_dataset=val_rows,
        data_collator=collator,
        callbacks=[memory_callback, *diagnostics, *(callbacks_extra or [])],
        generation_rows=generation_rows, processor=processor, medcap_config=config, scorer=scorer,
        compile_backend=training_compile_backend(config, device))

    remove_incomplete_checkpoints(checkpoints_dir)
    resume = last_complete_checkpoint(checkpoints_dir)
    if trainer.is_world_process_zero():
        runs.forget_best_epoch_predictions(run_dir)
    start = time.perf_counter()
    oom: OutOfMemory | None = None
    try:
        output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except Exception as err:  # noqa: BLE001 - only out-of-memory is translated
        if not is_out_of_memory(err):
            raise
        oom = _training_oom(err, config, checkpoints_dir)
    finally:
        release_dequantized_weights(trainer.model)
        if trainer.compiled_loss is not None:
            torch.compiler.reset()  # frees the CUDA graphs' memory pool for the stages that follow
    if oom is not None:  # raised outside the except block so the failed step's tensors can be freed
        del trainer
        release_memory()
        raise oom
    wall = time.perf_counter() - start

    history = epoch_history(trainer.state.log_history)
    best_epoch, best_cider = best_epoch_of(history, config.best_model_metric)
    adapter_dir = run_dir / ("adapter" if lora else "model")
    writes_files = trainer.is_world_process_zero()  # data-parallel: process 0 writes, the others only train
    if writes_files:
        save_adapter(trainer.model, processor, adapter_dir)
        _save_best_epoch_predictions(trainer, run_dir, generation_rows, val_rows)
    trainable, total, share = trainable_parameters(trainer.model)
    result = TrainResult(
        history=history, best_epoch=best_epoch, best_cider=best_cider, adapter_dir=adapter_dir,
        peak_memory=[dict(e["peak_memory"], epoch=e["epoch"]) for e in history if e["peak_memory"]],
        train_runtime_s=round(wall, 3), trainable_params=trainable, total_params=total,
        global_step=trainer.state.global_step, resumed_from=str(resume) if resume else None,
        best_checkpoint=trainer.state.best_model_checkpoint, log_history=list(trainer.state.log_history),
        extra={"trainable_share": share, "trainer_metrics": dict(output.metrics),
               "last_val_predictions": trainer.last_predictions[:5]})
    if writes_files:
        runs.write_stage_metrics(run_dir, "train", {
            "epochs": history, "best_epoch": best_epoch, "best_model_metric": config.best_model_metric,
            "best_val_cider": best_cider, "best_val_ce_micro_f1": value_at_epoch(history, best_epoch, "val_ce_micro_f1"),
            "best_checkpoint": result.best_checkpoint, "trainable_params": trainable, "total_params": total,
            "trainable_share": share, "global_step": result.global_step, "resumed_from": result.resumed_from,
            "wall_time_s": result.train_runtime_s, "train_runtime_s": output.metrics.get("train_runtime"),
            "train_loss_mean": output.metrics.get("train_loss"), "device": str(device),
            "effective_batch_size": config.effective_batch_size, "adapter_dir": str(adapter_dir),
            "val_examples_generated": len(generation_rows), "val_prediction_samples": trainer.last_predictions[:5],
        })
    return result


def _save_best_epoch_predictions(trainer: MedcapTrainer, run_dir: Path, generation_rows: Any, val_rows: Any) -> None:
    """Keep the kept epoch's validation reports, so stage 05 need not generate them again (only when they
    cover the whole validation split and this process generated them: not after a resume past that epoch)."""
    best = trainer.state.best_model_checkpoint
    if best is None or len(generation_rows) != len(val_rows):
        return
    reports = trainer.predictions_by_step.get(int(Path(best).name.rsplit("-", 1)[-1]))
    if hasattr(val_rows, "column_names"):  # column access, as text_column does: no image is decoded
        image_ids = list(val_rows["image_id"]) if "image_id" in val_rows.column_names else []
    else:
        image_ids = [row.get("image_id") for row in val_rows]
    if reports is not None and image_ids and None not in image_ids:
        runs.save_best_epoch_predictions(run_dir, image_ids, reports, Path(best).name)


def _training_oom(error: BaseException, config: MedcapConfig, checkpoints_dir: Path) -> OutOfMemory:
    """The :class:`~medcap_helpers.model.OutOfMemory` for an OOM inside ``trainer.train``."""
    last = last_complete_checkpoint(checkpoints_dir)
    kept = (f"Checkpoints are kept: rerunning continues from {last}." if last is not None
            else f"No checkpoint was saved yet (they go to {checkpoints_dir}, one per epoch).")
    if isinstance(error, OutOfMemory):  # the per-epoch validation generation ran out: already explained
        return OutOfMemory(f"{error}\n{kept}")
    batch, accumulation = config.per_device_train_batch_size, config.gradient_accumulation_steps
    advice = []
    if batch > 1:
        advice.append(f"a smaller batch with the same effective batch (per_device_train_batch_size={batch // 2}, "
                      f"gradient_accumulation_steps={accumulation * 2})")
    advice.append(f"shorter targets (max_target_tokens below {config.max_target_tokens})")
    if not config.gradient_checkpointing:
        advice.append("gradient_checkpointing=True")
    if not config.load_in_4bit:
        advice.append("load_in_4bit=True (QLoRA)")
    if config.lora_vision:
        advice.append("lora_vision=False")
    advice.append("--vram-budget-gb <GB of your GPU> (vram_budget_gb) to pick batch size and checkpointing "
                  "automatically")
    settings = {"per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulation,
                "max_target_tokens": config.max_target_tokens,
                "gradient_checkpointing": config.gradient_checkpointing, "load_in_4bit": config.load_in_4bit,
                "lora_r": config.lora_r, "lora_vision": config.lora_vision}
    return out_of_memory("training", error, settings, advice, note=kept)




# --------------------------------------------------------------------------------------- reporting (03)
def history_markdown(history: Sequence[Mapping[str, Any]]) -> str:
    """Per-epoch table: losses, validation scores of generated reports and peak memory."""
    lines = ["| epoch | train loss | val loss | val CIDEr | val CE micro-F1 | val BLEU-4 | val ROUGE-L | peak memory |",
             "|---:|---:|---:|---:|---:|---:|---:|---|"]

    def num(value: Any, digits: int = 3) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    for e in history:
        scores = e.get("val_scores") or {}
        memory = e.get("peak_memory") or {}
        peak = ", ".join(f"{k} {v:.2f}" for k, v in memory.items() if isinstance(v, (int, float)))
        lines.append(f"| {num(e.get('epoch'), 0)} | {num(e.get('train_loss'))} | {num(e.get('eval_loss'))} | "
                     f"{num(e.get('val_cider'))} | {num(scores.get(CE_MICRO_F1))} | {num(scores.get('BLEU-4'))} | "
                     f"{num(scores.get('ROUGE-L'))} | "
                     f"{peak or '–'} GB |")
    return "\n".join(lines)


def stage_metrics(result: TrainResult, memory_before: Mapping[str, Any], memory_loaded: Mapping[str, Any],
                  budget_fit: Any, config: MedcapConfig) -> dict[str, Any]:
    """What notebook 03 records for the pipeline."""
    return {"epochs": result.history, "best_epoch": result.best_epoch, "best_model_metric": config.best_model_metric,
            "best_val_cider": result.best_cider,
            "best_val_ce_micro_f1": value_at_epoch(result.history, result.best_epoch, "val_ce_micro_f1"),
            "tiny_pretraining": pretraining_record(config),
            "trainable_params": result.trainable_params, "total_params": result.total_params,
            "trainable_share": result.extra.get("trainable_share"), "quantized_4bit": config.load_in_4bit,
            "peak_memory": result.peak_memory, "memory_before_loading": dict(memory_before),
            "memory_after_loading": dict(memory_loaded), "train_runtime_s": result.train_runtime_s,
            "global_step": result.global_step, "resumed_from": result.resumed_from,
            "adapter_dir": str(result.adapter_dir),
            "budget_fit": budget_fit.to_dict() if budget_fit is not None else None,
            "training_settings": {"per_device_train_batch_size": config.per_device_train_batch_size,
                                  "gradient_accumulation_steps": config.gradient_accumulation_steps,
                                  "gradient_checkpointing": config.gradient_checkpointing,
                                  "learning_rate": config.learning_rate, "num_train_epochs": config.num_train_epochs,
                                  "lora_r": config.lora_r, "lora_alpha": config.lora_alpha}}
