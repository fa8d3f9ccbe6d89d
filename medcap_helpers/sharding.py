"""Report generation spread over GPUs: one process per GPU, each writing a contiguous share of a split.

:func:`generate_sharded` is what stage 06 calls for the test split. With one process (the CPU, one
GPU, ``num_gpus=1``) it loads the model and generates in this process, as before. With more, this
process generates the first share on its GPU while it starts one ``python -m medcap_helpers.sharding``
process per other GPU (``CUDA_VISIBLE_DEVICES`` set to that GPU): each reads the run's saved dataset,
loads the model folder on its GPU (an adapter on the 4-bit base, or a merged model), generates the
reports of its share — contiguous, the first shares one study longer when the split does not divide
evenly — and writes them to ``<run>/distributed/<job>/share-<i>.json``. The caller reads the shares back
in order. No process talks to another, so no process group is needed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medcap_helpers import runs
from medcap_helpers.checkpoints import load_final_model
from medcap_helpers.config import MedcapConfig
from medcap_helpers.data import load_saved_dataset
from medcap_helpers.devices import device_map_for, pick_device
from medcap_helpers.distributed import training_processes
from medcap_helpers.errors import StageFailed
from medcap_helpers.generation import generate_for_split


def share_bounds(n_rows: int, processes: int) -> list[tuple[int, int]]:
    """Contiguous ``(start, stop)`` shares of ``n_rows`` rows, the first ``n_rows % processes`` one row longer
    (the split accelerate's ``split_between_processes`` makes)."""
    size, extra = divmod(n_rows, processes)
    bounds, start = [], 0
    for index in range(processes):
        stop = start + size + (1 if index < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def generate_in_process(config: MedcapConfig, model_dir: str | Path, split: Any) -> list[str]:
    """The reports of every row of ``split`` by the model in ``model_dir`` (adapter or merged), in this process."""
    model, processor = load_final_model(config, model_dir, device_map=device_map_for(pick_device(config)))
    reports = generate_for_split(model, processor, split, config)
    del model
    return reports


def generate_sharded(config: MedcapConfig, model_dir: str | Path, split_name: str, split: Any,
                     processes: int | None = None) -> list[str]:
    """The reports of ``split`` (the run's saved ``split_name`` split) by the model in ``model_dir``, generated
    by ``processes`` processes (default: one per training GPU, :func:`~medcap_helpers.distributed.training_processes`)
    and returned in row order."""
    processes = processes or training_processes(config)
    if processes == 1 or len(split) < processes:
        return generate_in_process(config, model_dir, split)
    job = Path(config.run_dir) / "distributed" / f"generate-{split_name}-{Path(model_dir).name}"
    job.mkdir(parents=True, exist_ok=True)
    runs.write_json(job / "job.json", {"config": config.to_dict(), "model_dir": str(model_dir),
                                       "split": split_name, "processes": processes})
    for index in range(processes):
        (job / f"share-{index}.json").unlink(missing_ok=True)
    run_in_processes("medcap_helpers.sharding", job / "job.json", processes, pick_device(config).type == "cuda",
                     f"Generating the {split_name} reports on {processes} processes", config.cpu_threads,
                     run_here=run_share)
    reports: list[str] = []
    for index in range(processes):
        reports.extend(runs.read_json(job / f"share-{index}.json")["reports"])
    if len(reports) != len(split):
        raise StageFailed(f"The shares hold {len(reports)} reports for {len(split)} {split_name} rows.")
    return reports


def run_in_processes(module: str, job: Path, count: int, on_gpu: bool, doing: str,
                     cpu_threads: int | None = None, run_here: Callable[[Path, int], Any] | None = None) -> None:
    """``python -m <module> <job> <i>`` for each ``i`` < ``count`` at once, each on its own GPU
    (``CUDA_VISIBLE_DEVICES``) when ``on_gpu`` and with its share of the cores (:func:`process_environment`);
    waits for all. With ``run_here``, this process does ``i = 0`` itself (``run_here(job, 0)``, on its own
    GPU, with its share of the cores) while the others start: their start-up (imports, loading) is no
    longer in series with the work. Each process writes its output to ``process-<i>.log`` beside ``job``
    (a pipe read one process after another would stall the others once their progress output filled it).
    :class:`~medcap_helpers.errors.StageFailed` names the first share that failed, with the end of its output."""
    first = 0 if run_here is None else 1
    workers: dict[int, tuple[subprocess.Popen, Path]] = {}
    for index in range(first, count):
        log = job.parent / f"process-{index}.log"
        with log.open("w") as output:  # the child keeps its own copy of the file
            workers[index] = (subprocess.Popen(
                [sys.executable, "-m", module, str(job), str(index)], stdout=output, stderr=subprocess.STDOUT,
                env=dict(os.environ, **process_environment(index, count, on_gpu, cpu_threads))), log)
    if run_here is not None:
        try:
            with threads_for_share(count):
                run_here(job, 0)
        except Exception as error:
            for worker, _ in workers.values():  # their shares are of no use without this one
                worker.terminate()
                worker.wait()
            raise StageFailed(f"{doing} failed: share 0, in this process: {error}") from error
    for worker, _ in workers.values():
        worker.wait()
    for index, (worker, log) in workers.items():
        if worker.returncode != 0:
            output = log.read_text(errors="replace")
            raise StageFailed(f"{doing} failed: process {index} exited with {worker.returncode}:\n{output[-2000:]}")


@contextmanager
def threads_for_share(processes: int) -> Iterator[None]:
    """This process's CPU threads cut to its share while ``processes`` processes work side by side (the
    workers get theirs through :func:`process_environment`), then restored."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(min(before, threads_per_process(processes)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def job_main(run: Callable[[Path, int], Any], description: str, argv: Sequence[str] | None = None) -> None:
    """The command line of one process of :func:`run_in_processes`: ``<job file> <index>``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("job", type=Path)
    parser.add_argument("index", type=int)
    args = parser.parse_args(argv)
    run(args.job, args.index)


def visible_gpu(index: int) -> str:
    """The ``index``-th GPU this process may use, as ``CUDA_VISIBLE_DEVICES`` names it."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",")[index].strip() if visible else str(index)


def threads_per_process(processes: int, cpu_threads: int | None = None) -> int:
    """CPU threads for each of ``processes`` processes side by side: ``cpu_threads`` when set, else this
    process's cores shared out evenly (at least one)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cpu_threads or max(1, cores // processes)


def process_environment(index: int, processes: int, on_gpu: bool, cpu_threads: int | None = None) -> dict[str, str]:
    """Environment for the ``index``-th of ``processes`` worker processes: its own GPU when ``on_gpu``
    and its share of the cores. Left to PyTorch's default, every process would run one OpenMP thread per
    core, and side by side their threads compete for the cores (torchrun sets ``OMP_NUM_THREADS`` for
    the same reason)."""
    threads = str(threads_per_process(processes, cpu_threads))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
            **({"CUDA_VISIBLE_DEVICES": visible_gpu(index)} if on_gpu else {})}


def run_share(job: Path, index: int) -> Path:
    """One process's share: load, generate, write ``share-<index>.json`` (atomically) beside ``job``."""
    spec = runs.read_json(job)
    config = MedcapConfig.from_dict(spec["config"])
    dataset, _ = load_saved_dataset(config.run_dir)
    split = dataset[spec["split"]]
    start, stop = share_bounds(len(split), spec["processes"])[index]
    reports = generate_in_process(config, spec["model_dir"], split.select(range(start, stop)))
    path = job.parent / f"share-{index}.json"
    runs.write_json(path, {"start": start, "stop": stop, "reports": reports})
    return path


if __name__ == "__main__":
    job_main(run_share, "One share of a sharded report generation (started by medcap).")
