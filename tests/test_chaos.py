"""Killed anywhere, nothing lost: SIGKILL `medcap run` mid-stage, rerun, same metrics as an uninterrupted run.

CI runs one kill (seeded); ``python scripts/chaos.py --kills 10`` runs more (see its docstring).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

CHAOS = Path(__file__).resolve().parents[1] / "scripts" / "chaos.py"


def load_chaos():
    spec = importlib.util.spec_from_file_location("chaos", CHAOS)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules["chaos"] = module
    spec.loader.exec_module(module)
    return module


def test_comparison_ignores_timings_and_paths_but_not_results() -> None:
    chaos = load_chaos()
    first = {"test_table": {"m": {"CIDEr": 0.5}}, "wall_time_s": 3.0, "adapter_dir": "/a", "epochs": [{"loss": 1.0}],
             "trials": [{"val_cider": 0.1, "process_id": 101}]}
    same = {"test_table": {"m": {"CIDEr": 0.5}}, "wall_time_s": 9.0, "adapter_dir": "/b", "epochs": [{"loss": 1.0}],
            "trials": [{"val_cider": 0.1, "process_id": 202}]}  # who trained a trial is not a result
    other = {"test_table": {"m": {"CIDEr": 0.6}}, "wall_time_s": 3.0, "adapter_dir": "/a", "epochs": [{"loss": 1.0}],
             "trials": [{"val_cider": 0.1, "process_id": 101}]}
    assert chaos.differences(chaos.comparable(first), chaos.comparable(same)) == []
    assert chaos.differences(chaos.comparable(first), chaos.comparable(other)) == [".test_table.m.CIDEr: 0.5 != 0.6"]


@pytest.mark.slow
def test_a_run_killed_mid_stage_finishes_with_the_same_metrics(smoke_run: dict, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    chaos = load_chaos()
    status = chaos.main(["--kills", "1", "--seed", "9", "--out", str(tmp_path / "run"),
                         "--reference", str(smoke_run["dir"])])
    report = capsys.readouterr().out
    assert status == 0, report
    assert '"kills_landed": 1' in report and "'target_stage': '03_qlora_train'" in report, report
