"""Where a training step's time goes: a few optimizer steps recorded with ``torch.profiler`` (``profile_dir``).

A diagnostic for stage 03, off by default. :class:`TorchProfilerCallback` skips the first optimizer steps
(data-loader start, kernel selection), records the next ones, and writes per process into the folder:

* ``profile_rank<k>.txt``: the operators sorted by their own GPU time and by their own CPU time;
* ``profile_rank<k>.json``: the recorded steps' wall time, the GPU's busy time in them (the sum of the
  kernels' own times), and the counts of the calls that make the CPU wait for the GPU;
* ``trace_rank<k>.json.gz``: the timeline, for ``chrome://tracing`` or Perfetto.

A GPU busy for much less than the wall time is waiting for the CPU: launches, data or synchronisations.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from medcap_helpers.devices import synchronize_gpu

SYNCHRONISING_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
                       "aten::_local_scalar_dense", "aten::item")


def _own_device_time_us(event: Any) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):  # renamed in torch 2.4
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


def profile_summary(profiler: Any, wall_s: float, steps: int) -> dict[str, Any]:
    """The recorded steps' wall time against the GPU's busy time, and the synchronising calls' counts."""
    averages = profiler.key_averages()
    kernels = [e for e in averages if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    busy_s = sum(_own_device_time_us(e) for e in kernels) / 1e6
    counts = {name: 0 for name in SYNCHRONISING_CALLS}
    for event in averages:
        if event.key in counts:
            counts[event.key] += event.count
    launches = sum(e.count for e in averages if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    return {"steps": steps, "wall_s": wall_s, "gpu_busy_s": busy_s,
            "gpu_busy_share": busy_s / wall_s if wall_s else None,
            "kernel_launches_per_step": launches / steps if steps else None,
            "synchronising_calls": counts}


class TorchProfilerCallback(TrainerCallback):
    """Record optimizer steps ``skip + 1`` to ``skip + steps`` of training and write what
    :mod:`medcap_helpers.profiling` describes into ``folder``."""

    def __init__(self, folder: str | Path, skip: int = 3, steps: int = 4) -> None:
        self.folder, self.skip, self.steps = Path(folder), skip, steps
        self.profiler: Any = None
        self.started = 0.0
        self.done = False

    def _rank(self) -> int:
        return int(os.environ.get("RANK", "0"))

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        if self.done:
            return
        recorded = state.global_step - self.skip  # steps finished since the first recorded one began
        if recorded == 0 and self.profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            synchronize_gpu()
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
            self.started = time.perf_counter()
        elif self.profiler is not None and recorded >= self.steps:
            self._finish(recorded)

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        if self.profiler is not None and not self.done:  # fewer steps than asked for
            self._finish(state.global_step - self.skip)
        elif self.profiler is None:
            print(f"Nothing profiled into {self.folder}: training ran {state.global_step} optimizer step(s), and the "
                  f"profiler records from step {self.skip + 1} on (train on more examples or epochs).", flush=True)

    def _finish(self, steps: int) -> None:
        synchronize_gpu()
        wall_s = time.perf_counter() - self.started
        self.profiler.__exit__(None, None, None)
        self.done = True
        self.folder.mkdir(parents=True, exist_ok=True)
        rank = self._rank()
        averages = self.profiler.key_averages()
        sort_gpu = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        tables = [f"# {steps} optimizer steps, {wall_s:.3f} s\n", "## by own GPU time",
                  averages.table(sort_by=sort_gpu, row_limit=40, max_name_column_width=70),
                  "## by own CPU time", averages.table(sort_by="self_cpu_time_total", row_limit=40,
                                                      max_name_column_width=70)]
        (self.folder / f"profile_rank{rank}.txt").write_text("\n".join(tables))
        summary = profile_summary(self.profiler, wall_s, steps)
        (self.folder / f"profile_rank{rank}.json").write_text(json.dumps(summary, indent=1))
        self.profiler.export_chrome_trace(str(self.folder / f"trace_rank{rank}.json.gz"))  # gzipped by the suffix
        print(f"Profiled {steps} optimizer steps into {self.folder}: {json.dumps(summary)}", flush=True)
