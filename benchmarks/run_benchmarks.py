"""Memory, speed and size of BLIP-large (random weights, real architecture) through medcap's own code.

    python benchmarks/run_benchmarks.py                      # everything (CUDA required, no download)
    python benchmarks/run_benchmarks.py --only training      # or inference, disk, cap4gb, views
    python benchmarks/make_table.py                          # README table from benchmarks/results/*.json

Every measurement runs in a fresh subprocess, so peaks and the CUDA context are measured cleanly.
Training goes through ``model.load_base_model`` → ``model.attach_lora`` → ``train.train`` (the HF
Trainer the notebooks use), timing optimizer steps with a Trainer callback; samples/s is the median
after warm-up. Results: ``benchmarks/results/<part>.json`` with GPU name, package versions and commit.
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
RESULTS = ROOT / "benchmarks" / "results"
GB = 1e9
WARMUP_STEPS, MEASURED_STEPS = 3, 8

TRAINING_CONFIGS: dict[str, dict[str, Any]] = {
    "seed settings (QLoRA, batch 1 × 4, checkpointing)": {},
    "QLoRA without checkpointing": {"gradient_checkpointing": False},
    "QLoRA batch 4, checkpointing": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1},
    "QLoRA batch 8, checkpointing": {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1},
    "QLoRA batch 16, checkpointing": {"per_device_train_batch_size": 16, "gradient_accumulation_steps": 1},
    "QLoRA + vision-tower LoRA": {"lora_vision": True},
    "QLoRA, paged 8-bit AdamW": {"optim": "paged_adamw_8bit"},
    "QLoRA, 256 tokens": {"max_target_tokens": 256},
    "LoRA on 16-bit base": {"load_in_4bit": False},
    "full fine-tuning, mixed precision": {"load_in_4bit": False, "full_finetune": True},
}
CAP_CANDIDATES: dict[str, dict[str, Any]] = {
    "batch 16, no checkpointing": {"per_device_train_batch_size": 16, "gradient_accumulation_steps": 1,
                                   "gradient_checkpointing": False},
    "batch 8, no checkpointing": {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 2,
                                  "gradient_checkpointing": False},
    "batch 16, checkpointing": {"per_device_train_batch_size": 16, "gradient_accumulation_steps": 1},
}


# ----------------------------------------------------------------------------------- shared set-up
def prepare_model_folder(folder: Path) -> None:
    """A random-weight BLIP-large (fp32 safetensors) and an offline processor at 384 px, saved once."""
    import torch

    from medcap_helpers.sources import bundled_report_texts
    from medcap_helpers.model import blip_large_config
    from medcap_helpers.processing import build_offline_processor
    from transformers import BlipForConditionalGeneration

    if (folder / "model.safetensors").exists():
        return
    processor = build_offline_processor(bundled_report_texts(), image_size=384)
    tok = processor.tokenizer
    blip_config = blip_large_config()
    # The real tokenizer can't be downloaded here: point the model's special ids at the offline one
    # (same vocabulary size, same memory and compute).
    for name, value in (("bos_token_id", tok.bos_token_id), ("pad_token_id", tok.pad_token_id),
                        ("sep_token_id", tok.sep_token_id), ("eos_token_id", tok.sep_token_id)):
        setattr(blip_config.text_config, name, value)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(blip_config)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)


def medcap_config(folder: Path, run_dir: Path, **overrides: Any) -> Any:
    from medcap_helpers.config import MedcapConfig

    values = dict(model_name=str(folder), run_dir=str(run_dir), device="cuda", data_source="smoke",
                  num_train_epochs=1.0, max_new_tokens=8, num_beams=1, eval_batch_size=1, logging_steps=1000,
                  bootstrap_samples=10)
    values.update(overrides)
    return MedcapConfig.from_profile("full", **values)


def synthetic_rows(n: int, tokens: int, size: int = 384, two_views: bool = False) -> list[dict[str, Any]]:
    """``n`` rows with noise images (two per row when ``two_views``) and real report text long enough to
    fill ``tokens`` tokens."""
    import numpy as np
    from PIL import Image

    from medcap_helpers.sources import bundled_report_texts

    texts = bundled_report_texts()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        words: list[str] = []
        j = i
        while len(words) < tokens:  # words ≥ tokens/1.2 is plenty: truncation cuts at `tokens`
            words += texts[j % len(texts)].split()
            j += 7
        image = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
        second = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) if two_views else None
        rows.append({"image": image, "image_2": second, "text": " ".join(words), "study_id": str(i),
                     "image_id": str(i)})
    return rows


def gpu_process_memory_gb() -> float | None:
    from medcap_helpers.devices import process_gpu_gb

    return process_gpu_gb()


def make_step_timer() -> Any:
    """A Trainer callback that times every optimizer step (CUDA-synchronised) and records memory peaks."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.process_gb: list[float] = []
            self.peaks: dict[str, float] = {}

        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001, ANN201
            torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ANN201
            torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)
            self.process_gb.append(gpu_process_memory_gb() or 0.0)
            self.peaks = {"max_allocated_gb": torch.cuda.max_memory_allocated() / GB,
                          "max_reserved_gb": torch.cuda.max_memory_reserved() / GB}

    return StepTimer()


