"""Data-parallel training (medcap_helpers.distributed) on the CPU: 2 torchrun processes, gloo, the tiny BLIP.

The launch goes through the library (``launch_training``) with this file as the worker module: run as
``python -m tests.test_distributed <config.json>`` it records, per process, what the process wrote under
the run folder (a Python audit hook), what each per-epoch validation generation got and gathered, and
its final LoRA weights, into ``$MEDCAP_PROBE_DIR/rank<N>.*``, then runs ``distributed.main``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from medcap_helpers import distributed
from medcap_helpers.config import MedcapConfig
from medcap_helpers.errors import ConfigError, StageFailed

REPO_ROOT = Path(__file__).resolve().parents[1]
PROBE_ENV = "MEDCAP_PROBE_DIR"
PROBE_MODULE = "tests.test_distributed"
PROCESSES = 2
RANK1_WRITE_PROBE = ".write_test."
"""runs.ensure_run_dir's writability probe (named after the process), which train() runs in every process."""


def tiny_config(run_dir: Path, epochs: float) -> MedcapConfig:
    """5 validation studies (shares of 3 and 2), 8 training images in batches of 2: 2 steps an epoch on 2 processes."""
    return MedcapConfig.from_profile(
        "smoke", run_dir=str(run_dir), smoke_num_reports=60, smoke_image_size=64, tiny_pretrain_epochs=0,
        max_train_examples=8, max_eval_examples=5, num_train_epochs=epochs, per_device_train_batch_size=2,
        gradient_accumulation_steps=1, max_target_tokens=24, max_new_tokens=8, num_beams=1, eval_batch_size=1,
        logging_steps=1, lr_scheduler_type="constant", cache_vision_embeddings=False)  # pixels through DDP


# --------------------------------------------------------------------------------------- the worker probe
def _run_probe(config_path: str) -> int:
    """Watch this process while ``distributed.main`` trains, then write what was seen."""
    from peft import get_peft_model_state_dict

    from medcap_helpers import train

    rank = int(os.environ["RANK"])
    probe_dir = Path(os.environ[PROBE_ENV])
    run_dir = os.path.realpath(json.loads(Path(config_path).read_text())["run_dir"]) + os.sep
    record: dict[str, Any] = {"writes": [], "generations": []}

    def inside_run(path: Any) -> str | None:
        if isinstance(path, (str, bytes, os.PathLike)):
            full = os.path.realpath(os.fsdecode(path))
            return full[len(run_dir):] if full.startswith(run_dir) else None
        return None

    def audit(event: str, args: tuple) -> None:
        if event == "open" and len(args) == 3:
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        elif event == "os.mkdir":
            path, writing = args[0], not os.path.exists(args[0])
        elif event == "os.rename":
            path, writing = args[1], True
        else:
            return
        relative = inside_run(path) if writing else None
        if relative is not None:
            record["writes"].append(relative)

    sys.addaudithook(audit)
    real_inputs, real_generate, real_metrics = train.generation_inputs, train.generate_reports, \
        train.MedcapTrainer.generation_metrics
    real_attach = distributed.attach_lora
    trained: list[Any] = []

    def generation_inputs(model: Any, processor: Any, rows: Any, config: Any) -> Any:
        record["generations"].append({"share": list(rows["study_id"])})
        return real_inputs(model, processor, rows, config)

    def generate_reports(*args: Any, **kwargs: Any) -> list[str]:
        predictions = real_generate(*args, **kwargs)
        record["generations"][-1]["share_predictions"] = predictions
        return predictions

    def generation_metrics(self: Any, prefix: str = "eval") -> dict[str, float]:
        metrics = real_metrics(self, prefix)
        record["generations"][-1]["gathered"] = list(self.last_predictions)
        return metrics

    def attach_lora(*args: Any, **kwargs: Any) -> Any:
        trained.append(real_attach(*args, **kwargs))
        return trained[-1]

    train.generation_inputs, train.generate_reports = generation_inputs, generate_reports
    train.MedcapTrainer.generation_metrics = generation_metrics
    distributed.attach_lora = attach_lora
    status = distributed.main([config_path])
    (probe_dir / f"rank{rank}.json").write_text(json.dumps(record))
    torch.save({k: v.detach().cpu() for k, v in get_peft_model_state_dict(trained[-1]).items()},
               probe_dir / f"rank{rank}_lora.pt")
    return status


if __name__ == "__main__":
    sys.exit(_run_probe(sys.argv[1]))


# --------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def prepared_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A run folder with the data stage done and the tiny model built (what stage 03 starts from)."""
    from medcap_helpers import data, model

    run_dir = tmp_path_factory.mktemp("distributed") / "run"
    config = tiny_config(run_dir, epochs=1.0)
    dataset, report = data.build_dataset(config, progress=False)
    data.save_dataset(dataset, report, run_dir)
    model.load_model_and_processor(config, dataset)
    assert len(dataset["validation"]) == 5 and len(dataset["train"]) == 8
    return {"run_dir": run_dir, "dataset": dataset}


