"""LoRA rank × alpha grid: one short training run per trial, under a VRAM budget.

Each trial trains in ``<run_dir>/sweep/r<r>_alpha<alpha>/`` and writes ``trial.json`` last
(atomically); a rerun finds it and skips the trial. The chosen configuration (best validation
``best_model_metric``, CIDEr or CE micro-F1, among trials that fit the budget) goes to
``<run_dir>/sweep/chosen.json``.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medcap_helpers import runs
from medcap_helpers.config import LOCAL_MODELS, MedcapConfig
from medcap_helpers.model import attach_lora, load_model_and_processor
from medcap_helpers.processing import local_model_dir
from medcap_helpers.train import train, value_at_epoch

TrialRunner = Callable[[MedcapConfig], dict[str, Any]]


@dataclass
class SweepResult:
    trials: list[dict[str, Any]]
    chosen: dict[str, Any] | None
    skipped: list[str] = field(default_factory=list)
    budget_note: str = ""

    def table_rows(self) -> list[dict[str, Any]]:
        keys = ("lora_r", "lora_alpha", "val_cider", "val_ce_micro_f1", "peak_gpu_gb", "peak_rss_gb",
                "trainable_params", "wall_time_s", "feasible")
        return [{k: t.get(k) for k in keys} for t in self.trials]


def trial_dir(config: MedcapConfig, rank: int, alpha: int) -> Path:
    return Path(config.run_dir) / "sweep" / f"r{rank}_alpha{alpha}"


def trial_config(config: MedcapConfig, rank: int, alpha: int) -> MedcapConfig:
    """The config one trial trains with: its own run folder, the grid point, ``sweep_epochs`` epochs.

    With the tiny model every trial uses the main run's tiny model and processor (its folder becomes
    ``model_name``): a trial must not build a new random model with a new vocabulary in its own folder,
    or the trials would compare different base models, not LoRA settings.
    """
    model_name = config.model_name
    if model_name in LOCAL_MODELS:
        model_name = str(local_model_dir(config).resolve())
    return config.replace(run_dir=str(trial_dir(config, rank, alpha)), lora_r=rank, lora_alpha=alpha,
                          num_train_epochs=config.sweep_epochs, model_name=model_name)


def feasibility(peak_gpu_gb: float | None, budget_gb: float) -> bool | None:
    """True/False against the budget on a GPU; None on CPU, where GPU memory can't be measured."""
    return None if peak_gpu_gb is None else peak_gpu_gb <= budget_gb


def run_sweep(config: MedcapConfig, run_trial: TrialRunner, force: bool = False) -> SweepResult:
    """Run (or reuse) every trial of the grid; ``run_trial`` trains one config and returns its record.

    The record must hold ``val_cider``, ``trainable_params`` and ``peak_gpu_gb`` (None on CPU), and may hold
    ``val_ce_micro_f1`` (CE micro-F1 at the epoch of the best CIDEr);
    ``wall_time_s`` and the feasibility verdict are added here.
    """
    trials: list[dict[str, Any]] = []
    skipped: list[str] = []
    for rank in config.sweep_ranks:
        for alpha in config.sweep_alphas:
            folder = trial_dir(config, rank, alpha)
            record_path = folder / "trial.json"
            if record_path.exists() and not force:
                trials.append(runs.read_json(record_path))
                skipped.append(folder.name)
                continue
            start = time.perf_counter()
            record = dict(run_trial(trial_config(config, rank, alpha)))
            record.update(lora_r=rank, lora_alpha=alpha, wall_time_s=round(time.perf_counter() - start, 2),
                          feasible=feasibility(record.get("peak_gpu_gb"), config.sweep_vram_budget_gb))
            shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # the adapter is kept, not the states
            runs.write_json(record_path, record)
            trials.append(record)
    chosen = choose_trial(trials, config.best_model_metric)
    if chosen is not None:
        runs.write_json(Path(config.run_dir) / "sweep" / "chosen.json", chosen)
    on_gpu = any(t.get("peak_gpu_gb") is not None for t in trials)
    note = (f"Trials over the {config.sweep_vram_budget_gb:g} GB budget are marked infeasible."
            if on_gpu else
            f"No GPU: the {config.sweep_vram_budget_gb:g} GB VRAM budget can't be measured on the CPU, "
            "so no trial is marked infeasible (peak RSS is shown instead).")
    return SweepResult(trials=trials, chosen=chosen, skipped=skipped, budget_note=note)


TRIAL_KEYS = {"CIDEr": "val_cider", "CE micro-F1": "val_ce_micro_f1"}
"""The trial record's key for each ``best_model_metric``."""


def choose_trial(trials: list[dict[str, Any]], metric: str = "CIDEr") -> dict[str, Any] | None:
    """Best validation ``metric`` (CIDEr, or CE micro-F1: ``config.best_model_metric``) among trials not known
    to exceed the budget; ties go to the smaller rank. Trials that record no CE (a runner that scores CIDEr
    only) are ranked by CIDEr."""
    key = TRIAL_KEYS[metric]
    if not any(t.get(key) is not None for t in trials):
        key = TRIAL_KEYS["CIDEr"]
    candidates = [t for t in trials if t.get("feasible") is not False and t.get(key) is not None]
    if not candidates:
        return None
    return max(candidates, key=lambda t: (t[key], -t["lora_r"], -t["lora_alpha"]))


def trial_runner(dataset: Any) -> TrialRunner:
    """Train one trial's config with the pipeline's own model loading, LoRA and Trainer code."""

    def run_trial(config: MedcapConfig) -> dict[str, Any]:
        base, processor = load_model_and_processor(config, dataset)
        result = train(config, attach_lora(base, config), processor, dataset, save_total_limit=1)
        peaks = result.peak_memory
        gpu = [p["max_reserved_gb"] for p in peaks if "max_reserved_gb" in p]
        rss = [p["peak_rss_gb"] for p in peaks if "peak_rss_gb" in p]
        del base
        return {"val_cider": result.best_cider, "trainable_params": result.trainable_params,
                "val_ce_micro_f1": value_at_epoch(result.history, result.best_epoch, "val_ce_micro_f1"),
                "peak_gpu_gb": max(gpu) if gpu else None, "peak_rss_gb": max(rss) if rss else None,
                "train_runtime_s": result.train_runtime_s}

    return run_trial


def results_markdown(result: SweepResult) -> str:
    lines = ["| r | alpha | val CIDEr | val CE micro-F1 | trainable params | peak GPU (GB) | peak RSS (GB) | "
             "time (s) | fits budget |", "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for t in result.trials:
        fits = {True: "yes", False: "**no**", None: "n/a (CPU)"}[t.get("feasible")]
        lines.append(f"| {t['lora_r']} | {t['lora_alpha']} | {_num(t.get('val_cider'), 3)} | "
                     f"{_num(t.get('val_ce_micro_f1'), 3)} | "
                     f"{t.get('trainable_params', 0):,} | {_num(t.get('peak_gpu_gb'), 2)} | "
                     f"{_num(t.get('peak_rss_gb'), 2)} | {_num(t.get('wall_time_s'), 1)} | {fits} |")
    if result.chosen:
        ce = result.chosen.get("val_ce_micro_f1")
        lines += ["", f"Chosen: r={result.chosen['lora_r']}, alpha={result.chosen['lora_alpha']} "
                      f"(validation CIDEr {result.chosen['val_cider']:.3f}"
                      + (f", CE micro-F1 {ce:.3f}" if ce is not None else "") + ")."]
    return "\n".join(lines)


def _num(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"