# ----------------------------------------------------------------------------------- workers
def worker_train(folder: Path, settings: dict[str, Any], cap_gb: float | None) -> dict[str, Any]:
    import torch

    from medcap_helpers.model import attach_lora, load_base_model, trainable_parameters
    from medcap_helpers.processing import load_processor
    from medcap_helpers.train import train

    torch.cuda.init()
    torch.empty(1, device="cuda")
    context_gb = gpu_process_memory_gb()
    if cap_gb is not None:
        total = torch.cuda.get_device_properties(0).total_memory / GB
        torch.cuda.set_per_process_memory_fraction((cap_gb - (context_gb or 0.0)) / total)
    settings = dict(settings)
    full_finetune = settings.pop("full_finetune", False)
    run_dir = Path(tempfile.mkdtemp(prefix="bench_run_"))
    config = medcap_config(folder, run_dir, **settings)
    processor = load_processor(config)
    model = load_base_model(config)
    if full_finetune:
        model = model.float()  # fp32 master weights; the Trainer's autocast gives mixed precision
        if config.gradient_checkpointing:
            from medcap_helpers.model import enable_gradient_checkpointing

            enable_gradient_checkpointing(model)
    else:
        model = attach_lora(model, config)
    trainable, total_params, share = trainable_parameters(model)
    steps = WARMUP_STEPS + MEASURED_STEPS
    rows = synthetic_rows(steps * config.effective_batch_size, config.max_target_tokens,
                          two_views=config.views == "both")

    timer = make_step_timer()
    torch.cuda.reset_peak_memory_stats()
    error = None
    try:
        train(config, model, processor, {"train": rows, "validation": rows[:1]}, callbacks_extra=[timer],
              lora=not full_finetune, save_total_limit=1)
    except torch.cuda.OutOfMemoryError as err:
        error = f"out of memory: {str(err).splitlines()[0]}"
    measured = timer.times[WARMUP_STEPS:]
    step_s = statistics.median(measured) if measured else None
    return {"settings": settings | ({"full_finetune": True} if full_finetune else {}),
            "cap_gb": cap_gb, "error": error, "trainable_params": trainable, "total_params": total_params,
            "trainable_share": share, "effective_batch": config.effective_batch_size,
            "tokens": config.max_target_tokens, "compute_dtype": str(config.compute_dtype),
            "steps_timed": len(measured), "step_s_median": step_s,
            "samples_per_s": config.effective_batch_size / step_s if step_s else None,
            **timer.peaks, "process_gpu_gb_max": max(timer.process_gb) if timer.process_gb else None,
            "cuda_context_gb": context_gb}


