"""One GPU against two: stage 03's data-parallel training and stage 04's sweep, on the rehearsal.

    python -m medcap_helpers.rehearsal data/rehearsal       # set-up: the rehearsal data (not timed)
    python benchmarks/multi_gpu.py --part training          # 1 GPU vs 2 at the same effective batch
    python benchmarks/multi_gpu.py --part sweep             # the successive-halving sweep, 1 GPU vs 2

Both parts go through the library functions the notebooks call: ``distributed.train_data_parallel``
(03) and ``sweep.run_sweep`` with ``sweep.trial_runner`` (04), each configuration in a fresh process,
every process capped at 4 GB (the rehearsal profile's ``vram_budget_gb``).

* training: the rehearsal profile's training set, ``--epochs`` epochs, an effective batch of 32 on one GPU
  and on two (16 per GPU; ``--effective-batch 16`` is the full profile's own), micro-batch and checkpointing fitted to the 4 GB budget as 03 fits them
  (``budget.fit_config_to_budget``). Throughput is samples / the epochs' training time (each epoch's start
  to its last optimizer step: validation and checkpoints excluded), from the Trainer's own log; the loss
  curve and the validation loss come from the same log.
* sweep: the whole grid (12 settings) by successive halving at ``--budget-share`` of a training run,
  scored on 64 validation studies, at the batch the training part fitted for 16 studies per GPU: wall time of ``run_sweep`` (model loads and process starts included),
  and whether both choose the same setting.

Results go to ``benchmarks/results/multi_gpu.json`` (an entry per part and GPU count, so a part can be
measured in two calls: ``--gpus 1`` then ``--gpus 2``) and, when ``$OUT`` is set, a copy there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results" / "multi_gpu.json"
EFFECTIVE_BATCH = 32


PROFILE = os.environ.get("MEDCAP_BENCHMARK_PROFILE", "rehearsal")
"""``smoke`` runs the script's plumbing on the CPU in a minute (one process: ``--gpus 1``), nothing measured."""


def config_for(run_dir: str | Path, data_dir: str, **changes: Any) -> Any:
    from full_profile import config_for as rehearsal_config

    from medcap_helpers.config import MedcapConfig

    if PROFILE == "smoke":
        smoke = {k: v for k, v in changes.items() if k not in ("max_eval_examples", "per_device_train_batch_size",
                                                               "gradient_accumulation_steps")}
        return MedcapConfig.from_profile("smoke", run_dir=str(run_dir), **{**smoke, "num_gpus": None})
    return rehearsal_config(str(run_dir), data_dir).replace(**changes)


def prepare(base: Path, data_dir: str) -> float:
    """Stage 01's dataset and the random BLIP-large, once, in ``base`` (reused when there)."""
    from medcap_helpers import data
    from medcap_helpers.model import load_model_and_processor
    from medcap_helpers.processing import local_model_dir

    config = config_for(base, data_dir)
    if not (local_model_dir(config) / "model.safetensors").exists():
        dd, report = data.build_dataset(config, progress=False)
        data.save_dataset(dd, report, base)
        load_model_and_processor(config, dd)
    return float(len(data.load_saved_dataset(base)[0]["train"]))


def fresh_run(base: Path, name: str) -> Path:
    """A copy of ``base``'s dataset with its model folder linked (nothing trained yet)."""
    run = base.parent / name
    shutil.rmtree(run, ignore_errors=True)
    model_folder = next(p.name for p in base.iterdir() if p.name in ("random_blip_large", "tiny_model"))
    shutil.copytree(base, run, symlinks=True, ignore=shutil.ignore_patterns(model_folder, ".lock*"))
    (run / model_folder).symlink_to((base / model_folder).resolve())
    return run


