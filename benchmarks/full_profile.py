"""The full profile at real scale, stage by stage, on the rehearsal (random BLIP-large, 4 GB cap).

    python -m medcap_helpers.rehearsal                 # set-up: the rehearsal data (not timed)
    python benchmarks/full_profile.py                  # "today": the seed's code path, slices + projections
    python benchmarks/full_profile.py --check          # the levers side by side on one slice (same results?)
    python benchmarks/full_profile.py --after 01-03    # "after": the real pipeline, stage by stage, measured
    python benchmarks/full_profile.py --after 04       #   (pieces of under 10 minutes; a run folder resumes;
                                                       #   --artefacts DIR, default $OUT: notebooks, logs, results)
    python benchmarks/full_profile.py --pack-state state.tgz    # a run's results between two GPU machines
    python benchmarks/full_profile.py --unpack-state state.tgz  #   (then --after 01 --warm-cache: 01, and the
    python benchmarks/full_profile.py --after 04-06             #   cache refilled untimed; then the rest)

``--after`` runs ``medcap run --profile rehearsal`` one stage at a time (the pipeline's own code and
defaults: 4 GB budget, the fitted batch, successive-halving sweep) and times each stage whole; peak GPU
memory per stage is the largest per-process use nvidia-smi reports while it runs (sampled every 0.2 s).

Each stage runs in a fresh process with the allocator capped at 4 GB minus the CUDA context, through
the pipeline's own functions at the rehearsal profile's settings (the full profile's, with reports
forced to 75 new tokens). What finishes in minutes is measured whole; what would take hours (training,
the sweep, generating every report) is timed on a slice and projected from the measured rate: every
figure says ``measured`` or ``projected`` and how. Peak GPU memory: the allocator's peak and the
process's use per NVML (what nvidia-smi shows).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results"
GB = 1e9
CAP_GB = 4.0


def cap_memory() -> float | None:
    import torch

    from medcap_helpers.devices import process_gpu_gb

    torch.cuda.init()
    torch.empty(1, device="cuda")
    context = process_gpu_gb() or 0.0
    total = torch.cuda.get_device_properties(0).total_memory / GB
    torch.cuda.set_per_process_memory_fraction((CAP_GB - context) / total)
    return context


def memory() -> dict[str, float | None]:
    import torch

    from medcap_helpers.devices import process_gpu_gb

    return {"peak_allocated_gb": torch.cuda.max_memory_allocated() / GB,
            "peak_reserved_gb": torch.cuda.max_memory_reserved() / GB, "process_gpu_gb": process_gpu_gb()}


def config_for(run_dir: str, data_dir: str) -> Any:
    from medcap_helpers.config import MedcapConfig

    return MedcapConfig.from_profile("rehearsal", run_dir=run_dir, data_path=f"{data_dir}/NLMCXR_reports.tgz",
                                     images_dir=f"{data_dir}/NLMCXR_png")


def timed(function: Any) -> tuple[Any, float]:
    import torch

    torch.cuda.synchronize()
    start = time.perf_counter()
    value = function()
    torch.cuda.synchronize()
    return value, time.perf_counter() - start


# ----------------------------------------------------------------------------------------- stages
def stage_data(run_dir: str, data_dir: str) -> dict[str, Any]:
    from medcap_helpers import data

    config = config_for(run_dir, data_dir)
    (dd, report), seconds = timed(lambda: data.build_dataset(config, progress=False))
    _, save_s = timed(lambda: data.save_dataset(dd, report, run_dir))
    return {"seconds": seconds + save_s, "how": "measured", "split_sizes": report.split_sizes,
            "studies_outside_split": report.studies_outside_split}


def generation_rate(model: Any, processor: Any, split: Any, config: Any, n: int) -> tuple[float, dict[str, Any]]:
    """Studies per second generating ``n`` studies of ``split`` (after one warm-up batch)."""
    import torch

    from medcap_helpers.generation import generate_for_split

    sample = split.select(range(min(n, len(split))))
    generate_for_split(model, processor, sample.select(range(min(config.eval_batch_size, len(sample)))), config)
    torch.cuda.reset_peak_memory_stats()
    _, seconds = timed(lambda: generate_for_split(model, processor, sample, config))
    return len(sample) / seconds, memory()


def stage_baselines(run_dir: str, data_dir: str, n: int) -> dict[str, Any]:
    from medcap_helpers import baselines, data, model
    from medcap_helpers.generation import study_inputs

    context = cap_memory()
    config = config_for(run_dir, data_dir)
    dd, _ = data.load_saved_dataset(run_dir)
    (base, processor), load_s = timed(lambda: model.load_model_and_processor(config, dd))
    rate, gen_memory = generation_rate(base, processor, dd["test"], config, n)
    train = dd["train"].select(range(min(4 * n, len(dd["train"]))))
    _, embed_s = timed(lambda: baselines.image_embeddings(base, processor, study_inputs(train), config.eval_batch_size,
                                                          progress=False))
    embed_rate = len(train) / embed_s
    studies = len(dd["train"]) + len(dd["test"])
    seconds = load_s + len(dd["test"]) / rate + studies / embed_rate
    return {"seconds": seconds, "how": f"projected: zero-shot generation timed on {n} test studies "
            f"({rate:.2f} studies/s), embeddings on {len(train)} training studies ({embed_rate:.1f}/s)",
            "generation_studies_per_s": rate, "embedding_studies_per_s": embed_rate, "load_s": load_s,
            "memory": gen_memory, "cuda_context_gb": context}


def stage_train(run_dir: str, data_dir: str, steps: int, n_val: int) -> dict[str, Any]:
    import torch

    from medcap_helpers import data, model
    from medcap_helpers.train import train
    from run_benchmarks import make_step_timer

    context = cap_memory()
    config = config_for(run_dir, data_dir)
    dd, _ = data.load_saved_dataset(run_dir)
    base, processor = model.load_model_and_processor(config, dd)
    peft_model = model.attach_lora(base, config)
    rows = dd["train"].select(range(min(steps * config.effective_batch_size, len(dd["train"]))))

    timer = make_step_timer()
    torch.cuda.reset_peak_memory_stats()
    slice_config = config.replace(num_train_epochs=1.0, run_dir=str(Path(run_dir) / "train_slice"))
    train(slice_config, peft_model, processor, {"train": rows, "validation": dd["validation"].select(range(2))},
          callbacks_extra=[timer], max_generation_examples=2)
    train_memory = memory()
    step_s = statistics.median(timer.times[3:] or timer.times)
    samples_per_s = config.effective_batch_size / step_s
    val_rate, val_memory = generation_rate(peft_model, processor, dd["validation"], config, n_val)
    peft_model.save_pretrained(Path(run_dir) / "adapter")
    processor.save_pretrained(Path(run_dir) / "adapter")
    n_train, n_val_all = len(dd["train"]), len(dd["validation"])
    epoch_s = n_train / samples_per_s + n_val_all / val_rate
    return {"seconds": config.num_train_epochs * epoch_s,
            "how": f"projected: {len(timer.times)} optimizer steps timed (batch {config.per_device_train_batch_size} x "
                   f"{config.gradient_accumulation_steps}, median after warm-up), validation generation timed on "
                   f"{n_val} studies; {config.num_train_epochs:g} epochs of {n_train} studies + {n_val_all} "
                   "validation reports each",
            "samples_per_s": samples_per_s, "validation_studies_per_s": val_rate, "epoch_s": epoch_s,
            "memory_training": train_memory, "memory_validation": val_memory, "cuda_context_gb": context,
            "sweep_seconds": len(config.sweep_ranks) * len(config.sweep_alphas) * config.sweep_epochs * epoch_s,
            "sweep_how": f"projected: {len(config.sweep_ranks) * len(config.sweep_alphas)} trials x "
                         f"{config.sweep_epochs:g} epoch at the measured epoch time"}


def stage_merge(run_dir: str, data_dir: str, n_val: int) -> dict[str, Any]:
    from medcap_helpers import checkpoints, data, devices, merge, model

    context = cap_memory()
    config = config_for(run_dir, data_dir)
    dd, _ = data.load_saved_dataset(run_dir)
    adapter = Path(run_dir) / "adapter"
    processor = checkpoints.load_processor_from(adapter)
    run = Path(run_dir)
    device = devices.pick_device(config)
    dtype16 = merge.merge_dtype(devices.compute_dtype(config, device))
    source = model.base_model_source(config)
    start = time.perf_counter()
    merge.merge_onto_16bit_base(source, adapter, run / "merged-16bit", processor, dtype16)
    merge.merge_onto_dequantized_base(model.load_base_model(config), adapter, run / "merged-dequantized-16bit",
                                      processor, dtype16)
    for name in ("merged-16bit", "merged-dequantized-16bit"):
        merge.requantize_nf4(run / name, run / f"{name}-nf4", processor,
                             model.quantization_config(devices.compute_dtype(config, device)),
                             devices.device_map_for(device))
    merges_s = time.perf_counter() - start
    captioner, captioner_processor = checkpoints.load_captioner(run / "merged-16bit-nf4",
                                                                device_map=devices.device_map_for(device))
    rate, gen_memory = generation_rate(captioner, captioner_processor, dd["validation"], config, n_val)
    n_val_all, n_test = len(dd["validation"]), len(dd["test"])
    return {"seconds": merges_s + 3 * n_val_all / rate,
            "how": f"merges and re-quantizations measured ({merges_s:.0f} s); validation generation of the "
                   f"adapter and both NF4 models projected from {n_val} studies ({rate:.2f}/s)",
            "merges_s": merges_s, "nf4_generation_studies_per_s": rate, "memory": gen_memory,
            "cuda_context_gb": context,
            "test_seconds": 2 * n_test / rate,
            "test_how": f"projected: {n_test} test studies generated twice (adapter, final NF4) at {rate:.2f}/s"}


# ----------------------------------------------------------------------------------------- after
def smi_poller(log: Path) -> subprocess.Popen:
    """nvidia-smi writing every GPU process's memory (MiB) to ``log`` every 0.2 s."""
    return subprocess.Popen(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits",
                             "-lms", "200"], stdout=log.open("w"), stderr=subprocess.DEVNULL)