def worker_inference(folder: Path, quantize: bool, dtype_name: str) -> dict[str, Any]:
    import torch

    from medcap_helpers.model import load_base_model
    from medcap_helpers.processing import load_processor

    torch.cuda.init()
    torch.empty(1, device="cuda")
    context_gb = gpu_process_memory_gb()
    config = medcap_config(folder, Path(tempfile.mkdtemp()), load_in_4bit=quantize, compute_dtype=dtype_name)
    processor = load_processor(config)
    torch.cuda.reset_peak_memory_stats()
    model = load_base_model(config).eval()
    load = {"allocated_gb": torch.cuda.memory_allocated() / GB, "process_gpu_gb": gpu_process_memory_gb()}
    dtype = model.vision_model.embeddings.patch_embedding.weight.dtype
    images = [r["image"] for r in synthetic_rows(16, 4)]

    def generate(batch: list[Any], beams: int) -> float:
        pixels = processor.image_processor(images=batch, return_tensors="pt")["pixel_values"].to("cuda", dtype)
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(pixel_values=pixels, max_new_tokens=100, min_new_tokens=100, num_beams=beams,
                                 do_sample=False)
        torch.cuda.synchronize()
        assert out.shape[-1] >= 100
        return time.perf_counter() - start

    result: dict[str, Any] = {"quantized_nf4": quantize, "compute_dtype": dtype_name, "load": load,
                              "cuda_context_gb": context_gb}
    for beams in (1, 3):
        generate(images[:1], beams)  # warm-up
        torch.cuda.reset_peak_memory_stats()
        latencies = [generate(images[i:i + 1], beams) for i in range(5)]
        result[f"single_beam{beams}"] = {"latency_s_median": statistics.median(latencies),
                                         "peak_allocated_gb": torch.cuda.max_memory_allocated() / GB,
                                         "peak_reserved_gb": torch.cuda.max_memory_reserved() / GB,
                                         "process_gpu_gb": gpu_process_memory_gb()}
    generate(images, 1)
    torch.cuda.reset_peak_memory_stats()
    times = [generate(images, 1) for _ in range(3)]
    result["batch16_greedy"] = {"reports_per_s": 16 / statistics.median(times),
                                "peak_allocated_gb": torch.cuda.max_memory_allocated() / GB}
    return result


def worker_disk(folder: Path) -> dict[str, Any]:
    import torch

    from medcap_helpers.checkpoints import checkpoint_size
    from medcap_helpers.model import load_base_model, load_plain_model

    sizes = {"fp32": checkpoint_size(folder)}
    out = Path(tempfile.mkdtemp())
    load_plain_model(str(folder), torch.float16).save_pretrained(out / "fp16", safe_serialization=True)
    sizes["fp16"] = checkpoint_size(out / "fp16")
    config = medcap_config(folder, out / "run")
    load_base_model(config).save_pretrained(out / "nf4", safe_serialization=True)
    sizes["nf4"] = checkpoint_size(out / "nf4")
    return {"bytes": sizes, "gb": {k: v / GB for k, v in sizes.items()}}


def worker_budget_fit(folder: Path, budget_gb: float) -> dict[str, Any]:
    """The pipeline's automatic fit (budget.fit_config_to_budget) for an effective batch of 16."""
    import torch

    from medcap_helpers.budget import fit_config_to_budget
    from medcap_helpers.model import attach_lora, load_base_model
    from medcap_helpers.processing import load_processor

    torch.cuda.init()
    torch.empty(1, device="cuda")
    context_gb = gpu_process_memory_gb() or 0.0
    config = medcap_config(folder, Path(tempfile.mkdtemp()), per_device_train_batch_size=1,
                           gradient_accumulation_steps=16, vram_budget_gb=budget_gb - context_gb)
    processor = load_processor(config)
    model = attach_lora(load_base_model(config), config)
    rows = synthetic_rows(16, config.max_target_tokens)
    start = time.perf_counter()
    config, fit = fit_config_to_budget(config, model, processor, rows)
    return {"budget_gb_total": budget_gb, "cuda_context_gb": context_gb, "allocator_budget_gb": budget_gb - context_gb,
            "probe_s": time.perf_counter() - start, **fit.to_dict(), "explain": fit.explain()}