def train_once(run: Path, data_dir: str, gpus: int, epochs: float, n_val: int,
               micro_batch: int | None = None, settings: dict[str, Any] | None = None,
               train_rows: int | None = None, effective_batch: int = EFFECTIVE_BATCH) -> dict[str, Any]:
    """03's training on ``gpus`` GPUs (in this process when 1): throughput, loss curve, validation loss."""
    from medcap_helpers import budget, distributed
    from medcap_helpers.data import load_saved_dataset
    from medcap_helpers.model import attach_lora, load_model_and_processor

    config = config_for(run, data_dir, num_gpus=gpus, num_train_epochs=epochs, max_eval_examples=n_val,
                        per_device_train_batch_size=effective_batch // gpus, gradient_accumulation_steps=1,
                        **(settings or {}))
    if config.cache_vision_embeddings and not config.vision_cache_dir:  # computed once for every measurement
        config = config.replace(vision_cache_dir=str(run.parent / "vision_cache"))
    dataset, _ = load_saved_dataset(run)
    if train_rows:
        dataset["train"] = dataset["train"].select(range(min(train_rows, len(dataset["train"]))))
    dataset["validation"] = dataset["validation"].select(range(min(n_val, len(dataset["validation"]))))
    start = time.perf_counter()
    base, processor = load_model_and_processor(config, dataset)
    peft_model = attach_lora(base, config)
    cache_fill = fill_vision_cache(config, peft_model, processor, dataset)
    if micro_batch is None:
        config, fit = budget.fit_config_to_budget(config, peft_model, processor, dataset["train"])  # as 03 does
    else:  # a fixed setting, under the same 4 GB cap
        if config.vram_budget_gb is not None:
            budget.cap_gpu_memory(config.vram_budget_gb, "cuda")
        config, fit = config.replace(per_device_train_batch_size=micro_batch, gradient_checkpointing=True,
                                     gradient_accumulation_steps=effective_batch // gpus // micro_batch), None
    result = distributed.train_data_parallel(config, peft_model, processor, dataset)
    wall = time.perf_counter() - start
    evaluation_s = sum(e.get("eval_runtime", 0.0) for e in result.log_history if "eval_runtime" in e)
    samples = len(dataset["train"]) * epochs
    timed_epochs = [e for e in result.history if e.get("train_seconds")]
    training_s = sum(e["train_seconds"] for e in timed_epochs)  # epochs' steps only
    first_step_samples = config.per_device_train_batch_size * config.gradient_accumulation_steps * gpus
    return {
        "gpus": gpus, "cache_vision_embeddings": config.cache_vision_embeddings,
        "sdpa_attention": config.sdpa_attention, "micro_batch": config.per_device_train_batch_size,
        "accumulation": config.gradient_accumulation_steps, "checkpointing": config.gradient_checkpointing,
        "budget_fit": fit.to_dict() if fit else None, "samples": samples,
        "effective_batch": config.per_device_train_batch_size * config.gradient_accumulation_steps * gpus,
        "train_runtime_s": result.train_runtime_s, "validation_s": evaluation_s, "epochs_training_s": training_s,
        "samples_per_s": samples / training_s, "wall_s": wall,
        "epoch_samples_per_s": [len(dataset["train"]) / e["train_seconds"] for e in timed_epochs],
        # each epoch after its first optimizer step, which carries the start-up (workers, first batches)
        "first_step_s": [e["first_step_seconds"] for e in timed_epochs],
        "steady_samples_per_s": [(len(dataset["train"]) - first_step_samples) / (e["train_seconds"] - e["first_step_seconds"])
                                 for e in timed_epochs],
        "steps": result.global_step,
        "loss_curve": [[e["step"], e["loss"]] for e in result.log_history if "loss" in e and "step" in e],
        "eval_loss": [e.get("eval_loss") for e in result.history],
        "peak_memory": result.peak_memory, "vision_cache_fill": cache_fill}


def fill_vision_cache(config: Any, peft_model: Any, processor: Any, dataset: Any) -> dict[str, float] | None:
    """Fill the vision cache for the training and validation studies, timed, under the budget's cap (as
    stage 02/03 fill it); None when the cache is off or was already full."""
    import torch

    from medcap_helpers import budget, vision_cache

    cache = vision_cache.cache_for(config, peft_model, processor)
    if cache is None:
        return None
    if config.vram_budget_gb is not None and torch.cuda.is_available():
        budget.cap_gpu_memory(config.vram_budget_gb, "cuda")
    started = time.perf_counter()
    images = vision_cache.fill_cache(cache, peft_model, processor, [dataset["train"], dataset["validation"]])
    seconds = time.perf_counter() - started
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds} if images else None


