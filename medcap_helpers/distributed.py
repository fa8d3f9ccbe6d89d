"""Data-parallel training for stage 03: one process per GPU, each with its own full 4-bit model.

:func:`train_data_parallel` is what stage 03 calls. With one process (the CPU, one GPU, ``num_gpus=1``)
it is :func:`medcap_helpers.train.train`. With more it writes the config to
``<run_dir>/distributed/config.json`` and starts ::

    python -m torch.distributed.run --standalone --nproc_per_node N -m medcap_helpers.distributed <that config>

Each process reads the run's saved dataset, loads its own 4-bit model on its own device
(``device_map={"": local_rank}``), attaches LoRA and runs the same :func:`~medcap_helpers.train.train`:
the HF ``Trainer`` sees the torchrun environment and trains with DDP through accelerate (no
unused-parameter search, non-reentrant checkpointing), shards the per-epoch validation generation and
gathers it in order (``MedcapTrainer.generation_metrics``). Only process 0 writes: checkpoints, the
adapter, ``metrics/train.json`` and ``distributed/train_result.json``, which the caller reads back as the
:class:`~medcap_helpers.train.TrainResult` of an in-process run. Rerunning resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from medcap_helpers import runs, train, vision_cache
from medcap_helpers.atomic import folder_ready
from medcap_helpers.checkpoints import remove_incomplete_checkpoints
from medcap_helpers.config import LOCAL_MODELS, MedcapConfig
from medcap_helpers.data import load_saved_dataset
from medcap_helpers.devices import pick_device
from medcap_helpers.errors import ConfigError, StageFailed
from medcap_helpers.model import attach_lora, load_model_and_processor
from medcap_helpers.processing import has_saved_processor, local_model_dir
from medcap_helpers.train import TrainResult

if TYPE_CHECKING:  # pragma: no cover
    from transformers import BlipProcessor

DISTRIBUTED_FOLDER = "distributed"
CONFIG_NAME = "config.json"
RESULT_NAME = "train_result.json"
WORKER_MODULE = "medcap_helpers.distributed"
OUTPUT_TAIL_CHARS = 12000


# --------------------------------------------------------------------------------------- how many
def visible_gpu_count() -> int:
    """CUDA GPUs this process can see (``CUDA_VISIBLE_DEVICES`` applies); 0 without CUDA."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def training_processes(config: MedcapConfig) -> int:
    """Processes stage 03 trains with: 1 on the CPU, else ``config.num_gpus`` (None: every visible GPU)."""
    if pick_device(config).type != "cuda":
        return 1
    visible = visible_gpu_count()
    wanted = config.num_gpus or visible
    if wanted > visible:
        shown = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ConfigError(f"num_gpus={wanted} but only {visible} GPU(s) are visible"
                          f"{f' (CUDA_VISIBLE_DEVICES={shown})' if shown is not None else ''}: "
                          f"use --gpus {visible} or fewer, or leave num_gpus unset to use every visible GPU.")
    return wanted


def is_main_process() -> bool:
    """True outside a data-parallel launch and in its process 0."""
    return int(os.environ.get("RANK", "0")) == 0


# --------------------------------------------------------------------------------------- the caller's side
def train_data_parallel(config: MedcapConfig, peft_model: Any, processor: BlipProcessor, dataset: Any,
                        num_processes: int | None = None) -> TrainResult:
    """Train ``peft_model`` like :func:`~medcap_helpers.train.train`, on ``num_processes`` processes (default:
    :func:`training_processes`). Data-parallel, the processes read the run's saved dataset (``dataset``
    is used in-process only) and ``peft_model`` gets the trained adapter weights afterwards."""
    processes = num_processes or training_processes(config)
    if processes == 1:
        return train.train(config, peft_model, processor, dataset)
    # Cached here, once: the processes then find every image's tokens instead of computing them twice.
    vision_cache.prepare_cache(config, peft_model, processor, [train.training_split(dataset),
                                                               train.validation_split(dataset)])
    result = launch_training(config, processes)
    load_trained_adapter(peft_model, result.adapter_dir)
    return result