def _launch(config: MedcapConfig, probe_dir: Path) -> tuple[Any, list[dict[str, Any]], list[dict[str, torch.Tensor]]]:
    probe_dir.mkdir(parents=True)
    env = {PROBE_ENV: str(probe_dir), "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    result = distributed.launch_training(config, PROCESSES, worker_module=PROBE_MODULE, env=env)
    print(f"{PROCESSES}-process training, {config.num_train_epochs:g} epoch(s): {time.perf_counter() - start:.0f} s")
    records = [json.loads((probe_dir / f"rank{r}.json").read_text()) for r in range(PROCESSES)]
    weights = [torch.load(probe_dir / f"rank{r}_lora.pt") for r in range(PROCESSES)]
    return result, records, weights


def _check_processes(records: list[dict[str, Any]], weights: list[dict[str, torch.Tensor]],
                     validation_ids: list[str], epochs: int) -> None:
    """Sharded and gathered generation, identical weights, and writes by process 0 only."""
    for rank, record in enumerate(records):
        assert len(record["generations"]) == epochs, f"rank {rank}: one validation generation per epoch"
    for epoch in range(epochs):
        first, second = (record["generations"][epoch] for record in records)
        assert first["share"] == validation_ids[:3] and second["share"] == validation_ids[3:]
        assert first["gathered"] == second["gathered"] == first["share_predictions"] + second["share_predictions"]
    assert weights[0].keys() == weights[1].keys() and weights[0]
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), f"{name} differs between the processes"
    assert any("lora_B" in name and tensor.abs().sum() > 0 for name, tensor in weights[0].items()), \
        "LoRA B starts at zero: a trained adapter has non-zero B"
    assert all(name.startswith(RANK1_WRITE_PROBE) for name in records[1]["writes"]), records[1]["writes"]
    written = set(records[0]["writes"])
    for expected in ("metrics/train.json", "distributed/train_result.json", ".adapter.staging/adapter_config.json"):
        assert expected in written, f"process 0 did not write {expected}: {sorted(written)}"


# --------------------------------------------------------------------------------------- tests
def test_two_processes_train_shard_generation_and_resume(prepared_run: dict[str, Any], tmp_path: Path) -> None:
    """One epoch on 2 processes, then a second that resumes from its checkpoint. The adapter they saved,
    loaded into this process's model, holds the processes' weights and writes, in one process, the
    validation reports the 2 processes gathered for that epoch, in the same order."""
    from peft import get_peft_model_state_dict

    from medcap_helpers import generation, model, runs

    run_dir, dataset = prepared_run["run_dir"], prepared_run["dataset"]
    validation_ids = list(dataset["validation"]["study_id"])

    first, records, weights = _launch(tiny_config(run_dir, epochs=1.0), tmp_path / "probe1")
    assert first.global_step == 2 and first.resumed_from is None and len(first.history) == 1
    _check_processes(records, weights, validation_ids, epochs=1)
    gathered_by_epoch = {1.0: records[0]["generations"][0]["gathered"]}

    config = tiny_config(run_dir, epochs=2.0)
    second, records, weights = _launch(config, tmp_path / "probe2")
    assert second.resumed_from is not None and second.resumed_from.endswith("checkpoint-2")
    assert second.global_step == 4 and [e["epoch"] for e in second.history] == [1.0, 2.0]
    _check_processes(records, weights, validation_ids, epochs=1)  # the resumed run evaluates epoch 2 only
    gathered_by_epoch[2.0] = records[0]["generations"][0]["gathered"]
    assert runs.read_stage_metrics(run_dir, "train")["global_step"] == 4

    base, processor = model.load_model_and_processor(config, dataset)
    peft_model = model.attach_lora(base, config)
    distributed.load_trained_adapter(peft_model, second.adapter_dir)
    loaded = get_peft_model_state_dict(peft_model)
    assert loaded.keys() == weights[0].keys()
    assert all(torch.equal(loaded[name].cpu(), tensor) for name, tensor in weights[0].items())
    single = generation.generate_for_split(peft_model, processor, dataset["validation"], config)
    assert len(set(single)) > 1, "reports that all look alike could not show a wrong order"
    assert single == gathered_by_epoch[second.best_epoch]



