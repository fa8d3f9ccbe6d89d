"""Fit training to a GPU memory budget (``vram_budget_gb``) automatically.

A short probe tries training settings fastest first — larger micro-batches, then gradient
checkpointing — always keeping the effective batch (micro-batch × accumulation) of the config.
It picks the first whose measured peak stays under the budget with a safety margin. A candidate
that runs out of memory is recorded and the next one is tried; the probe never crashes on OOM.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from medcap_helpers.config import MedcapConfig
from medcap_helpers.devices import GB, cap_gpu_memory, compute_dtype, is_out_of_memory, pick_device, release_memory
from medcap_helpers.errors import BudgetTooSmall
from medcap_helpers.model import checkpoint_decoder_layers, enable_gradient_checkpointing, unwrap_model
from medcap_helpers.multiview import caption_outputs
from medcap_helpers.processing import CaptionCollator
from medcap_helpers.vision_cache import CachedEmbeddingCollator, prepare_cache, without_image_decoding


@dataclass(frozen=True)
class TrainingCandidate:
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    checkpointed_layers: int | None = None
    """With checkpointing: how many text-decoder layers are recomputed (None: all)."""

    def describe(self) -> str:
        checkpointing = "on" if self.gradient_checkpointing else "off"
        if self.gradient_checkpointing and self.checkpointed_layers is not None:
            checkpointing = f"in {self.checkpointed_layers} decoder layers"
        return (f"batch {self.per_device_train_batch_size} × accumulation {self.gradient_accumulation_steps}, "
                f"checkpointing {checkpointing}")


@dataclass
class ProbeOutcome:
    candidate: TrainingCandidate
    peak_gb: float | None
    status: str  # "fits" | "over budget" | "out of memory"
    samples_per_s: float | None = None


@dataclass
class BudgetFit:
    budget_gb: float
    margin: float
    chosen: TrainingCandidate | None
    tried: list[ProbeOutcome] = field(default_factory=list)
    allocator_gb: float | None = None
    """What PyTorch's allocator may hold of the budget (the rest: CUDA context, library workspaces)."""

    @property
    def usable_gb(self) -> float:
        return (self.allocator_gb or self.budget_gb) * (1 - self.margin)

    def explain(self) -> str:
        held = ("" if self.allocator_gb is None else
                f", of which PyTorch's allocator may hold {self.allocator_gb:.2f} GB (the rest is the CUDA context "
                "and library workspaces)")
        lines = [f"VRAM budget {self.budget_gb:.2f} GB{held}; keeping a {self.margin:.0%} margin for batches "
                 f"that fragment memory differently, the probe's tensors may peak at {self.usable_gb:.2f} GB:"]
        for outcome in self.tried:
            peak = "–" if outcome.peak_gb is None else f"{outcome.peak_gb:.2f} GB"
            speed = "" if outcome.samples_per_s is None else f", {outcome.samples_per_s:.1f} samples/s"
            lines.append(f"  {outcome.candidate.describe()}: peak allocated {peak}{speed} → {outcome.status}")
        if self.chosen:
            lines.append(f"Chosen: {self.chosen.describe()} (the fastest candidate that fits).")
        else:
            lines.append(f"Nothing fits in {self.budget_gb:.2f} GB: even batch 1 with checkpointing exceeds the "
                         "budget. Use a larger budget (--vram-budget-gb / vram_budget_gb), fewer "
                         "max_target_tokens or a smaller model.")
        return "\n".join(lines)

    def chosen_or_raise(self) -> TrainingCandidate:
        """The chosen setting, or :class:`BudgetTooSmall` with :meth:`explain` as the message."""
        if self.chosen is None:
            raise BudgetTooSmall(self.explain())
        return self.chosen

    def to_dict(self) -> dict[str, Any]:
        return {"budget_gb": self.budget_gb, "allocator_gb": self.allocator_gb, "margin": self.margin,
                "chosen": asdict(self.chosen) if self.chosen else None,
                "tried": [{**asdict(o.candidate), "peak_gb": o.peak_gb, "status": o.status,
                           "samples_per_s": o.samples_per_s} for o in self.tried]}