def peak_process_gb(log: Path) -> float | None:
    values = []
    for line in log.read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[1].isdigit():
            values.append(int(parts[1]) * 2 ** 20 / GB)
    return max(values) if values else None


def warm_vision_cache(run: str | Path) -> dict[str, Any]:
    """Set-up on a fresh machine, not a stage: ``run``'s vision cache filled for every split, as 02 and 03
    leave it on one machine. A packed state leaves the cache behind (8.8 GB at full size), and without this
    the first stage on the next machine would refill it inside its own time (03's probe cell: 45 s, most of
    it 4,137 training images cached again). Needs 01's dataset (``--after 01`` first)."""
    from medcap_helpers import vision_cache
    from medcap_helpers.config import MedcapConfig
    from medcap_helpers.data import load_saved_dataset
    from medcap_helpers.model import load_model_and_processor

    config = MedcapConfig.load(Path(run) / "config.json")
    dataset, _ = load_saved_dataset(config.run_dir)
    model, processor = load_model_and_processor(config, dataset)
    start = time.perf_counter()
    cache = vision_cache.prepare_cache(config, model, processor, [dataset[name] for name in dataset],
                                       progress=False)
    files = sum(1 for _ in cache.folder.rglob("*.npy")) if cache is not None else 0
    return {"seconds": time.perf_counter() - start, "cached_images": files,
            "how": "set-up of a fresh machine (not part of any stage's time)"}


