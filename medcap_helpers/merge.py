"""Merge a LoRA adapter into BLIP and re-quantize the result to NF4.

Two merges are possible and the tutorial compares them:

* **onto the 16-bit base** — the usual ``merge_and_unload()`` on the original weights. The adapter
  was trained against the *quantized* base though, so the merged model differs from what was
  trained by the quantization error of the base;
* **onto the dequantized 4-bit base** — the exact weights the adapter saw in training, so before
  re-quantization this reproduces the trained model.

Either merged model is then loaded in NF4 and saved as a 4-bit checkpoint with its processor, so
``BlipForConditionalGeneration.from_pretrained(folder)`` in a fresh process is ready to caption.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medcap_helpers.checkpoints import (
    MergedCheckpoint,
    check_adapter_dir,
    load_adapter_model,
    load_captioner,
    load_final_model,
    load_processor_from,
    save_checkpoint,
    saved_checkpoint,
)
from medcap_helpers import runs
from medcap_helpers.config import MedcapConfig
from medcap_helpers.data import VALIDATION, limit_rows
from medcap_helpers.sources import column_values
from medcap_helpers.devices import (
    compute_dtype,
    device_map_for,
    memory_snapshot,
    pick_device,
    reset_peak_memory,
)
from medcap_helpers.generation import generate_for_split, generate_reports
from medcap_helpers.metrics import (
    CE_MICRO_F1,
    format_table,
    paired_differences,
    score_systems,
)
from medcap_helpers.model import (
    base_model_source,
    load_base_model,
    load_plain_model,
    quantization_config,
    quiet_deprecations,
)


def merge_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """16-bit dtype to merge and save in: bf16 when training computed in bf16, else fp16."""
    return torch.bfloat16 if compute_dtype == torch.bfloat16 else torch.float16


def _merge(base_model: Any, adapter_dir: Path) -> Any:
    from peft import PeftModel

    with quiet_deprecations():
        peft_model = PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=False)
    return peft_model.merge_and_unload()


def merge_onto_16bit_base(base_path: str, adapter_dir: str | Path, out_dir: str | Path, processor: Any,
                          dtype: torch.dtype = torch.float16) -> MergedCheckpoint:
    """Reload the base in 16-bit, merge the adapter, save safetensors."""
    from transformers import BlipForConditionalGeneration

    adapter_dir = check_adapter_dir(adapter_dir)
    base = BlipForConditionalGeneration.from_pretrained(base_path, dtype=dtype, use_safetensors=True)
    merged = _merge(base, adapter_dir)
    return save_checkpoint(merged, processor, out_dir, "merged-16bit")


def merge_onto_dequantized_base(quantized_base: Any, adapter_dir: str | Path, out_dir: str | Path,
                                processor: Any, dtype: torch.dtype = torch.float16) -> MergedCheckpoint:
    """Dequantize the 4-bit base the adapter was trained on, merge, save in 16-bit."""
    adapter_dir = check_adapter_dir(adapter_dir)
    base = quantized_base.dequantize(dtype=dtype)
    base = base.to(dtype)
    # dequantize() keeps the quantization bookkeeping; drop it so the result saves as a plain model.
    for attribute in ("hf_quantizer", "is_loaded_in_4bit", "quantization_method"):
        if hasattr(base, attribute):
            try:
                delattr(base, attribute)
            except AttributeError:
                pass
    if hasattr(base.config, "quantization_config"):
        del base.config.quantization_config
    merged = _merge(base, adapter_dir)
    return save_checkpoint(merged, processor, out_dir, "merged-dequantized-16bit")


def requantize_nf4(merged_dir: str | Path, out_dir: str | Path, processor: Any,
                   quantization_config: Any, device_map: Any) -> MergedCheckpoint:
    """Load a merged 16-bit checkpoint in NF4 and save the 4-bit weights with the processor.

    The weights that stay unquantized (embeddings, norms, the patch conv) are stored in the merged
    checkpoint's own 16-bit dtype (``dtype="auto"``), not in the compute dtype: on the CPU the compute
    dtype is fp32, which would store them at twice the size and make the "small" NF4 checkpoint larger
    than the 16-bit one. The 4-bit layers still compute in ``bnb_4bit_compute_dtype``.
    """
    from transformers import BlipForConditionalGeneration

    model = BlipForConditionalGeneration.from_pretrained(
        str(merged_dir), quantization_config=quantization_config, device_map=device_map, use_safetensors=True,
        dtype="auto")
    return save_checkpoint(model, processor, out_dir, "merged-nf4")


# ----------------------------------------------------------------------------- the 05 stage
ADAPTER_CANDIDATE = "adapter"
ADAPTER_LABEL = "adapter on 4-bit base"
FINAL_CANDIDATES = {"merged-dequantized-nf4": "merged onto dequantized 4-bit base → NF4",
                    "merged-nf4": "merged onto 16-bit base → NF4",
                    ADAPTER_CANDIDATE: ADAPTER_LABEL}
"""The final-model candidates (name -> validation row label), cheapest to serve first: a merged NF4 folder
loads with one ``from_pretrained`` and runs no extra adapter matmuls; the dequantized merge comes first
because before re-quantization it reproduces the trained weights exactly; the unmerged adapter is lossless
(it *is* what was trained and validated) but needs the base model, peft and the extra LoRA matmuls."""
MERGES = tuple(name for name in FINAL_CANDIDATES if name != ADAPTER_CANDIDATE)
FINAL_RULE = ("Take the cheapest candidate to serve (merged onto the dequantized base → NF4, then merged onto the "
              "16-bit base → NF4, then the unmerged adapter) unless another candidate beats it on the validation "
              "{metric} with a 95% paired-bootstrap interval of the difference that excludes 0; among several "
              "such, the largest difference wins.")
"""The documented, noise-aware rule of :func:`choose_final` (``{metric}``: the selection metric)."""


def choose_final(differences: Sequence[Mapping[str, Any]], metric: str = "CIDEr",
                 candidates: Sequence[str] = tuple(FINAL_CANDIDATES)) -> str:
    """The final model's name by :data:`FINAL_RULE`: ``candidates[0]`` unless another candidate beats it.

    ``differences`` are :func:`~medcap_helpers.metrics.paired_difference_ci` results whose ``system`` and
    ``baseline`` are validation labels (:data:`FINAL_CANDIDATES`' values), each other candidate against
    ``candidates[0]``. A point difference alone never switches the choice: only an interval above 0 does.
    """
    default, *others = candidates
    against_default = {d["system"]: d for d in differences
                       if d["metric"] == metric and d["baseline"] == FINAL_CANDIDATES[default]}
    missing = [FINAL_CANDIDATES[n] for n in others if FINAL_CANDIDATES[n] not in against_default]
    if missing:
        raise ValueError(f"No paired {metric} difference against '{FINAL_CANDIDATES[default]}' for "
                         f"{', '.join(map(repr, missing))}: compare every candidate with the default first.")
    better = [(against_default[FINAL_CANDIDATES[n]]["point"], n) for n in others
              if against_default[FINAL_CANDIDATES[n]]["low"] > 0]
    return max(better)[1] if better else default


@dataclass
class MergeOutcome:
    checkpoints: dict[str, MergedCheckpoint]
    validation: dict[str, dict[str, Any]]
    final_name: str
    final_dir: Path
    notes: list[str] = field(default_factory=list)
    metric: str = "CIDEr"
    """The validation metric that chose the final model (``config.best_model_metric``)."""
    differences: list[dict[str, Any]] = field(default_factory=list)
    """Paired-bootstrap differences on validation: every other candidate against the cheapest one."""
    merged_name: str = "merged-dequantized-nf4"
    """The merge :data:`FINAL_RULE` prefers among the two NF4 merges (the one 06 scores on the test split)."""

    def deltas(self) -> dict[str, dict[str, float]]:
        """Each merged NF4 model's metrics (CIDEr, CE micro-F1 ...) minus the adapter-on-4-bit-base reference;
        intervals and the per-class CE dict are left out."""
        reference = self.validation[ADAPTER_LABEL]
        return {name: {k: row[k] - reference[k] for k in row
                       if k in reference and isinstance(row[k], float) and "_ci_" not in k}
                for name, row in self.validation.items() if name != ADAPTER_LABEL}

    @property
    def merged_dir(self) -> Path:
        return self.checkpoints[self.merged_name].path if self.merged_name in self.checkpoints else self.final_dir


def merge_and_requantize(config: MedcapConfig, dataset: Any) -> MergeOutcome:
    """Both merges, both NF4 re-quantizations, the degradation check, and the final model by :data:`FINAL_RULE`.

    Checkpoints already in the run folder are reused (a rerun redoes only what is missing).
    """
    run = Path(config.run_dir)
    adapter_dir = check_adapter_dir(run / "adapter")
    device = pick_device(config)
    compute = compute_dtype(config, device)
    dtype16 = merge_dtype(compute)
    processor = load_processor_from(adapter_dir)
    base_source = base_model_source(config)
    val = limit_rows(dataset[VALIDATION], config.max_eval_examples)
    device_map = device_map_for(device)

    def build(name: str, make: Any) -> MergedCheckpoint:
        return saved_checkpoint(run / name, name) or make()

    checkpoints: dict[str, MergedCheckpoint] = {}
    checkpoints["base-16bit"] = build("base-16bit", lambda: save_checkpoint(
        load_plain_model(base_source, dtype16), processor, run / "base-16bit", "base-16bit"))
    checkpoints["merged-16bit"] = build("merged-16bit", lambda: merge_onto_16bit_base(
        base_source, adapter_dir, run / "merged-16bit", processor, dtype16))
    checkpoints["merged-dequantized-16bit"] = build("merged-dequantized-16bit", lambda: merge_onto_dequantized_base(
        load_base_model(config), adapter_dir, run / "merged-dequantized-16bit", processor, dtype16))
    for source, target in (("merged-16bit", "merged-nf4"), ("merged-dequantized-16bit", "merged-dequantized-nf4")):
        checkpoints[target] = build(target, lambda s=source, t=target: requantize_nf4(
            checkpoints[s].path, run / t, processor, quantization_config(compute), device_map))

    predictions: dict[str, list[str]] = {}
    # Training generated these reports with the adapter it kept (same weights): not generated twice.
    from_training = runs.load_best_epoch_predictions(run, column_values(val, "image_id"))
    if from_training is not None:
        predictions[ADAPTER_LABEL] = from_training
    else:
        adapter_model = load_adapter_model(config, adapter_dir)
        predictions[ADAPTER_LABEL] = generate_for_split(adapter_model, processor, val, config)
        del adapter_model
    for name in MERGES:
        nf4_model, nf4_processor = load_captioner(checkpoints[name].path, device_map=device_map)
        predictions[FINAL_CANDIDATES[name]] = generate_for_split(nf4_model, nf4_processor, val, config)
        del nf4_model
    validation = score_systems(predictions, val, config)
    default = FINAL_CANDIDATES[next(iter(FINAL_CANDIDATES))]
    differences = paired_differences(predictions, val, config,
                                     [(label, default) for label in FINAL_CANDIDATES.values() if label != default])
    final_name = choose_final(differences, config.best_model_metric)
    merged_name = choose_final(differences, config.best_model_metric, candidates=MERGES)
    final_dir = adapter_dir if final_name == ADAPTER_CANDIDATE else checkpoints[final_name].path
    return MergeOutcome(checkpoints=checkpoints, validation=validation, final_name=final_name, final_dir=final_dir,
                        metric=config.best_model_metric, differences=differences, merged_name=merged_name)


def sizes_markdown(outcome: MergeOutcome) -> str:
    base = outcome.checkpoints["base-16bit"].size_bytes
    lines = ["| checkpoint | on disk | vs 16-bit base |", "|---|---:|---:|"]
    for name, checkpoint in outcome.checkpoints.items():
        lines.append(f"| {name} | {_human(checkpoint.size_bytes)} | {checkpoint.size_bytes / base:.2f}× |")
    return "\n".join(lines)


def degradation_markdown(outcome: MergeOutcome) -> str:
    deltas = outcome.deltas()
    lines = [format_table(outcome.validation), "", "Change against the adapter on its 4-bit base:", "",
             "| merged NF4 model | ΔCIDEr | ΔCE micro-F1 | ΔBLEU-4 | ΔROUGE-L |", "|---|---:|---:|---:|---:|"]
    for name, delta in deltas.items():
        lines.append(f"| {name} | {delta.get('CIDEr', 0):+.4f} | {delta.get(CE_MICRO_F1, 0):+.4f} | "
                     f"{delta.get('BLEU-4', 0):+.4f} | {delta.get('ROUGE-L', 0):+.4f} |")
    return "\n".join(lines)


def measure_inference(config: MedcapConfig, folder: str | Path, split: Any, n_images: int) -> dict[str, Any]:
    """Load memory, peak memory while generating and latency per report (one image at a time) of the model in
    ``folder`` (a merged model or an adapter, :func:`~medcap_helpers.checkpoints.load_final_model`)."""
    device = pick_device(config)
    reset_peak_memory(device)
    before = memory_snapshot(device)
    captioner, processor = load_final_model(config, folder, device_map=device_map_for(device))
    loaded = memory_snapshot(device)
    reset_peak_memory(device)
    images = [split[i]["image"] for i in range(min(n_images, len(split)))]
    latencies = []
    for image in images:
        start = time.perf_counter()
        generate_reports(captioner, processor, [image], max_new_tokens=config.max_new_tokens,
                         num_beams=config.num_beams, batch_size=1, progress=False,
                         min_new_tokens=config.min_new_tokens)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        latencies.append(time.perf_counter() - start)
    peak = memory_snapshot(device)
    return {"device": str(device), "num_beams": config.num_beams, "max_new_tokens": config.max_new_tokens,
            "images": len(images), "latency_s_median": statistics.median(latencies) if latencies else None,
            "latency_s_mean": statistics.fmean(latencies) if latencies else None,
            "memory_before": before, "memory_after_load": loaded, "memory_peak_generation": peak}


def stage_metrics(outcome: MergeOutcome, inference: dict[str, Any]) -> dict[str, Any]:
    return {"sizes_bytes": {name: c.size_bytes for name, c in outcome.checkpoints.items()},
            "validation": outcome.validation, "deltas": outcome.deltas(), "final_model": outcome.final_name,
            "final_chosen_by": outcome.metric, "final_rule": FINAL_RULE.format(metric=outcome.metric),
            "validation_differences": outcome.differences,
            "final_dir": str(outcome.final_dir), "merged_model": outcome.merged_name,
            "merged_dir": str(outcome.merged_dir), "inference": inference}


def _human(n_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n_bytes < 1000 or unit == "GB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.2f} {unit}"
        n_bytes /= 1000
    return f"{n_bytes:.2f} GB"