def candidate_settings(effective_batch: int, max_micro_batch: int = 32) -> list[TrainingCandidate]:
    """Settings that keep ``effective_batch``, fastest first.

    Micro-batches are the divisors of the effective batch (largest first): a QLoRA step is bound by the
    CPU launching its kernels, not by the GPU (profiled at BLIP-large size on an H200 with the vision cache:
    the GPU was busy 9% of a step of two micro-batches of 16, ~4,700 kernel launches each, whatever their
    size), so fewer, larger micro-batches train faster. At each size running without checkpointing is
    faster than with it, so it is tried first.
    """
    sizes = [b for b in range(min(effective_batch, max_micro_batch), 0, -1) if effective_batch % b == 0]
    return [TrainingCandidate(b, effective_batch // b, ckpt) for b in sizes for ckpt in (False, True)]


def fit_to_budget(candidates: Iterable[TrainingCandidate],
                  probe: Callable[[TrainingCandidate], tuple[float, float | None]],
                  budget_gb: float, margin: float = 0.1,
                  is_oom: Callable[[BaseException], bool] | None = None,
                  allocator_gb: float | None = None) -> BudgetFit:
    """Probe candidates in order; choose the first whose peak (GB) stays below the budget less ``margin``
    (the allocator's share of the budget, ``allocator_gb``, when given: the probe's peak is the allocator's).

    ``probe`` returns ``(peak_gb, samples_per_s)`` or raises an out-of-memory error, which
    ``is_oom`` recognises (default: :func:`is_out_of_memory`). Other errors propagate.
    """
    if budget_gb <= 0:
        raise ValueError(f"budget_gb must be positive, got {budget_gb!r}")
    is_oom = is_oom or is_out_of_memory
    fit = BudgetFit(budget_gb=budget_gb, margin=margin, chosen=None, allocator_gb=allocator_gb)
    usable = fit.usable_gb
    for candidate in candidates:
        try:
            peak_gb, speed = probe(candidate)
        except BaseException as err:  # noqa: BLE001 - only OOM is swallowed, see below
            if not is_oom(err):
                raise
            fit.tried.append(ProbeOutcome(candidate, None, "out of memory"))
            release_memory()
            continue
        fits = peak_gb <= usable
        fit.tried.append(ProbeOutcome(candidate, peak_gb, "fits" if fits else "over budget", speed))
        if fits:
            fit.chosen = candidate
            break
    return fit


def costliest_rows(rows: Any, size: int) -> list[Any]:
    """``size`` training rows that need the most memory, so that a setting the probe passes fits every
    batch: studies with a second view first, then the longest reports (repeated when there are fewer)."""
    if hasattr(rows, "column_names"):  # a datasets.Dataset: read the columns without decoding images
        from datasets import Image

        plain = rows.with_format(None).select_columns([c for c in ("text", "image_2") if c in rows.column_names])
        texts = plain["text"]
        seconds = (plain.cast_column("image_2", Image(decode=False))["image_2"] if "image_2" in plain.column_names
                   else [None] * len(texts))
    else:
        texts = [row["text"] for row in rows]
        seconds = [row.get("image_2") for row in rows]
    order = sorted(range(len(texts)), key=lambda i: (seconds[i] is not None, len(texts[i] or "")), reverse=True)
    return [rows[order[i % len(order)]] for i in range(size)]


def measure_training_step(model: Any, collator: Any, rows: Any, candidate: TrainingCandidate,
                          steps: int = 3, mixed_precision: torch.dtype | None = None,
                          loss_fn: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor] | None = None,
                          ) -> tuple[float, float]:
    """Peak allocated GPU memory (GB) and samples/s of ``steps`` optimizer steps at ``candidate``'s settings,
    under autocast to ``mixed_precision`` when given (as the Trainer trains: its casts and the activations
    it keeps cost memory too). ``loss_fn(model, batch)`` computes the loss (default: the model's own call).

    The first step is a warm-up and not timed. The trainable weights are restored afterwards, so the
    probe leaves the model as it found it.
    """
    device = next(p for p in model.parameters() if p.requires_grad).device
    if candidate.gradient_checkpointing:
        enable_gradient_checkpointing(model)
        checkpoint_decoder_layers(model, candidate.checkpointed_layers)
    else:
        unwrap_model(model).gradient_checkpointing_disable()
    trainable = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=1e-8)
    size = candidate.per_device_train_batch_size
    batch = collator(costliest_rows(rows, size))
    batch = {k: v.to(device) for k, v in batch.items()}
    was_training = model.training
    model.train()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        start = time.perf_counter()
        for step in range(steps):
            if step == 1:
                torch.cuda.synchronize(device)
                start = time.perf_counter()
            with torch.autocast("cuda", dtype=mixed_precision or torch.float32, enabled=mixed_precision is not None):
                loss = (loss_fn(model, batch) if loss_fn is not None
                        else caption_outputs(model, batch).loss)  # two-view batches too
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        # Allocated, not reserved: under the cap the allocator keeps freed blocks until it reaches the cap, so
        # the reserved peak says how much churned, not what is needed (the cap itself raises OOM if a step
        # cannot fit). At 4 GB, batches 8 and 16 with checkpointing both reserved 3.0-3.1 GB of a 3.16 GB cap.
        peak = torch.cuda.max_memory_allocated(device) / GB
    finally:
        with torch.no_grad():
            for param, original in zip(trainable, saved):
                param.copy_(original)
        del optimizer, saved, batch
        model.train(was_training)
        release_memory()
    return peak, size * max(steps - 1, 1) / elapsed


