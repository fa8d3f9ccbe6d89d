"""The training profiler (``profile_dir``): it records the asked-for optimizer steps of stage 03."""

from __future__ import annotations

import gzip
import json

from medcap_helpers.train import train
from tests.test_train import qlora_model, smoke_config, synthetic_rows


def train_with_profile_dir(tmp_path, batch_size):
    """One epoch of the 8 synthetic rows at ``batch_size`` with ``profile_dir`` set; returns that folder."""
    folder = tmp_path / "profile"
    config = smoke_config(tmp_path / "run", per_device_train_batch_size=batch_size, num_train_epochs=1.0,
                          profile_dir=str(folder))
    model, processor = qlora_model(config)
    rows = synthetic_rows()
    train(config, model, processor, {"train": rows, "validation": rows[:2]})
    return folder


def test_profile_dir_records_steps_four_to_seven(tmp_path):
    # 8 rows at batch 1: 8 optimizer steps, so the default window (after 3, then 4) fits with one to spare
    folder = train_with_profile_dir(tmp_path, batch_size=1)

    summary = json.loads((folder / "profile_rank0.json").read_text())
    assert summary["steps"] == 4
    assert 0 < summary["wall_s"]
    assert summary["gpu_busy_s"] == 0 and summary["gpu_busy_share"] == 0  # a CPU run has no kernels
    tables = (folder / "profile_rank0.txt").read_text()
    assert "4 optimizer steps" in tables and ("aten::addmm" in tables or "aten::mm" in tables)
    with gzip.open(folder / "trace_rank0.json.gz", "rt") as trace:
        events = json.load(trace)["traceEvents"]
    assert any(e.get("name", "").startswith("aten::") for e in events)
    assert not (folder / "trace_rank0.json").exists()


def test_no_profile_without_profile_dir(tmp_path):
    config = smoke_config(tmp_path / "run", per_device_train_batch_size=4, num_train_epochs=1.0)
    assert config.profile_dir is None
    model, processor = qlora_model(config)
    rows = synthetic_rows()
    train(config, model, processor, {"train": rows, "validation": rows[:2]})
    assert not list(tmp_path.rglob("profile_rank*"))


def test_too_short_a_training_says_that_nothing_was_profiled(tmp_path, capsys):
    # 8 rows at batch 4: 2 optimizer steps, fewer than the 3 the profiler skips
    folder = train_with_profile_dir(tmp_path, batch_size=4)
    assert not folder.exists()
    assert f"Nothing profiled into {folder}: training ran 2 optimizer step(s)" in capsys.readouterr().out