def worker_views_generation(folder: Path, views: str, batch: int, cap_gb: float) -> dict[str, Any]:
    """Beam-3 generation of 100 new tokens (forced) for a batch of studies, one or two views each, NF4 fp16."""
    import torch

    from medcap_helpers.model import load_base_model
    from medcap_helpers.multiview import multiview_generate
    from medcap_helpers.processing import load_processor, pixel_batch

    torch.cuda.init()
    torch.empty(1, device="cuda")
    context_gb = gpu_process_memory_gb()
    total = torch.cuda.get_device_properties(0).total_memory / GB
    torch.cuda.set_per_process_memory_fraction((cap_gb - (context_gb or 0.0)) / total)
    config = medcap_config(folder, Path(tempfile.mkdtemp()), compute_dtype="float16", views=views)
    processor = load_processor(config)
    model = load_base_model(config).eval()
    rows = synthetic_rows(batch, 4, two_views=views == "both")
    items = [[r["image"], r["image_2"]] if views == "both" else r["image"] for r in rows]
    pixels = pixel_batch(processor, items).to("cuda", torch.float16)
    settings = dict(max_new_tokens=100, min_new_tokens=100, num_beams=3, do_sample=False)

    def run() -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            out = multiview_generate(model, pixels, **settings) if views == "both" else \
                model.generate(pixel_values=pixels, **settings)
        torch.cuda.synchronize()
        assert out.shape[-1] >= 100
        return time.perf_counter() - start

    error = None
    try:
        run()
        torch.cuda.reset_peak_memory_stats()
        seconds = statistics.median([run() for _ in range(3)])
    except torch.cuda.OutOfMemoryError as err:
        error, seconds = f"out of memory: {str(err).splitlines()[0]}", None
    return {"views": views, "batch_studies": batch, "cap_gb": cap_gb, "error": error,
            "reports_per_s": batch / seconds if seconds else None,
            "peak_allocated_gb": torch.cuda.max_memory_allocated() / GB,
            "peak_reserved_gb": torch.cuda.max_memory_reserved() / GB,
            "process_gpu_gb": gpu_process_memory_gb(), "cuda_context_gb": context_gb}


def worker_tiny(dtype_name: str) -> dict[str, Any]:
    """The smoke profile's training function on the GPU in fp16 or bf16 mixed precision."""
    from medcap_helpers import data, model
    from medcap_helpers.config import MedcapConfig
    from medcap_helpers.train import train

    run_dir = Path(tempfile.mkdtemp(prefix="bench_tiny_"))
    config = MedcapConfig.from_profile("smoke", run_dir=str(run_dir), device="cuda", compute_dtype=dtype_name,
                                       num_train_epochs=2.0)
    dataset, _ = data.build_dataset(config, progress=False)
    base, processor = model.load_model_and_processor(config, dataset)
    start = time.perf_counter()
    result = train(config, model.attach_lora(base, config), processor, dataset)
    return {"compute_dtype": dtype_name, "seconds": time.perf_counter() - start,
            "epochs": [{k: e.get(k) for k in ("epoch", "train_loss", "eval_loss", "val_cider", "peak_memory")}
                       for e in result.history]}


# ----------------------------------------------------------------------------------- orchestration
def run_worker(kind: str, folder: Path, payload: dict[str, Any], timeout: int = 600) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", kind, "--folder", str(folder), "--payload", json.dumps(payload)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        return {"error": f"worker failed (rc {done.returncode}): {done.stderr[-1500:]}"}
    return json.loads(lines[-1][len("RESULT "):])