def probe_inputs(config: MedcapConfig, model: Any, processor: Any, train_rows: Any) -> tuple[Any, Any]:
    """The collator and rows the probe trains on: those training will use. With the vision cache
    (``cache_vision_embeddings``) every training image is cached first (training reuses it) and the probe
    trains on cached tokens, without the vision tower's activations, as training does."""
    cache = prepare_cache(config, model, processor, [train_rows])
    if cache is None:
        return CaptionCollator(processor, config.max_target_tokens), train_rows
    return (CachedEmbeddingCollator(processor, config.max_target_tokens, cache),
            without_image_decoding(train_rows))


def fit_config_to_budget(config: MedcapConfig, model: Any, processor: Any, train_rows: Any,
                         margin: float = 0.1) -> tuple[MedcapConfig, BudgetFit | None]:
    """Apply ``config.vram_budget_gb``: probe settings on the GPU and return the updated config.

    The process is capped at the budget (:func:`~medcap_helpers.devices.cap_gpu_memory`) for the
    probe and the training that follows, so a bigger card behaves like the budgeted one. Returns
    ``(config, None)`` when no budget is set or there is no GPU to measure.
    """
    if config.vram_budget_gb is None:
        return config, None
    device = pick_device(config)
    if device.type != "cuda":
        print(f"vram_budget_gb={config.vram_budget_gb} is ignored: there is no GPU to measure on this machine.")
        return config, None
    allocator_gb = cap_gpu_memory(config.vram_budget_gb, device)
    dtype = compute_dtype(config, device)  # the Trainer's mixed precision (train.training_arguments)
    dtype = dtype if dtype in (torch.float16, torch.bfloat16) else None
    collator, train_rows = probe_inputs(config, model, processor, train_rows)
    fit = fit_to_budget(candidate_settings(config.effective_batch_size),
                        lambda c: measure_training_step(model, collator, train_rows, c, mixed_precision=dtype),
                        config.vram_budget_gb, margin, allocator_gb=allocator_gb)
    chosen = fit.chosen_or_raise()
    return config.replace(per_device_train_batch_size=chosen.per_device_train_batch_size,
                          gradient_accumulation_steps=chosen.gradient_accumulation_steps,
                          gradient_checkpointing=chosen.gradient_checkpointing), fit