def notebook_cells(notebook: str | Path) -> list[dict[str, Any]]:
    """An executed notebook's cells; none when it is missing or unreadable (a stage that failed early)."""
    try:
        return json.loads(Path(notebook).read_text())["cells"]
    except (OSError, ValueError, KeyError):
        return []


def cell_times(notebook: str | Path, at_least_s: float = 1.0) -> list[dict[str, Any]]:
    """Papermill's per-cell durations in an executed notebook (cells of ``at_least_s`` or more): where a
    stage's time went, by the first line of each cell."""
    times = []
    for index, cell in enumerate(notebook_cells(notebook)):
        seconds = (cell.get("metadata", {}).get("papermill") or {}).get("duration")
        if seconds is not None and seconds >= at_least_s:
            source = "".join(cell.get("source", ""))
            times.append({"cell": index, "seconds": round(seconds, 1), "code": source.split("\n")[0][:80]})
    return times


def notebook_seconds(notebook: str | Path) -> float | None:
    """The executed notebook's own time per papermill (kernel start to last cell): a stage's time less this
    is what ``medcap run`` spent around the notebook (its start-up and imports)."""
    try:
        seconds = json.loads(Path(notebook).read_text())["metadata"]["papermill"]["duration"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return round(seconds, 1) if seconds is not None else None


def generation_retries(notebook: str | Path) -> list[str]:
    """The executed notebook's warnings of generation batches retried smaller (out of memory):
    none means every batch ran at the size it was given."""
    texts = ("".join(output.get("text", "")) for cell in notebook_cells(notebook) for output in cell.get("outputs", []))
    return [line.strip() for text in texts for line in text.splitlines() if "ran out of GPU memory; going on" in line]


def keep_artefacts(run: str | Path, stage: str, output: str, artefacts: str | Path) -> list[Path]:
    """Copy what a measured stage leaves behind into ``artefacts`` as soon as it ends: its executed notebook,
    its console output and the results file so far. On the GPU machine ``artefacts`` is ``$OUT``, which comes
    back with the call: a session cut off after it loses neither figures nor notebooks (a run folder on the
    device does not come back)."""
    import shutil

    artefacts = Path(artefacts)
    (artefacts / "notebooks").mkdir(parents=True, exist_ok=True)
    kept = []
    notebook = Path(run) / "notebooks" / f"{stage}.ipynb"
    if notebook.exists():
        kept.append(Path(shutil.copy2(notebook, artefacts / "notebooks" / notebook.name)))
    log = artefacts / f"{stage}.log"
    log.write_text(output)
    kept.append(log)
    results = RESULTS / "full_profile.json"
    if results.exists():
        kept.append(Path(shutil.copy2(results, artefacts / results.name)))
    return kept


def run_after(spec: str, run: str, data_dir: str, force: bool = False,
              artefacts: str | Path | None = None) -> dict[str, Any]:
    """Stages of ``spec`` through ``medcap run --profile rehearsal`` one by one: wall time and peak memory.
    A stage the run has finished is skipped, not timed (``medcap run`` would skip it in no time), unless
    ``force`` reruns it. With ``artefacts``, each stage's notebook, output and the results so far are copied
    there as it ends (:func:`keep_artefacts`)."""
    from medcap_helpers.pipeline import parse_stages
    from medcap_helpers.runs import is_done

    results: dict[str, Any] = {}
    for stage in parse_stages(spec):
        if is_done(run, stage) and not force:
            print(f"{stage} is done in {run}: not timed (--force reruns it)", flush=True)
            continue
        log = Path(tempfile.mkdtemp()) / "smi.csv"
        poller = smi_poller(log)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "medcap_helpers.cli", "run", "--profile", "rehearsal",
                               "--out", run, "--stages", stage, "--no-progress", "--skip-check",
                               "--set", f"data_path={data_dir}/NLMCXR_reports.tgz",
                               "--set", f"images_dir={data_dir}/NLMCXR_png"] + (["--force"] if force else []),
                              capture_output=True, text=True)
        seconds = time.perf_counter() - start
        poller.terminate()
        poller.wait()
        results[stage] = {"seconds": seconds, "how": "measured (the whole stage, kernel start included)",
                          "peak_process_gpu_gb": peak_process_gb(log), "rc": done.returncode,
                          "notebook_seconds": notebook_seconds(Path(run) / "notebooks" / f"{stage}.ipynb"),
                          "generation_retries": generation_retries(Path(run) / "notebooks" / f"{stage}.ipynb"),
                          "cells": cell_times(Path(run) / "notebooks" / f"{stage}.ipynb")}
        if done.returncode != 0:
            results[stage]["error"] = (done.stdout + done.stderr)[-3000:]
        print(stage, json.dumps(results[stage])[:3000], flush=True)
        record_after({stage: results[stage]}, run)  # each stage as it ends: a call cut off keeps the others
        if artefacts is not None:
            keep_artefacts(run, stage, done.stdout + done.stderr, artefacts)
        if done.returncode != 0:
            break
    return results


