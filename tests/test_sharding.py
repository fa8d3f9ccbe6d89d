"""Report generation in shares, one process each (stage 06 on several GPUs), run here with two CPU processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medcap_helpers import runs
from medcap_helpers.config import MedcapConfig
from medcap_helpers.data import load_saved_dataset
from medcap_helpers.errors import StageFailed
from medcap_helpers.evaluation import ADAPTER_SYSTEM
from medcap_helpers.sharding import generate_sharded, process_environment, share_bounds, threads_per_process


def test_shares_are_contiguous_cover_every_row_and_differ_by_at_most_one() -> None:
    assert share_bounds(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert share_bounds(4, 2) == [(0, 2), (2, 4)]
    assert share_bounds(1, 2) == [(0, 1), (1, 1)]


def test_each_worker_process_gets_its_own_gpu_and_its_share_of_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))
    assert process_environment(1, 2, on_gpu=True) == {"OMP_NUM_THREADS": "16", "MKL_NUM_THREADS": "16",
                                                      "CUDA_VISIBLE_DEVICES": "5"}
    assert process_environment(0, 2, on_gpu=False, cpu_threads=1) == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert threads_per_process(64) == 1  # more processes than cores: one thread each, never none


def test_a_worker_process_runs_torch_with_the_threads_it_was_given() -> None:
    env = dict(os.environ, **process_environment(0, 2, on_gpu=False, cpu_threads=1))  # torch caps it at the cores
    done = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "1" and (os.cpu_count() or 1) > 1


@pytest.mark.slow
def test_two_processes_write_the_reports_one_process_writes_in_the_same_order(smoke_run: dict,
                                                                              tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(smoke_run["dir"], run, symlinks=True, ignore=shutil.ignore_patterns("kernel-ipc-*", ".lock*"))
    config = MedcapConfig.load(run / "config.json").replace(run_dir=str(run))
    runs.write_json(run / "config.json", config.to_dict())
    test = load_saved_dataset(run)[0]["test"]
    reports = generate_sharded(config, run / "adapter", "test", test, processes=2)
    # The same reports 06 generated in one process for the same adapter, in the same order.
    assert reports == runs.load_predictions(run, "test", list(test["image_id"]))[ADAPTER_SYSTEM]
    shares = sorted((run / "distributed" / "generate-test-adapter").glob("share-*.json"))
    assert [runs.read_json(p)["start"] for p in shares] == [0, len(test) - len(test) // 2]

    logs = sorted(p.name for p in (run / "distributed" / "generate-test-adapter").glob("process-*.log"))
    assert logs == ["process-1.log"]  # this process generated share 0 itself

    with pytest.raises(StageFailed, match="share 0, in this process"):  # a share that fails names itself
        generate_sharded(config, run / "no-such-model", "test", test, processes=2)
