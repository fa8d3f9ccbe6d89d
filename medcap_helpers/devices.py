"""Where models run: device and dtype choice, memory snapshots, out-of-memory detection and errors.

Memory is reported in **GB = 10^9 bytes** everywhere in medcap (keys end in ``_gb``).
"""

from __future__ import annotations

import contextlib
import gc
import os
import resource
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from medcap_helpers.config import MedcapConfig
from medcap_helpers.errors import ConfigError, MedcapError

GB = 1e9


class OutOfMemory(MedcapError, torch.cuda.OutOfMemoryError):
    """Training or generation ran out of (GPU) memory; the message gives the settings in force and what to change.

    A subclass of ``torch.cuda.OutOfMemoryError``, so code that catches that (the budget probe, the
    sweep, the benchmarks) still sees an out-of-memory error.
    """


def out_of_memory(doing: str, error: BaseException, settings: dict[str, Any], advice: Sequence[str],
                  note: str = "") -> OutOfMemory:
    """An :class:`OutOfMemory` for ``error``: one line of what failed, the settings, then what to change."""
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    in_force = ", ".join(f"{key}={value!r}" for key, value in settings.items())
    lines = [f"Out of memory while {doing}: {first_line[:200]}", f"Settings: {in_force}.",
             "Try: " + "; ".join(advice) + "."]
    if note:
        lines.append(note)
    return OutOfMemory("\n".join(lines))


def is_out_of_memory(err: BaseException) -> bool:
    """True for CUDA's OOM error and for CPU/other allocators' "out of memory" errors."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(err, (MemoryError, RuntimeError)) and "out of memory" in str(err).lower()


def release_memory() -> None:
    """Collect garbage and hand cached CUDA blocks back (after an OOM, between models)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def pick_device(config: MedcapConfig) -> torch.device:
    """``config.device`` as a torch device; ``"auto"`` takes CUDA when present."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA GPU is visible to PyTorch (torch.cuda.is_available() "
                          "is False): install a CUDA build of torch or use device='cpu' / profile 'smoke'.")
    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def compute_dtype(config: MedcapConfig, device: torch.device) -> torch.dtype:
    """Compute dtype: explicit ``config.compute_dtype`` honoured; "auto" = bf16 on CUDA that supports
    it, else fp16 on CUDA, fp32 on CPU."""
    if config.compute_dtype != "auto":
        return getattr(torch, config.compute_dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def device_map_for(device: torch.device | str) -> dict[str, Any]:
    """``from_pretrained`` device map putting the whole model on ``device`` (bitsandbytes needs one)."""
    device = torch.device(device)
    return {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}


def cuda_index(device: torch.device) -> int:
    """The GPU index of a CUDA ``device`` (the current GPU for a bare ``"cuda"``)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def allocator_cap_bytes(device: torch.device | str | int) -> float:
    """The bytes PyTorch's allocator may hold on ``device``: its per-process cap (see :func:`cap_gpu_memory`)."""
    return torch.cuda.get_per_process_memory_fraction(device) * torch.cuda.get_device_properties(device).total_memory


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def memory_snapshot(device: torch.device | str) -> dict[str, float]:
    """Memory now and at peak, in GB: CUDA allocator (+ NVML device use when available) or CPU RSS."""
    device = torch.device(device)
    if device.type == "cuda":
        index = cuda_index(device)
        snap = {"allocated_gb": torch.cuda.memory_allocated(index) / GB,
                "reserved_gb": torch.cuda.memory_reserved(index) / GB,
                "max_allocated_gb": torch.cuda.max_memory_allocated(index) / GB,
                "max_reserved_gb": torch.cuda.max_memory_reserved(index) / GB,
                "total_gb": torch.cuda.get_device_properties(index).total_memory / GB}
        with contextlib.suppress(Exception):  # NVML may be missing (containers, non-NVIDIA builds)
            snap["device_used_gb"] = torch.cuda.device_memory_used(index) / GB
        by_process = gpu_memory_by_process(index)
        if os.getpid() in by_process:  # who holds the device's memory: this process or others (compile workers)
            snap["process_gpu_gb"] = by_process[os.getpid()]
            snap["other_processes_gpu_gb"] = sum(gb for pid, gb in by_process.items() if pid != os.getpid())
        return {k: round(v, 4) for k, v in snap.items()}
    snap = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB}
    with contextlib.suppress(OSError, ValueError, IndexError):
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        snap["rss_gb"] = pages * resource.getpagesize() / GB
    return {k: round(v, 4) for k, v in snap.items()}