def header() -> dict[str, Any]:
    import torch

    from medcap_helpers.runs import environment_info

    info = environment_info()
    info["gpu"] = torch.cuda.get_device_name(0)
    info["gpu_total_gb"] = torch.cuda.get_device_properties(0).total_memory / GB
    info["model"] = "BLIP-large architecture (446 M parameters), random weights"
    return info


def write(part: str, results: dict[str, Any]) -> Path:
    from medcap_helpers.runs import write_json

    path = RESULTS / f"{part}.json"
    write_json(path, {"part": part, "environment": header(), "results": results})
    print(f"wrote {path}")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="training,inference,disk,cap4gb,tiny")
    parser.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "medcap_blip_large_random"))
    parser.add_argument("--configs", help="only training configurations whose name contains this text")
    parser.add_argument("--worker")
    parser.add_argument("--payload", default="{}")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = Path(args.folder)
    if args.worker:
        payload = json.loads(args.payload)
        result = {"train": lambda: worker_train(folder, payload["settings"], payload.get("cap_gb")),
                  "inference": lambda: worker_inference(folder, payload["quantize"], payload["dtype"]),
                  "tiny": lambda: worker_tiny(payload["dtype"]),
                  "views_generation": lambda: worker_views_generation(folder, payload["views"], payload["batch"],
                                                                      payload["cap_gb"]),
                  "disk": lambda: worker_disk(folder),
                  "budget": lambda: worker_budget_fit(folder, payload["budget_gb"])}[args.worker]()
        print("RESULT " + json.dumps(result, default=str), flush=True)
        return

    import torch

    if not torch.cuda.is_available():
        sys.exit("These benchmarks measure GPU memory and speed: they need a CUDA GPU.")
    folder.mkdir(parents=True, exist_ok=True)
    prepare_model_folder(folder)
    parts = args.only.split(",")
    if "training" in parts:
        results = {}
        for name, settings in TRAINING_CONFIGS.items():
            if args.configs and args.configs not in name:
                continue
            results[name] = run_worker("train", folder, {"settings": settings})
            print(name, json.dumps(results[name], default=str)[:400], flush=True)
            write("training", results)  # after each configuration: a cut-off run keeps what it measured
    if "inference" in parts:
        results = {"NF4, bf16 compute": run_worker("inference", folder, {"quantize": True, "dtype": "bfloat16"}),
                   "NF4, fp16 compute": run_worker("inference", folder, {"quantize": True, "dtype": "float16"}),
                   "fp16 (unquantized)": run_worker("inference", folder, {"quantize": False, "dtype": "float16"})}
        print(json.dumps(results, default=str)[:1500], flush=True)
        write("inference", results)
    if "disk" in parts:
        write("disk", run_worker("disk", folder, {}))
    if "tiny" in parts:
        write("tiny", {dtype: run_worker("tiny", folder, {"dtype": dtype}) for dtype in ("float16", "bfloat16")})
    if "views" in parts:  # one image per study vs both views as one input, under a 4 GB cap
        results = {}
        for views in ("single", "both"):
            results[f"training, views={views}, batch 8, checkpointing"] = run_worker("train", folder, {
                "settings": {"views": views, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1},
                "cap_gb": 4.0})
            results[f"generation, views={views}, beam 3, batch 8"] = run_worker(
                "views_generation", folder, {"views": views, "batch": 8, "cap_gb": 4.0})
            write("views", results)
        print(json.dumps(results, default=str)[:3000], flush=True)
    if "cap4gb" in parts:
        results = {"seed settings": run_worker("train", folder, {"settings": {}, "cap_gb": 4.0})}
        for name, settings in CAP_CANDIDATES.items():
            results[name] = run_worker("train", folder, {"settings": settings, "cap_gb": 4.0})
            print(name, json.dumps(results[name], default=str)[:400], flush=True)
            write("cap4gb", results)
        results["automatic fit (effective batch 16)"] = run_worker("budget", folder, {"budget_gb": 4.0})
        write("cap4gb", results)


if __name__ == "__main__":
    main()