def launch_command(num_processes: int, config_path: Path, worker_module: str = WORKER_MODULE) -> list[str]:
    """torchrun (as ``python -m torch.distributed.run``, this interpreter) running ``worker_module``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_processes}",
            "-m", worker_module, str(config_path)]


def launch_training(config: MedcapConfig, num_processes: int, worker_module: str = WORKER_MODULE,
                    env: dict[str, str] | None = None) -> TrainResult:
    """Run stage 03's training in ``num_processes`` torchrun processes; return process 0's result.

    Their output goes to this process's stdout as it comes. ``worker_module`` runs :func:`main`
    (tests wrap it to watch the processes). A failed process raises :class:`StageFailed` with the end
    of the output.
    """
    if num_processes < 2:
        raise ValueError(f"launch_training needs 2 or more processes, got {num_processes}.")
    _check_model_built(config)
    folder = Path(config.run_dir) / DISTRIBUTED_FOLDER
    config_path = runs.write_json(folder / CONFIG_NAME, config.to_dict())
    result_path = folder / RESULT_NAME
    result_path.unlink(missing_ok=True)
    remove_incomplete_checkpoints(Path(config.run_dir) / "checkpoints")  # here, once: the processes would race
    command = launch_command(num_processes, config_path, worker_module)
    returncode, tail = _run_streaming(command, {**os.environ, **(env or {})})
    if returncode != 0 or not result_path.is_file():
        raise StageFailed(
            f"Data-parallel training on {num_processes} processes failed (exit status {returncode}). "
            f"Completed epochs are kept in {Path(config.run_dir) / 'checkpoints'}: rerunning continues from the "
            f"last one. Command: {' '.join(command)}\nEnd of the processes' output:\n{tail}")
    return read_train_result(result_path)


def read_train_result(path: str | Path) -> TrainResult:
    """The :class:`~medcap_helpers.train.TrainResult` that :func:`main` wrote."""
    values = runs.read_json(path)
    values["adapter_dir"] = Path(values["adapter_dir"])
    return TrainResult(**values)


def load_trained_adapter(peft_model: Any, adapter_dir: str | Path) -> None:
    """Copy the adapter weights saved in ``adapter_dir`` into ``peft_model`` (in place)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if not hasattr(peft_model, "peft_config"):
        raise TypeError("train_data_parallel needs a peft model (model.attach_lora) to receive the trained "
                        "adapter weights.")
    result = set_peft_model_state_dict(peft_model, load_file(str(Path(adapter_dir) / "adapter_model.safetensors")))
    if result.unexpected_keys:
        raise ValueError(f"The adapter in {adapter_dir} does not fit the model: unexpected weights "
                         f"{result.unexpected_keys[:5]}.")


def _check_model_built(config: MedcapConfig) -> None:
    """A run's own model (tiny, random BLIP-large) must exist before launch: every process would build it."""
    folder = local_model_dir(config)
    if config.model_name in LOCAL_MODELS and not (folder_ready(folder, "model.safetensors")
                                                  and has_saved_processor(folder)):
        raise ConfigError(f"The run's {config.model_name!r} model is not built yet in {folder}: load it once in "
                          "this process first (model.load_model_and_processor), then train data-parallel.")


def _run_streaming(command: Sequence[str], env: dict[str, str]) -> tuple[int, str]:
    """Run ``command``, copying its output to stdout as it comes; (exit status, last characters of output)."""
    tail: deque[str] = deque()
    size = 0
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                          errors="replace", bufsize=1) as process:
        try:
            assert process.stdout is not None
            for line in process.stdout:
                sys.stdout.write(line)
                tail.append(line)
                size += len(line)
                while size > OUTPUT_TAIL_CHARS and len(tail) > 1:
                    size -= len(tail.popleft())
        except BaseException:  # interrupted: torchrun passes the signal on to its processes
            process.terminate()
            process.wait()
            raise
    sys.stdout.flush()
    return process.returncode, "".join(tail)


# --------------------------------------------------------------------------------------- one process
def train_this_process(config: MedcapConfig) -> TrainResult:
    """One data-parallel process: its own 4-bit model on its own device, LoRA, and :func:`train`."""
    from transformers import set_seed

    set_seed(config.seed)
    if config.cpu_threads is not None:
        torch.set_num_threads(config.cpu_threads)
    if pick_device(config).type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # the model loads on this GPU
    dataset, _ = load_saved_dataset(config.run_dir)
    base_model, processor = load_model_and_processor(config, dataset)
    return train.train(config, attach_lora(base_model, config), processor, dataset)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of each torchrun process: train, and (process 0) write the result for the caller."""
    parser = argparse.ArgumentParser(prog="python -m medcap_helpers.distributed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="the config.json that launch_training wrote")
    config_path = Path(parser.parse_args(argv).config)
    result = train_this_process(MedcapConfig.load(config_path))
    if is_main_process():
        runs.write_json(config_path.parent / RESULT_NAME, result.to_dict())
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
