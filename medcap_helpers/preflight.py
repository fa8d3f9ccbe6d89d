"""Preflight: in seconds, what would break a long run hours later, and how to fix it (`medcap check`).

Checks, for the config about to run: CUDA and bitsandbytes' 4-bit kernels on the GPU, what
``torch.compile`` needs when a compiled step is on (Triton, a C compiler), free GPU memory
against the budget, free disk for the data, checkpoints and merged models, Java for METEOR, the data
files, and (for a hub model not downloaded yet) whether the hub answers. Each check says ``ok``,
``warn`` (the run works, with a caveat) or ``fail`` (the run would break) and what to do.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from medcap_helpers.config import TINY_MODEL, MedcapConfig
from medcap_helpers.devices import GB

OK, WARN, FAIL = "ok", "warn", "fail"
HUB_HOST = ("huggingface.co", 443)
# Disk a run writes besides its data (BLIP-large): 16-bit base and two merged models (0.9 GB each), two
# NF4 models (0.3 GB each), Trainer checkpoints and the adapter (small), the saved dataset (paths only).
RUN_DISK_GB = {"blip-large": 4.5, "tiny": 0.2}
OPENI_DATA_GB = 2.5  # NLMCXR_png.tgz (~1.3 GB) and its extracted PNGs
VISION_CACHE_GB = 8.8  # cache_vision_embeddings at BLIP-large size: 7,470 images x 577 x 1024 float16


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""


def _cuda(config: MedcapConfig) -> list[Check]:
    wants_gpu = config.device == "cuda" or (config.device == "auto" and config.model_name != TINY_MODEL)
    if not torch.cuda.is_available():
        status = FAIL if wants_gpu else OK
        return [Check("CUDA GPU", status, "no CUDA GPU visible to PyTorch" + ("" if wants_gpu else " (not needed)"),
                      "install a CUDA build of torch and a driver, or use --profile smoke" if wants_gpu else "")]
    name = torch.cuda.get_device_name(0)
    checks = [Check("CUDA GPU", OK, f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}")]
    free, total = torch.cuda.mem_get_info()
    budget = config.vram_budget_gb or total / GB
    status = OK if free / GB >= min(budget, total / GB) * 0.9 else WARN
    checks.append(Check("free GPU memory", status, f"{free / GB:.1f} of {total / GB:.1f} GB free; budget "
                        f"{budget:.1f} GB", "" if status == OK else "close other programs using the GPU "
                        "(nvidia-smi) or lower --vram-budget-gb"))
    visible = torch.cuda.device_count()
    if config.num_gpus is not None and config.num_gpus > visible:
        checks.append(Check("GPUs", FAIL, f"num_gpus={config.num_gpus} but {visible} visible",
                            f"use --gpus {visible} or fewer (or check CUDA_VISIBLE_DEVICES)"))
    else:
        checks.append(Check("GPUs", OK, f"training on {config.num_gpus or visible} of {visible}"))
    if config.load_in_4bit:
        checks.append(_bitsandbytes_on_gpu())
    if config.compile_training or config.compile_generation:
        checks.append(_compiler())
    return checks


def _compiler() -> Check:
    """torch.compile on a GPU (``compile_training``, ``compile_generation``) needs Triton and a C compiler;
    without them the run goes on uncompiled (slower), with a warning."""
    missing = [what for what, there in (("Triton", importlib.util.find_spec("triton") is not None),
                                        ("C compiler", any(shutil.which(cc) for cc in ("cc", "gcc", "clang"))))
               if not there]
    if missing:
        return Check("torch.compile", WARN, f"no {' and no '.join(missing)}: compiled steps fall back to eager "
                     "ones (training about 3x slower at BLIP-large size)",
                     "pip install triton (Linux) and a C compiler (apt-get install build-essential), or "
                     "--set compile_training=false --set compile_generation=false to skip the attempt")
    return Check("torch.compile", OK, "Triton and a C compiler found")


def _bitsandbytes_on_gpu() -> Check:
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float16, quant_type="nf4").cuda()
        layer(torch.randn(2, 64, device="cuda", dtype=torch.float16))
    except Exception as err:  # noqa: BLE001 - any failure here is what the check reports
        return Check("bitsandbytes 4-bit on the GPU", FAIL, f"{type(err).__name__}: {str(err)[:160]}",
                     "reinstall bitsandbytes for your CUDA version (pip install -U bitsandbytes)")
    return Check("bitsandbytes 4-bit on the GPU", OK, f"NF4 layer ran (bitsandbytes {bnb.__version__})")


def _disk(config: MedcapConfig) -> Check:
    run_dir = Path(config.run_dir).expanduser().resolve()
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    free = shutil.disk_usage(existing).free / GB
    need = RUN_DISK_GB["tiny" if config.model_name == TINY_MODEL else "blip-large"]
    data_missing = config.data_source == "openi" and not (config.images_dir and Path(config.images_dir).is_dir())
    need += OPENI_DATA_GB if data_missing else 0.0
    need += VISION_CACHE_GB if config.cache_vision_embeddings and config.model_name != TINY_MODEL else 0.0
    status = OK if free >= need else FAIL
    return Check("free disk", status, f"{free:.1f} GB free at {existing}; this run needs about {need:.1f} GB",
                 "" if status == OK else "free disk space or choose another --out folder")


def _java() -> Check:
    java = shutil.which("java")
    if java:
        return Check("Java (METEOR)", OK, java)
    return Check("Java (METEOR)", WARN, "no 'java' on the PATH: METEOR is left out of every table",
                 "apt-get install default-jre-headless (or any Java 8+)")


def _data(config: MedcapConfig) -> list[Check]:
    if config.data_source in ("smoke", "hub", "xrv_reports"):
        return [Check("data", OK, f"data_source={config.data_source!r} needs no local files")]
    checks = []
    for name in ("data_path", "images_dir"):
        value = getattr(config, name)
        if value is None:
            continue
        there = Path(value).expanduser().exists()
        checks.append(Check(name, OK if there else FAIL, f"{value} {'found' if there else 'is missing'}",
                            "" if there else "python -m medcap_helpers.download data/  (Open-i, resumable)"))
    return checks


def _hub(config: MedcapConfig, connect: Callable[[tuple[str, int], float], object]) -> Check:
    name = config.model_name
    if name == TINY_MODEL or Path(name).expanduser().exists():
        return Check("model", OK, f"{name!r} needs no download")
    cache = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
    if (cache / f"models--{name.replace('/', '--')}").is_dir():
        return Check("model", OK, f"{name} is in the hub cache")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return Check("model", FAIL, f"{name} is not downloaded and HF_HUB_OFFLINE=1",
                     "unset HF_HUB_OFFLINE for the first run, or download the model once and pass its folder")
    try:
        connection = connect(HUB_HOST, 3.0)
        getattr(connection, "close", lambda: None)()
    except OSError as err:
        return Check("model", FAIL, f"{name} is not downloaded and {HUB_HOST[0]} is unreachable ({err})",
                     "connect to the internet for the first run, or download the model elsewhere and pass its folder")
    return Check("model", OK, f"{name} will be downloaded from {HUB_HOST[0]} (reachable)")


def run_checks(config: MedcapConfig,
               connect: Callable[[tuple[str, int], float], object] = socket.create_connection) -> list[Check]:
    """Every check for ``config``; cheap (seconds), nothing is downloaded."""
    checks = _cuda(config) + [_disk(config), _java()] + _data(config) + [_hub(config, connect)]
    for package in ("bitsandbytes", "peft", "datasets", "pycocoevalcap", "papermill"):
        if importlib.util.find_spec(package) is None:
            checks.append(Check(f"package {package}", FAIL, "not installed", "pip install -e . (or make install)"))
    return checks


def report(checks: list[Check]) -> str:
    """One screen: a line per check, then what to fix."""
    marks = {OK: "ok  ", WARN: "warn", FAIL: "FAIL"}
    lines = [f"[{marks[c.status]}] {c.name}: {c.detail}" for c in checks]
    fixes = [f"- {c.name}: {c.fix}" for c in checks if c.status != OK and c.fix]
    if fixes:
        lines += ["", "To fix:"] + fixes
    failed = sum(c.status == FAIL for c in checks)
    lines += ["", "Ready to run." if not failed else f"{failed} check(s) failed: the run would break."]
    return "\n".join(lines)


def passed(checks: list[Check]) -> bool:
    return not any(c.status == FAIL for c in checks)