def test_two_view_studies_train_through_the_data_parallel_wrapper(prepared_run: dict[str, Any], tmp_path: Path) -> None:
    """views="both" (the full profile): each process's two-view batches go through DDP's own forward, so
    the gradients are averaged and the processes end with the same weights (the first GPU run crashed
    here: the two-view forward called the model inside the wrapper)."""
    import shutil

    from datasets import Image

    from medcap_helpers import data

    run_dir = tmp_path / "run"
    shutil.copytree(prepared_run["run_dir"], run_dir, symlinks=True,  # what stage 03 starts from: no checkpoints
                    ignore=shutil.ignore_patterns("checkpoints", "distributed", "metrics", "adapter*", ".lock*"))
    dd, report = data.load_saved_dataset(run_dir)
    for split in list(dd):
        stored = dd[split].cast_column("image", Image(decode=False))["image"]
        second = [{"path": image["path"], "bytes": image["bytes"]} for image in stored]  # the same picture twice
        dd[split] = dd[split].remove_columns("image_2").add_column("image_2", second).cast_column("image_2", Image(mode="RGB"))
    data.save_dataset(dd, report, run_dir)
    config = tiny_config(run_dir, epochs=1.0).replace(views="both")
    result, records, weights = _launch(config, tmp_path / "probe")
    assert result.global_step == 2 and len(records[0]["generations"]) == 1
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), f"{name} differs between the processes"
    assert any("lora_B" in name and tensor.abs().sum() > 0 for name, tensor in weights[0].items())


def test_a_failing_process_is_reported_with_its_output(prepared_run: dict[str, Any]) -> None:
    config = tiny_config(prepared_run["run_dir"], epochs=1.0)
    with pytest.raises(StageFailed, match=r"(?s)exit status [1-9].*no_such_worker"):
        distributed.launch_training(config, PROCESSES, worker_module="tests.no_such_worker")


def test_launch_needs_the_runs_model_built_first(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not built yet"):
        distributed.launch_training(tiny_config(tmp_path / "run", epochs=1.0), PROCESSES)


def test_processes_follow_num_gpus_and_the_visible_gpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gpu_config = MedcapConfig.from_profile("full", run_dir=str(tmp_path))
    assert distributed.training_processes(tiny_config(tmp_path, epochs=1.0)) == 1  # the CPU: one process
    monkeypatch.setattr(distributed, "pick_device", lambda config: torch.device("cuda", 0))
    monkeypatch.setattr(distributed, "visible_gpu_count", lambda: 2)
    assert distributed.training_processes(gpu_config) == 2
    assert distributed.training_processes(gpu_config.replace(num_gpus=1)) == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(ConfigError, match=r"num_gpus=3 but only 2 GPU\(s\) are visible \(CUDA_VISIBLE_DEVICES=0,1\)"):
        distributed.training_processes(gpu_config.replace(num_gpus=3))


def test_num_gpus_is_validated_and_set_by_gpus(tmp_path: Path) -> None:
    from medcap_helpers.cli import build_config, make_parser

    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="num_gpus must be a whole number"):
            MedcapConfig.from_profile("full", num_gpus=bad)
    with pytest.raises(ConfigError, match="device='cpu'"):
        MedcapConfig.from_profile("smoke", num_gpus=2)
    args = make_parser().parse_args(["run", "--profile", "full", "--out", str(tmp_path / "run"), "--gpus", "2"])
    assert build_config(args).num_gpus == 2
    args = make_parser().parse_args(["run", "--profile", "full", "--out", str(tmp_path / "run")])
    assert build_config(args).num_gpus is None


def test_the_vision_cache_is_filled_once_before_the_processes_start(prepared_run: dict[str, Any], tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """cache_vision_embeddings on 2 processes: the caller caches every image before the launch (the processes
    compute none), and the processes train on the cached tokens to the loss curve of the images."""
    import shutil

    from medcap_helpers import model, vision_cache

    curves = {}
    for cached in (False, True):
        run_dir = tmp_path / f"run_{cached}"
        shutil.copytree(prepared_run["run_dir"], run_dir, symlinks=True,
                        ignore=shutil.ignore_patterns("checkpoints", "distributed", "metrics", "adapter*", ".lock*"))
        config = tiny_config(run_dir, epochs=1.0).replace(cache_vision_embeddings=cached)
        base, processor = model.load_model_and_processor(config, prepared_run["dataset"])
        capsys.readouterr()
        result = distributed.train_data_parallel(config, model.attach_lora(base, config), processor,
                                                 prepared_run["dataset"], num_processes=PROCESSES)
        output = capsys.readouterr().out
        curves[cached] = [e["loss"] for e in result.log_history if "loss" in e]
        files = list((run_dir / vision_cache.CACHE_FOLDER).rglob("*.npy"))
        if cached:
            images = {vision_cache.image_hash(im) for split in ("train", "validation")
                      for im in vision_cache.images_of(prepared_run["dataset"][split])}
            assert len(files) == len(images) == 13, "every training and validation image, once"
            assert output.count("Cached the vision tower's tokens") == 1, "the processes found them all cached"
        else:
            assert not files
    assert len(curves[True]) == len(curves[False]) == 2
    torch.testing.assert_close(torch.tensor(curves[True]), torch.tensor(curves[False]), rtol=1e-4, atol=1e-4)
