"""LoRA rank × alpha sweep under a VRAM budget: successive halving (default) or the whole grid.

**Successive halving** (``sweep_strategy="halving"``, Jamieson & Talwalkar, 2016): every (r, alpha)
of the grid trains briefly on a small fixed sample of the training set; the better half (by
validation ``best_model_metric``) trains again on twice as many examples, and so on until two are
left, whose better one is chosen. A half is rounded up to an even number (12, 6, 4, 2), so that every
rung splits evenly between two GPUs. The example budgets are set so that all trials together train on
``sweep_budget_share`` x one full training run (:func:`halving_schedule`): with the full profile's 12
settings, rungs of 12, 6, 4 and 2 trials. The trade-off: a setting that starts slowly but would end
best can be dropped in the first rung. ``sweep_strategy="grid"`` trains every setting for
``sweep_epochs`` epochs instead (12 x the cost, no early decisions).

Each trial trains in ``<run_dir>/sweep/<rung>/r<r>_alpha<alpha>/`` and writes ``trial.json`` last
(atomically); a rerun finds it and skips the trial. Trials share one loaded base model (the adapter is
removed after each). With several GPUs the calling process trains on the first and one process per other
GPU serves the whole sweep, each taking its next trial from a shared queue. The chosen configuration (among
trials that fit the budget) goes to ``<run_dir>/sweep/chosen.json``.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import queue
import random
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medcap_helpers import runs
from medcap_helpers.config import LOCAL_MODELS, MedcapConfig
from medcap_helpers.data import limit_rows, load_saved_dataset
from medcap_helpers.devices import pick_device, temporary_environment
from medcap_helpers.distributed import training_processes
from medcap_helpers.errors import StageFailed
from medcap_helpers.model import attach_lora, load_model_and_processor, prepare_local_model
from medcap_helpers.processing import local_model_dir
from medcap_helpers.sharding import process_environment, threads_for_share
from medcap_helpers.train import train, value_at_epoch
from medcap_helpers.vision_cache import cache_root

TRAINING_SETTINGS = ("per_device_train_batch_size", "gradient_accumulation_steps", "gradient_checkpointing")
"""What the trials take over from stage 03's fit to the VRAM budget (``training_settings`` in its metrics)."""

TrialRunner = Callable[[MedcapConfig], dict[str, Any]]


@dataclass
class SweepResult:
    trials: list[dict[str, Any]]
    chosen: dict[str, Any] | None
    skipped: list[str] = field(default_factory=list)
    budget_note: str = ""

    def table_rows(self) -> list[dict[str, Any]]:
        keys = ("rung", "train_examples", "lora_r", "lora_alpha", "val_cider", "val_ce_micro_f1", "peak_gpu_gb",
                "peak_rss_gb", "trainable_params", "wall_time_s", "feasible")
        return [{k: t.get(k) for k in keys} for t in self.trials]


@dataclass(frozen=True)
class Rung:
    """One round of the sweep: ``trials`` settings, each trained on ``train_examples`` examples
    (None: ``sweep_epochs`` epochs of the whole training set, the grid strategy)."""

    index: int
    trials: int
    train_examples: int | None

    @property
    def name(self) -> str:
        return f"rung{self.index}"