def sweep_once(run: Path, data_dir: str, gpus: int, budget_share: float,
               settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """04's sweep on ``gpus`` GPUs: wall time of ``run_sweep`` and what it chose."""
    from medcap_helpers import sweep
    from medcap_helpers.data import load_saved_dataset

    from medcap_helpers import runs

    config = config_for(run, data_dir, num_gpus=gpus, sweep_budget_share=budget_share, **(settings or {}))
    from full_profile import profile_rate

    fitted = profile_rate(read_results().get("training", {}), config)  # 03's setting: what the trials take over
    if PROFILE == "rehearsal" and not fitted:
        raise SystemExit("Run --part training first (with this cache setting): the sweep's trials train at the "
                         "per-GPU batch it fitted for the profile's batch of 16.")
    if fitted:  # what stage 03 records and the trials take over (sweep.fitted_training_settings)
        settings = {"per_device_train_batch_size": fitted["micro_batch"],
                    "gradient_accumulation_steps": fitted["accumulation"],
                    "gradient_checkpointing": fitted["checkpointing"]}
        runs.write_stage_metrics(run, "03_qlora_train", {"budget_fit": fitted["budget_fit"] or {"fixed": "--micro-batch"},
                                                         "training_settings": settings})
    dataset, _ = load_saved_dataset(run)
    n_train = len(dataset["train"])
    start = time.perf_counter()
    result = sweep.run_sweep(config, sweep.trial_runner(dataset), n_train=n_train)
    wall = time.perf_counter() - start
    return {"gpus": gpus, "wall_s": wall, "schedule": sweep.schedule_markdown(config, n_train),
            "trials": [{k: t.get(k) for k in ("rung", "lora_r", "lora_alpha", "train_examples", "val_cider",
                                              "wall_time_s", "peak_gpu_gb", "process_id")} for t in result.trials],
            "chosen": None if result.chosen is None else [result.chosen["lora_r"], result.chosen["lora_alpha"]]}


def in_fresh_process(kind: str, run: Path, data_dir: str, gpus: int, values: dict[str, Any]) -> dict[str, Any]:
    """Measure in a fresh process; its whole output goes to ``<run>.log`` (and ``$OUT``), kept on a timeout."""
    payload = json.dumps({"kind": kind, "run": str(run), "data": data_dir, "gpus": gpus, **values})
    log_path = Path(os.environ["OUT"]) / f"{run.name}.log" if os.environ.get("OUT") else run.with_suffix(".log")
    with open(log_path, "w") as log:
        returncode = subprocess.run([sys.executable, __file__, "--once", payload], stdout=log,
                                    stderr=subprocess.STDOUT, text=True).returncode
    output = log_path.read_text(errors="replace")
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    if returncode != 0 or not lines:
        raise SystemExit(f"{kind} on {gpus} GPU(s) failed (rc {returncode}); log {log_path}:\n{output[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def compare_training(one: dict[str, Any], two: dict[str, Any]) -> dict[str, Any]:
    pairs = list(zip((loss for _, loss in one["loss_curve"]), (loss for _, loss in two["loss_curve"])))
    steady = [b / a for a, b in zip(one.get("steady_samples_per_s", []), two.get("steady_samples_per_s", []))]
    return {"throughput_ratio": two["samples_per_s"] / one["samples_per_s"],
            "steady_throughput_ratio_by_epoch": steady,  # without each epoch's first optimizer step
            "final_eval_loss_difference": abs(two["eval_loss"][-1] - one["eval_loss"][-1]) / one["eval_loss"][-1],
            "largest_logged_loss_difference": max((abs(a - b) for a, b in pairs), default=None),
            "goals": {"throughput_ratio": ">= 1.85", "final_eval_loss_difference": "<= 0.02"}}


def read_results() -> dict[str, Any]:
    from medcap_helpers.runs import read_json

    return read_json(RESULTS) if RESULTS.exists() else {"part": "multi_gpu"}


def record(part: str, values: dict[str, Any]) -> None:
    """``values`` as the results' ``part`` (entries measured by an earlier call are kept)."""
    import torch

    from medcap_helpers.runs import environment_info, write_json

    results = read_results()
    environment = environment_info()
    environment["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if PROFILE != "rehearsal":
        print(f"profile {PROFILE}: nothing recorded", flush=True)
        return
    results[part] = {**values, "environment": environment}
    write_json(RESULTS, results)
    if os.environ.get("OUT"):
        shutil.copy(RESULTS, Path(os.environ["OUT"]) / RESULTS.name)
    print(json.dumps(results[part], indent=1)[:6000], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("training", "sweep"))
    parser.add_argument("--data", default="data/rehearsal")
    parser.add_argument("--runs", default="runs/multi_gpu", help="folder of the benchmark's run folders")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--validation", type=int, default=96, help="validation studies per epoch (training)")
    parser.add_argument("--micro-batch", type=int, help="train at this micro-batch with checkpointing instead of "
                        "the budget fit's choice (training)")
    parser.add_argument("--effective-batch", type=int, default=EFFECTIVE_BATCH,
                        help="studies per optimizer step over all GPUs (training); the full profile's is 16")
    parser.add_argument("--train-rows", type=int, help="train on the first N training studies only (training), "
                        "e.g. with --set profile_dir=DIR to profile a few steps")
    parser.add_argument("--budget-share", type=float, default=0.3, help="the sweep's sweep_budget_share")
    parser.add_argument("--gpus", default="1,2", help="the GPU counts to measure (one call each may be split)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config setting for this measurement, e.g. cache_vision_embeddings=True")
    parser.add_argument("--label", default="", help="recorded as '<gpus>_gpu_<label>' (a variant beside the plain one)")
    parser.add_argument("--once", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.once:
        spec = json.loads(args.once)
        run, data_dir, gpus = Path(spec["run"]), spec["data"], spec["gpus"]
        value = (train_once(run, data_dir, gpus, spec["epochs"], spec["validation"], spec.get("micro_batch"),
                            spec.get("settings"), spec.get("train_rows"), spec.get("effective_batch", EFFECTIVE_BATCH))
                 if spec["kind"] == "training"
                 else sweep_once(run, data_dir, gpus, spec["budget_share"], spec.get("settings")))
        if spec.get("name"):  # kept even if the calling script is stopped before it records (a call's time limit)
            value = json.loads(json.dumps(value, default=str))
            entry = {**value, "settings": spec.get("settings") or {}, "command": spec.get("command")}
            record(spec["kind"], {**read_results().get(spec["kind"], {}), spec["name"]: entry})
        print("RESULT " + json.dumps(value, default=str), flush=True)
        return
    if not args.part:
        parser.error("--part training or --part sweep")
    if args.train_rows and args.gpus != "1":
        parser.error("--train-rows needs --gpus 1: data-parallel processes read the run's whole saved dataset")
    base = Path(args.runs) / "prepared"
    start = time.perf_counter()
    prepare(base, args.data)
    print(f"prepared {base} in {time.perf_counter() - start:.0f} s", flush=True)
    measured = read_results().get(args.part, {})
    from medcap_helpers.cli import parse_assignment

    settings = dict(parse_assignment(text) for text in args.set)
    suffix = f"_{args.label}" if args.label else ""
    for gpus in (int(g) for g in args.gpus.split(",")):
        name = f"{gpus}_gpu{suffix}"
        run = fresh_run(base, f"{args.part}-{gpus}gpu{suffix}")
        command = " ".join(["python"] + sys.argv)
        values = ({"epochs": args.epochs, "validation": args.validation, "micro_batch": args.micro_batch,
                   "settings": settings, "train_rows": args.train_rows, "effective_batch": args.effective_batch}
                  if args.part == "training"
                  else {"budget_share": args.budget_share, "settings": settings})
        values.update(name=name, command=command)
        measured[name] = {**in_fresh_process(args.part, run, args.data, gpus, values), "settings": settings,
                          "command": command}
        print(f"{args.part} on {gpus} GPU(s): {json.dumps(measured[name])[:800]}", flush=True)
        one, two = measured.get(f"1_gpu{suffix}"), measured.get(f"2_gpu{suffix}")
        if one and two and args.part == "training":
            measured[f"comparison{suffix}"] = compare_training(one, two)
        elif one and two:
            measured[f"comparison{suffix}"] = {"wall_time_ratio": two["wall_s"] / one["wall_s"],
                                      "same_choice": one["chosen"] == two["chosen"],
                                      "goals": {"wall_time_ratio": "<= 0.55"}}
        record(args.part, measured)  # after each count: a later one that runs out of time loses only itself

if __name__ == "__main__":
    main()