def synchronize_gpu() -> None:
    """Wait for the GPU's queued kernels (a no-op without CUDA in use), so a wall-clock time includes them."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new CUDA peak measurement (CPU peak RSS cannot be reset)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def gpu_memory_by_process(index: int | None = None) -> dict[int, float]:
    """GB of GPU ``index``'s memory per process id, as nvidia-smi lists them (NVML); empty without NVML or
    where the driver hides the figures. In a container the ids may be the host's, not this process's."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device() if index is None else index)
        return {proc.pid: proc.usedGpuMemory / GB for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                if proc.usedGpuMemory}
    except Exception:  # noqa: BLE001 - NVML is optional
        return {}


def private_pool_free_bytes(device: torch.device | str) -> int:
    """Bytes reserved in private memory pools (CUDA graphs' pools: compiled training's, while its graphs
    live) that nothing in them uses: held back from every other allocation, yet counted neither by
    ``memory_allocated`` nor as free. 0 without CUDA or a snapshot of the allocator."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_initialized():
        return 0
    index = cuda_index(device)
    try:
        segments = torch.cuda.memory_snapshot()
    except Exception:  # noqa: BLE001 - a diagnostic; sizing goes on without it
        return 0
    return sum(int(seg["total_size"]) - int(seg["allocated_size"]) for seg in segments
               if seg.get("device", index) == index and tuple(seg.get("segment_pool_id", (0, 0))) != (0, 0))


def allocator_state(device: torch.device | str) -> str:
    """What PyTorch's allocator holds on ``device``, as one line for a message: allocated, reserved (against
    its cap), reserved but unused in CUDA graphs' private pools, and free pieces of partly used blocks
    (``inactive_split_bytes``: free, yet no larger tensor fits in them). Empty without CUDA in use."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_initialized():
        return ""
    index = cuda_index(device)
    stats = torch.cuda.memory_stats(index)
    cap = allocator_cap_bytes(index)
    return (f"allocated {stats.get('allocated_bytes.all.current', 0) / GB:.2f} GB, reserved "
            f"{stats.get('reserved_bytes.all.current', 0) / GB:.2f} GB of the allocator's {cap / GB:.2f} GB cap, "
            f"{private_pool_free_bytes(device) / GB:.2f} GB unused in CUDA graphs' pools, "
            f"{stats.get('inactive_split_bytes.all.current', 0) / GB:.2f} GB in free pieces of split blocks")


def process_gpu_gb() -> float | None:
    """This process's GPU memory as NVML reports it (what nvidia-smi shows: CUDA context, allocator cache,
    library workspaces), else the whole device's use; None without NVML."""
    own = gpu_memory_by_process().get(os.getpid())
    if own is not None:
        return own
    try:
        return torch.cuda.device_memory_used() / GB
    except Exception:  # noqa: BLE001
        return None


LIBRARY_WORKSPACE_GB = 0.25
"""GPU memory that cuBLAS/cuDNN handles and workspaces take outside PyTorch's allocator once the first
matmuls run (measured on the H200: 0.14 GB beyond the bare CUDA context; the rehearsal's sweep, with more
kernels and streams, took about 0.24 GB, so 0.2 left its process at 4.04 GB)."""


def cap_gpu_memory(budget_gb: float, device: torch.device | str) -> float:
    """Cap PyTorch's allocator so that the whole process — CUDA context and library workspaces included,
    as nvidia-smi counts it — stays within ``budget_gb``: a bigger card then behaves like the budgeted one.
    Returns the allocator's cap in GB."""
    device = torch.device(device)
    index = cuda_index(device)
    torch.empty(1, device=torch.device("cuda", index))  # creates the CUDA context, which the cap must leave room for
    outside_allocator = max(0.0, (process_gpu_gb() or 0.0) - torch.cuda.memory_reserved(index) / GB)
    outside_allocator += LIBRARY_WORKSPACE_GB
    total_gb = torch.cuda.get_device_properties(index).total_memory / GB
    cap_gb = max(0.1, budget_gb - outside_allocator)
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb / total_gb), index)
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        # Under a hard cap, batches of varying length can leave reserved blocks that fit no later request;
        # segments that grow in place do not fragment that way.
        setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or torch.cuda.memory._set_allocator_settings
        setter("expandable_segments:True")
    return cap_gb


def memory_line(snapshot: dict[str, float]) -> str:
    """A snapshot as one readable line, e.g. ``peak RSS 1.23 GB, RSS 1.10 GB``."""
    labels = {"allocated_gb": "allocated", "reserved_gb": "reserved", "max_allocated_gb": "peak allocated",
              "max_reserved_gb": "peak reserved", "device_used_gb": "whole device", "total_gb": "card",
              "peak_rss_gb": "peak RSS", "rss_gb": "RSS"}
    return ", ".join(f"{labels.get(k, k)} {v:.2f} GB" for k, v in snapshot.items())


@contextlib.contextmanager
def temporary_environment(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set for the duration (what a process started inside inherits)."""
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