def stage_facts(run: str) -> dict[str, Any]:
    """Figures the stages recorded themselves: training rate, fitted settings, sweep plan, generation batches."""
    from medcap_helpers import runs

    facts: dict[str, Any] = {}
    try:
        train = runs.read_stage_metrics(run, "03_qlora_train")
        facts["03_training_settings"] = train.get("training_settings")
        facts["03_budget_fit"] = train.get("budget_fit")
        facts["03_train_runtime_s"] = train.get("train_runtime_s")
        # train_seconds: the epoch's steps without its validation, so the Trainer's own rate can be read off
        facts["03_epochs"] = [{k: e.get(k) for k in ("epoch", "train_loss", "eval_loss", "train_seconds",
                                                     "first_step_seconds", "peak_memory")}
                              for e in train.get("epochs", [])]
    except (OSError, ValueError):
        pass
    try:
        sweep = runs.read_stage_metrics(run, "04_sweep")
        facts["04_trials"] = [{k: t.get(k) for k in ("rung", "train_examples", "lora_r", "lora_alpha", "wall_time_s",
                                                     "peak_gpu_gb")} for t in sweep.get("trials", [])]
    except (OSError, ValueError):
        pass
    return facts


def record_after(stages: dict[str, Any], run: str) -> None:
    """Merge ``stages`` into the "after" part of the results file (pieces of a run add up)."""
    import torch

    from medcap_helpers.runs import environment_info, read_json, write_json

    path = RESULTS / "full_profile.json"
    env = environment_info()
    env["gpu"] = torch.cuda.get_device_name(0)
    results = merge_after(read_json(path), stages, run, env, stage_facts(run))
    write_json(path, results)
    print(f"after: {results['after']['total_seconds'] / 60:.1f} min so far -> {path}")


def merge_after(results: dict[str, Any], stages: dict[str, Any], run: str, env: dict[str, Any],
                facts: dict[str, Any]) -> dict[str, Any]:
    """``results`` with ``stages`` merged into its "after" run. Pieces of one run (same run folder, same
    commit) add up; a run of another folder or commit starts a new "after", and the previous one moves to
    the front of ``after_earlier`` whole (its figures are never mixed with the new run's)."""
    after = results.get("after") or {"stages": {}}
    same_run = after.get("run") == run and (after.get("environment") or {}).get("git_commit") == env.get("git_commit")
    if after["stages"] and not same_run:
        results["after_earlier"] = [after] + list(results.get("after_earlier", []))
        after = {"stages": {}}
    after["run"] = run
    after["stages"].update(stages)
    after["total_seconds"] = sum(s.get("seconds") or 0.0 for s in after["stages"].values())
    after["peak_process_gpu_gb"] = max((s.get("peak_process_gpu_gb") or 0.0 for s in after["stages"].values()),
                                       default=None)
    after["facts"] = facts
    after["environment"] = env
    results["after"] = after
    return results


REBUILT_FOLDERS = ("dataset", "random_blip_large", "tiny_model", "vision_cache", "checkpoints", "notebooks")
"""What a run rebuilds by itself, left out of a packed state: 01's dataset and the seeded random model
(deterministic), the vision cache (refilled on demand), checkpoints (only a stopped 03 needs them: its
newest complete one is kept then) and the executed notebooks (kept as artefacts separately)."""


def pack_run_state(run: str | Path, archive: str | Path) -> int:
    """Pack ``run``'s results (stages' metrics, predictions, adapter, sweep) into ``archive`` (.tgz), without
    what a run rebuilds (:data:`REBUILT_FOLDERS`) and without 01's done marker, so that on another machine
    ``--unpack-state`` then ``--after 01,<next stages>`` rebuilds the data and goes on. Returns its size."""
    import tarfile

    from medcap_helpers.checkpoints import last_complete_checkpoint
    from medcap_helpers.runs import is_done

    run = Path(run)
    resume_from = None if is_done(run, "03_qlora_train") else last_complete_checkpoint(run / "checkpoints")

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        parts = Path(info.name).parts
        top = parts[1] if len(parts) > 1 else ""
        if top == "checkpoints" and resume_from is not None and (len(parts) == 2 or parts[2] == resume_from.name):
            return info  # a stopped 03 resumes from its newest checkpoint there
        return None if top in REBUILT_FOLDERS or top.startswith(".lock") or top == "01_data.done" else info

    with tarfile.open(archive, "w:gz") as tar:
        tar.add(run, arcname=run.name, filter=keep)
    return Path(archive).stat().st_size


def unpack_run_state(archive: str | Path, run: str | Path) -> None:
    """Unpack a :func:`pack_run_state` archive as the run folder ``run``."""
    import tarfile

    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            name = Path(*Path(member.name).parts[1:])
            if str(name) in ("", "."):
                continue
            member.name = str(name)
            tar.extract(member, run, filter="data")


CACHE_FILL_IMAGES_PER_S = 143
"""The vision cache's fill rate under the 4 GB cap on an H200 (hashing, 16 decoding threads, the NF4 tower):
4,729 images in 33 s, measured in ``multi_gpu.py --part training --set cache_vision_embeddings=True`` at
e821aae (its log's last "Caching image tokens" line). Later measurements record their own
(``vision_cache_fill`` in ``multi_gpu.json``), which the projection then uses."""