def halving_schedule(n_settings: int, n_train: int, budget_examples: float) -> list[Rung]:
    """Rungs of successive halving: ``n_settings`` trials, then half of them (rounded up to an even number,
    so that a rung splits evenly between two GPUs) until two are left; each rung's trials train on twice the examples of the previous rung's, and all trials together
    on at most ``budget_examples`` (at least 1 example each; more than ``n_train`` means several epochs)."""
    if n_settings < 1 or n_train < 1:
        raise ValueError(f"The sweep needs settings and training examples (got {n_settings} and {n_train}).")
    counts = [n_settings]
    while counts[-1] > 2:
        counts.append(min(counts[-1] - 1, 2 * math.ceil(counts[-1] / 4)))
    first = max(1, int(budget_examples // sum(c * 2 ** i for i, c in enumerate(counts))))
    return [Rung(i, count, first * 2 ** i) for i, count in enumerate(counts)]


def sweep_schedule(config: MedcapConfig, n_train: int) -> list[Rung]:
    """The config's rungs: :func:`halving_schedule` within ``sweep_budget_share`` of one training run
    (``n_train`` x ``num_train_epochs`` examples), or one rung with the whole grid."""
    n_settings = len(config.sweep_ranks) * len(config.sweep_alphas)
    if config.sweep_strategy == "grid":
        return [Rung(0, n_settings, None)]
    return halving_schedule(n_settings, n_train, config.sweep_budget_share * n_train * config.num_train_epochs)


def schedule_markdown(config: MedcapConfig, n_train: int) -> str:
    """The sweep's plan in words: settings, rungs, examples per trial, and what it costs."""
    rungs = sweep_schedule(config, n_train)
    grid = f"r in {list(config.sweep_ranks)} x alpha in {list(config.sweep_alphas)}"
    if rungs[0].train_examples is None:
        return (f"Grid: every setting of {grid} trains {config.sweep_epochs:g} epoch(s) on all {n_train} training "
                f"examples ({rungs[0].trials} trials).")
    total = sum(r.trials * (r.train_examples or 0) for r in rungs)
    steps = "; ".join(f"{r.trials} trials x {r.train_examples} examples" for r in rungs)
    return (f"Successive halving over {grid}: {steps}. All trials together train on {total:,} examples, "
            f"{total / (n_train * config.num_train_epochs):.2f} x one full training run "
            f"({n_train} examples x {config.num_train_epochs:g} epochs).")


def trial_dir(config: MedcapConfig, rank: int, alpha: int, rung: Rung | None = None) -> Path:
    folder = Path(config.run_dir) / "sweep"
    if rung is not None and rung.train_examples is not None:
        folder = folder / rung.name
    return folder / f"r{rank}_alpha{alpha}"


def trial_config(config: MedcapConfig, rank: int, alpha: int, rung: Rung | None = None,
                 n_train: int | None = None) -> MedcapConfig:
    """The config one trial trains with: its own run folder, the grid point, and the rung's examples
    (``max_train_examples`` of a fixed sample, several epochs when the rung asks for more than
    ``n_train``) or ``sweep_epochs`` epochs (grid). Stage 03's budget fit (batch, accumulation,
    checkpointing) applies when 03 recorded one.

    With the tiny model every trial uses the main run's tiny model and processor (its folder becomes
    ``model_name``): a trial must not build a new random model with a new vocabulary in its own folder,
    or the trials would compare different base models, not LoRA settings.

    Trials read the main run's vision cache (``vision_cache_dir``): the same frozen tower, so the tokens
    02 and 03 cached serve every trial, and a trial caches only what is missing, once for all trials.

    Trials train eagerly (``compile_training`` off): each LoRA setting is another graph to compile (~60 s
    at BLIP-large size), longer than a short trial trains.
    """
    model_name = config.model_name
    if model_name in LOCAL_MODELS:
        model_name = str(local_model_dir(config).resolve())
    epochs, examples = config.sweep_epochs, None
    if rung is not None and rung.train_examples is not None:
        if n_train is None:
            raise ValueError("A halving rung needs n_train, the size of the training split.")
        examples = min(rung.train_examples, n_train)
        epochs = max(1.0, rung.train_examples / n_train)
    return config.replace(run_dir=str(trial_dir(config, rank, alpha, rung)), lora_r=rank, lora_alpha=alpha,
                          vision_cache_dir=str(cache_root(config)),
                          num_train_epochs=epochs, model_name=model_name, max_train_examples=examples,
                          compile_training=False, **fitted_training_settings(config))


def fitted_training_settings(config: MedcapConfig) -> dict[str, Any]:
    """The batch settings stage 03 fitted to the budget (empty when 03 recorded none)."""
    try:
        recorded = runs.read_stage_metrics(config.run_dir, "03_qlora_train")
    except (FileNotFoundError, OSError, ValueError):
        return {}
    if not (config.vram_budget_gb and recorded.get("budget_fit")):
        return {}
    settings = recorded.get("training_settings") or {}
    return {key: settings[key] for key in TRAINING_SETTINGS if key in settings}


def feasibility(peak_gpu_gb: float | None, budget_gb: float) -> bool | None:
    """True/False against the budget on a GPU; None on CPU, where GPU memory can't be measured."""
    return None if peak_gpu_gb is None else peak_gpu_gb <= budget_gb


def run_sweep(config: MedcapConfig, run_trial: TrialRunner, n_train: int, force: bool = False,
              processes: int | None = None) -> SweepResult:
    """Run (or reuse) the trials of :func:`sweep_schedule`; ``run_trial`` trains one config and returns its record.

    The record must hold ``val_cider``, ``trainable_params`` and ``peak_gpu_gb`` (None on CPU), and may hold
    ``val_ce_micro_f1`` (CE micro-F1 at the epoch of the best CIDEr); ``rung``, ``train_examples``,
    ``wall_time_s`` and the feasibility verdict are added here. Each rung keeps the better half of the
    previous rung's feasible trials (by ``best_model_metric``); ``n_train`` is the training split's size.
    With ``processes`` > 1 (default: one per training GPU, ``num_gpus``) a rung's trials run on that many
    GPUs at once: this process trains with ``run_trial`` on the first while :class:`TrialWorkers` (started
    once for the whole sweep) serve the others with the pipeline's own :func:`trial_runner` on the run's
    saved dataset; every process takes its next trial from a shared queue.
    """
    processes = processes or training_processes(config)
    trials: list[dict[str, Any]] = []
    skipped: list[str] = []
    survivors = [(rank, alpha) for rank in config.sweep_ranks for alpha in config.sweep_alphas]
    rung_trials: list[dict[str, Any]] = []
    workers: TrialWorkers | None = None
    try:
        for rung in sweep_schedule(config, n_train):
            if rung.index > 0:
                ranked = ranked_trials(rung_trials, config.best_model_metric)
                survivors = [(t["lora_r"], t["lora_alpha"]) for t in ranked][:rung.trials]
            done = [s for s in survivors if (trial_dir(config, *s, rung) / "trial.json").exists() and not force]
            skipped += [str(trial_dir(config, *s, rung).relative_to(Path(config.run_dir) / "sweep")) for s in done]
            pending = [s for s in survivors if s not in done]
            if processes > 1 and len(pending) > 1:
                if workers is None:  # the run's own model built once here, not by every process at once
                    prepare_local_model(config, load_saved_dataset(config.run_dir)[0])
                    workers = TrialWorkers(config, n_train, processes)
                workers.run(rung, pending, run_here=lambda rank, alpha, rung=rung: record_trial(
                    config, rank, alpha, rung, n_train, run_trial))
            else:
                for rank, alpha in pending:
                    record_trial(config, rank, alpha, rung, n_train, run_trial)
            rung_trials = [runs.read_json(trial_dir(config, *s, rung) / "trial.json") for s in survivors]
            trials.extend(rung_trials)
            if not ranked_trials(rung_trials, config.best_model_metric):
                break  # nothing feasible to carry on with
    finally:
        if workers is not None:
            workers.close()
    chosen = choose_trial(rung_trials, config.best_model_metric)
    if chosen is not None:
        runs.write_json(Path(config.run_dir) / "sweep" / "chosen.json", chosen)
    on_gpu = any(t.get("peak_gpu_gb") is not None for t in trials)
    note = (f"Trials over the {config.sweep_vram_budget_gb:g} GB budget are marked infeasible."
            if on_gpu else
            f"No GPU: the {config.sweep_vram_budget_gb:g} GB VRAM budget can't be measured on the CPU, "
            "so no trial is marked infeasible (peak RSS is shown instead).")
    return SweepResult(trials=trials, chosen=chosen, skipped=skipped, budget_note=note)


def record_trial(config: MedcapConfig, rank: int, alpha: int, rung: Rung, n_train: int,
                 run_trial: TrialRunner) -> dict[str, Any]:
    """Train one trial and write its ``trial.json`` (last, atomically: a rerun skips it)."""
    folder = trial_dir(config, rank, alpha, rung)
    start = time.perf_counter()
    record = dict(run_trial(trial_config(config, rank, alpha, rung, n_train)))
    record.update(lora_r=rank, lora_alpha=alpha, rung=rung.index, train_examples=rung.train_examples,
                  wall_time_s=round(time.perf_counter() - start, 2), process_id=os.getpid(),
                  feasible=feasibility(record.get("peak_gpu_gb"), config.sweep_vram_budget_gb))
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # the adapter is kept, not the states
    runs.write_json(folder / "trial.json", record)
    return record


class TrialWorkers:
    """Worker processes for the GPUs after the first (``CUDA_VISIBLE_DEVICES``, and each its share of the
    cores), alive for the whole sweep: each loads the base model once (:func:`trial_runner` on the run's
    saved dataset) and trains trial after trial, taking the next from a queue shared with the calling
    process, which trains on the first GPU meanwhile (:meth:`run`'s ``run_here``): nobody waits for the
    workers to start, and a slow trial holds up only its own process. Started with ``spawn`` (a fresh
    interpreter: CUDA is never forked). Use :meth:`close` (``run_sweep`` does, also on errors)."""

    POLL_S = 2.0
    TAKE_S = 0.5
    """How long the calling process waits on the queue before it takes it as empty (a job just put may
    still be on its way through the queue's pipe)."""

    def __init__(self, config: MedcapConfig, n_train: int, processes: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._results = context.Queue()
        self._jobs = context.Queue()
        on_gpu = pick_device(config).type == "cuda"
        self._processes = []
        for index in range(1, processes):  # the calling process is the first
            # Not daemonic: a daemonic process may not start children, and on a GPU each trial's data loader
            # starts worker processes. close() ends them (run_sweep calls it, errors included).
            process = context.Process(target=_serve_trials, daemon=False, name=f"medcap-sweep-{index}",
                                      args=(config.to_dict(), n_train, index, self._jobs, self._results))
            with temporary_environment(process_environment(index, processes, on_gpu, config.cpu_threads)):
                process.start()  # the child's environment is this one at start
            self._processes.append(process)

    @property
    def pids(self) -> list[int | None]:
        return [process.pid for process in self._processes]

    def run(self, rung: Rung, settings: list[tuple[int, int]],
            run_here: Callable[[int, int], Any] | None = None) -> None:
        """Train ``settings``, each once, by whichever process is free first (``run_here(rank, alpha)``
        trains one in this process; None: the workers train them all), and wait for all; :class:`StageFailed`
        when a trial or a process fails (the trials finished are kept: a rerun does the rest)."""
        for setting in settings:
            self._jobs.put((asdict(rung), setting))
        outstanding = len(settings)
        failures: list[str] = []
        if run_here is not None:
            with threads_for_share(len(self._processes) + 1):  # this process is one of them, side by side
                while (job := self._take()) is not None:
                    outstanding -= 1
                    try:
                        run_here(*job[1])
                    except Exception:  # noqa: BLE001 - reported with the workers' failures below
                        failures.append(f"this process, r={job[1][0]} alpha={job[1][1]}: {traceback.format_exc()}")
                        while self._take() is not None:  # the rest of the rung is not started
                            outstanding -= 1
        while outstanding:
            try:
                index, error = self._results.get(timeout=self.POLL_S)
            except queue.Empty:
                dead = [p for p in self._processes if not p.is_alive()]
                if dead:
                    raise StageFailed(f"The sweep's {rung.name}: process {dead[0].name} died with exit status "
                                      f"{dead[0].exitcode}. Finished trials are kept; rerunning the stage does "
                                      "the rest.") from None
                continue
            outstanding -= 1
            if error:
                failures.append(f"process {index}: {error}")
        if failures:
            raise StageFailed(f"The sweep's {rung.name} failed (finished trials are kept, a rerun does the rest):\n"
                              + "\n".join(f[-2000:] for f in failures))

    def _take(self) -> tuple[dict[str, Any], tuple[int, int]] | None:
        try:
            return self._jobs.get(timeout=self.TAKE_S)
        except queue.Empty:
            return None

    def close(self) -> None:
        while self._take() is not None:  # after an error or an interrupt: trials not yet started stay undone
            pass
        for _ in self._processes:
            self._jobs.put(None)
        for process in self._processes:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
                process.join()


def fork_data_loader_workers() -> None:
    """Let this process's data loaders fork their workers (where the OS can). A process started with
    ``spawn`` inherits ``spawn`` as its default start method, so each trial's data loaders (training and
    evaluation, up to 8 workers each) would start fresh interpreters that import torch, transformers and
    medcap again. The two-GPU sweep's log showed 18-21 s before each trial's first step and 21-26 s per
    evaluation, against 1 s and 4-8 s in one process (not yet remeasured with this). Forking a process
    that uses CUDA is safe for data loader workers, which never touch the GPU (PyTorch's default on Linux)."""
    if "fork" in multiprocessing.get_all_start_methods():
        multiprocessing.set_start_method("fork", force=True)


def _serve_trials(config_values: dict[str, Any], n_train: int, index: int, jobs: Any, results: Any) -> None:
    """One :class:`TrialWorkers` process: train the trials it takes from ``jobs``, one at a time, until it
    takes None; one result per trial (None, or the error's traceback)."""
    fork_data_loader_workers()
    config = MedcapConfig.from_dict(config_values)
    run_trial = trial_runner(load_saved_dataset(config.run_dir)[0])
    while (job := jobs.get()) is not None:
        rung_values, (rank, alpha) = job
        try:
            record_trial(config, rank, alpha, Rung(**rung_values), n_train, run_trial)
            results.put((index, None))
        except Exception:  # noqa: BLE001 - reported to the parent, which raises StageFailed with it
            results.put((index, traceback.format_exc()))


TRIAL_KEYS = {"CIDEr": "val_cider", "CE micro-F1": "val_ce_micro_f1"}
"""The trial record's key for each ``best_model_metric``."""


def ranked_trials(trials: list[dict[str, Any]], metric: str = "CIDEr") -> list[dict[str, Any]]:
    """Trials not known to exceed the budget, best validation ``metric`` first (CIDEr, or CE micro-F1:
    ``config.best_model_metric``); ties go to the smaller rank. Trials that record no CE (a runner that
    scores CIDEr only) are ranked by CIDEr."""
    key = TRIAL_KEYS[metric]
    if not any(t.get(key) is not None for t in trials):
        key = TRIAL_KEYS["CIDEr"]
    candidates = [t for t in trials if t.get("feasible") is not False and t.get(key) is not None]
    return sorted(candidates, key=lambda t: (-t[key], t["lora_r"], t["lora_alpha"]))


def choose_trial(trials: list[dict[str, Any]], metric: str = "CIDEr") -> dict[str, Any] | None:
    """The first of :func:`ranked_trials` (None when no trial qualifies)."""
    ranked = ranked_trials(trials, metric)
    return ranked[0] if ranked else None


def training_sample(rows: Any, size: int | None, seed: int) -> Any:
    """A fixed random sample of ``size`` training rows (all of them when ``size`` is None or too big)."""
    if size is None or size >= len(rows):
        return rows
    if hasattr(rows, "shuffle"):
        return rows.shuffle(seed=seed).select(range(size))
    return random.Random(seed).sample(list(rows), size)


def trial_runner(dataset: Any) -> TrialRunner:
    """Train one trial's config with the pipeline's own model loading, LoRA and Trainer code.

    The base model is loaded once and serves every trial: the trial's adapter is attached, trained and
    removed again (``unload``). A trial trains on its rung's sample of the training set and is scored
    on the first ``sweep_eval_examples`` validation studies.
    """
    loaded: dict[str, Any] = {}

    def run_trial(config: MedcapConfig) -> dict[str, Any]:
        if loaded.get("model_name") != config.model_name:
            loaded.clear()
            loaded["model_name"] = config.model_name
            loaded["base"], loaded["processor"] = load_model_and_processor(config, dataset)
        rows = {"train": training_sample(dataset["train"], config.max_train_examples, config.seed),
                "validation": limit_rows(dataset["validation"], config.sweep_eval_examples)}
        peft_model = attach_lora(loaded["base"], config)
        try:
            result = train(config, peft_model, loaded["processor"], rows, save_total_limit=1)
        finally:
            loaded["base"] = peft_model.unload()
        peaks = result.peak_memory
        gpu = [p["max_reserved_gb"] for p in peaks if "max_reserved_gb" in p]
        rss = [p["peak_rss_gb"] for p in peaks if "peak_rss_gb" in p]
        return {"val_cider": result.best_cider, "trainable_params": result.trainable_params,
                "val_ce_micro_f1": value_at_epoch(result.history, result.best_epoch, "val_ce_micro_f1"),
                "peak_gpu_gb": max(gpu) if gpu else None, "peak_rss_gb": max(rss) if rss else None,
                "train_runtime_s": result.train_runtime_s}

    return run_trial


def results_markdown(result: SweepResult) -> str:
    lines = ["| rung | training examples | r | alpha | val CIDEr | val CE micro-F1 | trainable params | peak GPU (GB) | "
             "peak RSS (GB) | time (s) | fits budget |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for t in result.trials:
        fits = {True: "yes", False: "**no**", None: "n/a (CPU)"}[t.get("feasible")]
        examples = "all" if t.get("train_examples") is None else f"{t['train_examples']:,}"
        lines.append(f"| {t.get('rung', 0)} | {examples} | {t['lora_r']} | {t['lora_alpha']} | "
                     f"{_num(t.get('val_cider'), 3)} | "
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