def cached_tokens(measurement: dict[str, Any]) -> bool:
    """Whether a ``multi_gpu.py`` training measurement trained on cached image tokens (recorded since
    the full profile caches by default; earlier entries say so in their ``--set`` settings)."""
    if "cache_vision_embeddings" in measurement:
        return bool(measurement["cache_vision_embeddings"])
    return bool((measurement.get("settings") or {}).get("cache_vision_embeddings"))


def profile_rate(measured: dict[str, Any], config: Any) -> dict[str, Any] | None:
    """The ``multi_gpu.py`` training measurement that trained as ``config`` trains on one GPU: the same
    micro-batch and accumulation per process and the same cache setting (one GPU preferred; else the
    multi-GPU run, whose rate per GPU includes its gradient exchange)."""
    matching = [m for m in measured.values()
                if isinstance(m, dict) and m.get("micro_batch") == config.per_device_train_batch_size
                and m.get("accumulation") == config.gradient_accumulation_steps
                and cached_tokens(m) == config.cache_vision_embeddings
                and bool(m.get("sdpa_attention")) == config.sdpa_attention]
    return min(matching, key=lambda m: m["gpus"], default=None)


def project_after(results: dict[str, Any]) -> dict[str, Any]:
    """Per-stage "after" figures, projected the way "today" was: from rates measured under the cap
    (``--rates``: the budget's fit and its training rate, generation at the budget's batch) and the
    stages' own work (the successive-halving schedule, shared predictions), plus today's load time, merge
    time and embedding rate where the code did not change."""
    from medcap_helpers.config import MedcapConfig
    from medcap_helpers.sweep import sweep_schedule

    today, rates = results["today"]["stages"], results["rates"]
    gen = rates["generation"]["reports_per_s"]
    train_rate = rates["training_fitted"]["samples_per_s"]
    train_how = "the budget's fit, on the first rows"
    config = MedcapConfig.from_profile("rehearsal")
    measured = json.loads((RESULTS / "multi_gpu.json").read_text()).get("training", {}) \
        if (RESULTS / "multi_gpu.json").exists() else {}
    whole_epoch = profile_rate(measured, config)
    if whole_epoch:  # measured later: a whole epoch at the profile's batch and cache setting, validation excluded
        train_rate = whole_epoch["samples_per_s"] / whole_epoch["gpus"]
        per_gpu = f", per GPU of the {whole_epoch['gpus']}-GPU run" if whole_epoch["gpus"] > 1 else ""
        train_how = (f"an epoch of {whole_epoch['samples']:.0f} studies at {whole_epoch['micro_batch']} x "
                     f"{whole_epoch['accumulation']} per GPU"
                     f"{', SDPA attention' if whole_epoch.get('sdpa_attention') else ''}"
                     f"{', vision cache' if config.cache_vision_embeddings else ''}"
                     f"{per_gpu}, "
                     "benchmarks/results/multi_gpu.json")
    sizes = today["01_data"]["split_sizes"]
    n_train, n_val, n_test = (sizes[s]["studies"] for s in ("train", "validation", "test"))
    load = today["02_baseline"]["load_s"]
    embed = today["02_baseline"]["embedding_studies_per_s"]
    images = 2 * (n_train + n_val + n_test)  # both views of every study (the rehearsal's studies have two)
    if config.cache_vision_embeddings:  # 02 fills the cache; the neighbours' embeddings come from it
        fills = [m["vision_cache_fill"] for m in measured.values() if isinstance(m, dict) and m.get("vision_cache_fill")]
        fill_rate = max(fills, key=lambda f: f["images"])["images_per_s"] if fills else CACHE_FILL_IMAGES_PER_S
        embedding_s = images / fill_rate
        embedding_how = f"the vision cache filled for {images:,} images at {fill_rate:.0f}/s"
    else:
        embedding_s = (n_train + n_test) / embed
        embedding_how = f"embeddings at today's {embed:.1f}/s"
    rungs = sweep_schedule(config, n_train)
    sweep_examples = sum(r.trials * (r.train_examples or 0) for r in rungs)
    sweep_reports = sum(r.trials for r in rungs) * min(config.sweep_eval_examples or n_val, n_val)
    epoch = n_train / train_rate + n_val / gen
    stages = {
        "01_data": {"seconds": today["01_data"]["seconds"], "how": "unchanged code: today's measurement"},
        "02_baseline": {"seconds": load + n_test / gen + embedding_s,
                        "how": f"projected: zero-shot generation of {n_test} test studies at {gen:.2f}/s, "
                               f"{embedding_how}, today's load time"},
        "03_qlora_train": {"seconds": load + config.num_train_epochs * epoch,
                           "how": f"projected: {config.num_train_epochs:g} epochs of {n_train} studies at "
                                  f"{train_rate:.1f} samples/s ({train_how}) + {n_val} validation reports at "
                                  f"{gen:.2f}/s each; today's load time",
                           "peak_process_gpu_gb": max(rates["training_fitted"]["process_gpu_gb"],
                                                      rates["generation"]["process_gpu_gb"])},
        "04_sweep": {"seconds": load + sweep_examples / train_rate + sweep_reports / gen,
                     "how": f"projected: successive halving, {' / '.join(str(r.trials) for r in rungs)} trials on "
                            f"{sweep_examples:,} training examples in all at {train_rate:.1f}/s + "
                            f"{sweep_reports:,} validation reports at {gen:.2f}/s; one model load"},
        "05_merge_requant": {"seconds": today["05_merge_requant"]["merges_s"] + 2 * n_val / gen,
                             "how": f"projected: today's merges ({today['05_merge_requant']['merges_s']:.0f} s) + "
                                    f"both NF4 models' {n_val} validation reports at {gen:.2f}/s (the adapter's "
                                    "come from 03)"},
        "06_eval_and_demo": {"seconds": 2 * n_test / gen,
                             "how": f"projected: {n_test} test studies generated twice (adapter, final NF4) at "
                                    f"{gen:.2f}/s"},
    }
    total = sum(s["seconds"] for s in stages.values())
    return {"stages": stages, "total_seconds": total,
            "speedup": results["today"]["total_seconds"] / total,
            "note": "Projected the way today's figures were (library calls, no notebook kernels). Measured whole, "
                    "with its notebook kernel, 01 took "
                    f"{results.get('after', {}).get('stages', {}).get('01_data', {}).get('seconds', float('nan')):.0f} s "
                    "(`--after 01`): each notebook adds its kernel start and imports."}


# ----------------------------------------------------------------------------------------- check
def check_levers(data_dir: str, run: str, n: int) -> dict[str, Any]:
    """The levers against today's code path on the same slice, same process, 4 GB cap.

    Generation: today's path (4-bit decoder with LoRA, batch 8) against the 16-bit decoder copy at the
    budget's batch: reports/s, peak memory, and how many reports come out identical. Training: the same
    40 steps with and without data-loader workers (the loss curves must be identical).
    """
    import torch

    from medcap_helpers import model
    from medcap_helpers.generation import generate_reports, generation_batch_size, study_inputs
    from medcap_helpers.train import train
    from run_benchmarks import make_step_timer

    context = cap_memory()
    config, dd, peft_model, processor = rehearsal_peft_model(run, data_dir)
    sample = study_inputs(dd["validation"].select(range(n)))
    out: dict[str, Any] = {"cuda_context_gb": context, "studies": n}
    reports = {}
    for name, copy, batch in (("today: 4-bit decoder + LoRA, batch 8", False, 8),
                              ("after: 16-bit decoder copy, budget batch", True,
                               generation_batch_size(peft_model, config))):
        generate_reports(peft_model, processor, [sample[i] for i in range(min(batch, n))], batch_size=batch,
                         max_new_tokens=config.max_new_tokens, min_new_tokens=config.min_new_tokens,
                         num_beams=config.num_beams, decoder_copy=copy, progress=False)  # warm-up
        torch.cuda.reset_peak_memory_stats()
        reports[name], seconds = timed(lambda copy=copy, batch=batch: generate_reports(
            peft_model, processor, sample, batch_size=batch, max_new_tokens=config.max_new_tokens,
            min_new_tokens=config.min_new_tokens, num_beams=config.num_beams, decoder_copy=copy, progress=False))
        out[name] = {"batch": batch, "reports_per_s": n / seconds, **memory()}
        print(name, out[name], flush=True)
    first, second = reports.values()
    out["identical_reports"] = sum(a == b for a, b in zip(first, second))
    out["same_first_20_tokens"] = sum(a.split()[:20] == b.split()[:20] for a, b in zip(first, second))

    rows = dd["train"].select(range(min(40 * config.effective_batch_size, len(dd["train"]))))
    curves = {}
    for workers in (0, None):
        peft = model.attach_lora(peft_model.unload(), config)
        timer = make_step_timer()
        slice_config = config.replace(num_train_epochs=1.0, run_dir=str(Path(run) / f"slice_workers_{workers}"),
                                      logging_steps=1, vram_budget_gb=None)
        import medcap_helpers.train as train_module

        original = train_module.dataloader_workers
        if workers == 0:
            train_module.dataloader_workers = lambda device: 0
        try:
            torch.cuda.reset_peak_memory_stats()
            result = train(slice_config, peft, processor, {"train": rows, "validation": dd["validation"].select(range(2))},
                           callbacks_extra=[timer], max_generation_examples=2)
        finally:
            train_module.dataloader_workers = original
        curves[workers] = [e["loss"] for e in result.log_history if "loss" in e]
        step_s = statistics.median(timer.times[3:] or timer.times)
        out[f"training workers={'auto' if workers is None else 0}"] = {
            "samples_per_s": config.effective_batch_size / step_s, **memory(), "losses": curves[workers][:40]}
        print(workers, out[f"training workers={'auto' if workers is None else 0}"], flush=True)
        peft_model = peft
    out["loss_curves_identical"] = curves[0] == curves[None]
    out["largest_loss_difference"] = max(abs(a - b) for a, b in zip(curves[0], curves[None]))
    return out


def rehearsal_peft_model(run: str, data_dir: str) -> tuple[Any, Any, Any, Any]:
    """(config, dataset, LoRA model, processor) on the rehearsal, the dataset built in ``run`` when missing;
    LoRA B is drawn at random (a trained-looking adapter, so that the merge in the decoder copy matters)."""
    import torch

    from medcap_helpers import data, model

    config = config_for(run, data_dir)
    if not Path(run, "dataset").exists():
        built, report = data.build_dataset(config, progress=False)
        data.save_dataset(built, report, run)
    dd, _ = data.load_saved_dataset(run)
    base, processor = model.load_model_and_processor(config, dd)
    peft_model = model.attach_lora(base, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02, generator=torch.Generator(param.device).manual_seed(0))
    return config, dd, peft_model, processor


def generation_only(peft_model: Any, processor: Any, config: Any, dd: Any, n: int) -> dict[str, Any]:
    """Reports/s and peak memory at the budget's generation batch (after a warm-up batch)."""
    import torch

    from medcap_helpers.generation import generate_reports, generation_batch_size, study_inputs

    sample = study_inputs(dd["validation"].select(range(n)))
    size = generation_batch_size(peft_model, config)
    settings = dict(batch_size=size, max_new_tokens=config.max_new_tokens, min_new_tokens=config.min_new_tokens,
                    num_beams=config.num_beams, progress=False)
    generate_reports(peft_model, processor, [sample[i] for i in range(min(size, 8))], **settings)
    torch.cuda.reset_peak_memory_stats()
    _, seconds = timed(lambda: generate_reports(peft_model, processor, sample, **settings))
    result = {"batch": size, "reports_per_s": n / seconds, **memory()}
    print(result, flush=True)
    return result


def check_rates(data_dir: str, run: str, n: int) -> dict[str, Any]:
    """What the "after" projection needs, through the pipeline's own functions under the 4 GB cap:
    the budget fit and its training rate, generation at the budget's batch, the profiler's view of one
    generation batch, and how far the 16-bit decoder copy's logits are from the 4-bit path's."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from medcap_helpers import budget, model
    from medcap_helpers.generation import decoder_for_generation, generate_reports, generation_batch_size, study_inputs
    from medcap_helpers.model import unwrap_model
    from medcap_helpers.multiview import view_tokens
    from medcap_helpers.processing import CaptionCollator, pixel_batch
    from medcap_helpers.train import train
    from run_benchmarks import make_step_timer

    config, dd, peft_model, processor = rehearsal_peft_model(run, data_dir)
    out: dict[str, Any] = {}
    with torch.no_grad():
        rows = [dd["validation"][i] for i in range(16)]
        batch = CaptionCollator(processor, config.max_target_tokens)(rows)
        batch = {k: v.to("cuda") for k, v in batch.items()}
        peft_model.eval()
        memory_tokens = view_tokens(unwrap_model(peft_model), batch["pixel_values"])
        decoder = unwrap_model(peft_model).text_decoder
        reference = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            encoder_hidden_states=memory_tokens).logits.float()
        copy = decoder_for_generation(peft_model)
        copied = copy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      encoder_hidden_states=memory_tokens.to(copy.dtype)).logits.float()
        keep = batch["attention_mask"].bool()
        top2 = reference.topk(2, dim=-1).values
        clear = keep & ((top2[..., 0] - top2[..., 1]) > 0.1)
        same = reference.argmax(-1) == copied.argmax(-1)
        out["decoder_copy_logits"] = {
            "max_abs_difference": float((reference - copied).abs()[keep].max()),
            "mean_abs_difference": float((reference - copied).abs()[keep].mean()),
            "logit_std": float(reference[keep].std()),
            "top1_agreement": float(same[keep].float().mean()),
            "top1_agreement_where_margin_over_0.1": float(same[clear].float().mean()) if clear.any() else None,
            "positions": int(keep.sum()), "positions_with_margin_over_0.1": int(clear.sum())}
        print(out["decoder_copy_logits"], flush=True)
        del copy, reference, copied, memory_tokens, batch, top2, clear, same, keep
    from medcap_helpers.devices import release_memory

    release_memory()  # the fit below must see only what the pipeline's stage 03 holds
    if os.environ.get("MEDCAP_SKIP_TRAINING"):  # generation only (the training figures are measured already)
        return {**out, "generation": generation_only(peft_model, processor, config, dd, n)}
    peft_model.train()
    fitted, fit = budget.fit_config_to_budget(config, peft_model, processor, dd["train"])
    out["budget_fit"] = fit.to_dict() if fit else None
    train_rows = dd["train"].select(range(min(30 * fitted.effective_batch_size, len(dd["train"]))))
    timer = make_step_timer()
    torch.cuda.reset_peak_memory_stats()
    model.enable_gradient_checkpointing(peft_model) if fitted.gradient_checkpointing else \
        unwrap_model(peft_model).gradient_checkpointing_disable()
    train(fitted.replace(num_train_epochs=1.0, run_dir=str(Path(run) / "fitted_slice")), peft_model, processor,
          {"train": train_rows, "validation": dd["validation"].select(range(2))}, callbacks_extra=[timer],
          max_generation_examples=2)
    step_s = statistics.median(timer.times[3:] or timer.times)
    out["training_fitted"] = {"samples_per_s": fitted.effective_batch_size / step_s, **memory(),
                              "settings": fitted.describe() if hasattr(fitted, "describe") else
                              (fitted.per_device_train_batch_size, fitted.gradient_accumulation_steps,
                               fitted.gradient_checkpointing)}
    print(out["training_fitted"], flush=True)
    sample = study_inputs(dd["validation"].select(range(n)))
    size = generation_batch_size(peft_model, config)
    generate_reports(peft_model, processor, [sample[i] for i in range(size)], batch_size=size,
                     max_new_tokens=config.max_new_tokens, min_new_tokens=config.min_new_tokens,
                     num_beams=config.num_beams, progress=False)
    torch.cuda.reset_peak_memory_stats()
    _, seconds = timed(lambda: generate_reports(peft_model, processor, sample, batch_size=size,
                                                max_new_tokens=config.max_new_tokens,
                                                min_new_tokens=config.min_new_tokens, num_beams=config.num_beams,
                                                progress=False))
    out["generation"] = {"batch": size, "reports_per_s": n / seconds, **memory()}
    print(out["generation"], flush=True)
    if os.environ.get("MEDCAP_SKIP_PROFILE"):
        return out
    pixels = pixel_batch(processor, [sample[i] for i in range(size)]).to("cuda")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _, seconds = timed(lambda: generate_reports(peft_model, processor, [sample[i] for i in range(size)],
                                                    batch_size=size, max_new_tokens=20, min_new_tokens=20,
                                                    num_beams=config.num_beams, progress=False))
    del pixels
    out["profile_20_steps_s"] = seconds
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=50)
    out["profile_by_cpu"] = table
    out["profile_by_cuda"] = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12,
                                                       max_name_column_width=50)
    print(table, flush=True)
    print(out["profile_by_cuda"], flush=True)
    return out


# ----------------------------------------------------------------------------------------- driver
def run_stage(name: str, payload: dict[str, Any], timeout: int = 900) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--stage", name, "--payload", json.dumps(payload)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        return {"error": f"stage failed (rc {done.returncode}): {done.stderr[-2000:]}"}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/rehearsal")
    parser.add_argument("--run", default=str(Path(tempfile.gettempdir()) / "medcap_rehearsal_today"))
    parser.add_argument("--generate", type=int, default=48, help="studies timed per generation rate")
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps timed in training")
    parser.add_argument("--stage")
    parser.add_argument("--payload", default="{}")
    parser.add_argument("--after", metavar="STAGES", help="run these pipeline stages and record them as 'after'")
    parser.add_argument("--check", action="store_true", help="the levers against today's path on one slice")
    parser.add_argument("--rates", action="store_true", help="budget fit, rates and a profile of generation")
    parser.add_argument("--project", action="store_true", help="write the projected 'after' figures from --rates")
    parser.add_argument("--pack-state", metavar="ARCHIVE", help="pack --run's results for another machine")
    parser.add_argument("--unpack-state", metavar="ARCHIVE", help="unpack them as --run")
    parser.add_argument("--force", action="store_true", help="with --after: rerun (and time) finished stages too")
    parser.add_argument("--artefacts", metavar="DIR", default=os.environ.get("OUT"),
                        help="with --after: copy each stage's executed notebook, output and the results file here "
                             "as it ends (default: $OUT, the folder a GPU call brings back)")
    parser.add_argument("--warm-cache", action="store_true",
                        help="then fill --run's vision cache for every split (untimed set-up on a fresh machine)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.project:
        from medcap_helpers.runs import read_json, write_json

        results = read_json(RESULTS / "full_profile.json")
        results["after_projected"] = project_after(results)
        write_json(RESULTS / "full_profile.json", results)
        print(json.dumps(results["after_projected"], indent=1))
        return
    after_run = str(Path(args.run).with_name("medcap_rehearsal_after")) if "today" in args.run else args.run
    if args.pack_state:
        print(f"packed {after_run} into {args.pack_state}: {pack_run_state(after_run, args.pack_state) / 1e6:.1f} MB")
        return
    if args.unpack_state:
        unpack_run_state(args.unpack_state, after_run)
        print(f"unpacked {args.unpack_state} as {after_run}")
        return
    if args.after or args.warm_cache:
        if args.after:
            run_after(args.after, after_run, args.data, force=args.force, artefacts=args.artefacts)
        if args.warm_cache:  # after the stages: it reads 01's dataset
            print(f"warmed the vision cache of {after_run}: {json.dumps(warm_vision_cache(after_run))}", flush=True)
        return
    if args.check or args.rates:
        from medcap_helpers.runs import read_json, write_json

        checked = (check_levers if args.check else check_rates)(args.data, args.run, args.generate)
        results = read_json(RESULTS / "full_profile.json")
        results["check" if args.check else "rates"] = checked
        write_json(RESULTS / "full_profile.json", results)
        return
    if args.stage:
        p = json.loads(args.payload)
        stages = {"data": lambda: stage_data(p["run"], p["data"]),
                  "baselines": lambda: stage_baselines(p["run"], p["data"], p["n"]),
                  "train": lambda: stage_train(p["run"], p["data"], p["steps"], p["n"]),
                  "merge": lambda: stage_merge(p["run"], p["data"], p["n"])}
        print("RESULT " + json.dumps(stages[args.stage](), default=str), flush=True)
        return
    payload = {"run": args.run, "data": args.data, "n": args.generate, "steps": args.steps}
    results: dict[str, Any] = {}
    for stage in ("data", "baselines", "train", "merge"):
        results[stage] = run_stage(stage, payload)
        print(stage, json.dumps(results[stage], default=str)[:600], flush=True)
        write(results)  # after each stage: a cut-off run keeps what it measured


def write(results: dict[str, Any]) -> None:
    import torch

    from medcap_helpers.runs import environment_info, read_json, write_json

    train, merge = results.get("train", {}), results.get("merge", {})
    stages = {"01_data": results.get("data", {}), "02_baseline": results.get("baselines", {}),
              "03_qlora_train": train,
              "04_sweep": {"seconds": train.get("sweep_seconds"), "how": train.get("sweep_how")},
              "05_merge_requant": merge,
              "06_eval_and_demo": {"seconds": merge.get("test_seconds"), "how": merge.get("test_how")}}
    total = sum(s.get("seconds") or 0.0 for s in stages.values())
    env = environment_info()
    env["gpu"] = torch.cuda.get_device_name(0)
    path = RESULTS / "full_profile.json"
    previous = read_json(path) if path.exists() else {}  # keeps the "after" and "check" parts
    write_json(path, {
        **previous, "part": "full_profile", "environment": env, "cap_gb": CAP_GB,
        "profile": "rehearsal (= full with random BLIP-large, placeholder images, 75-token reports)",
        "today": {"stages": stages, "total_seconds": total}})
    print(f"today: {total / 3600:.1f} h in all -> {RESULTS / 'full_profile.json'}")


if __name__ == "__main__":
    main()
