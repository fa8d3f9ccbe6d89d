"""``benchmarks/make_table.py``: the README's table of whole rehearsal runs, from ``full_profile.json``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from make_table import measured_runs_table  # noqa: E402


def whole_run(commit: str, seconds: float, peak: float) -> dict:
    return {"environment": {"git_commit": commit, "gpu": "NVIDIA H200"}, "total_seconds": 2 * seconds,
            "peak_process_gpu_gb": peak,
            "stages": {"01_data": {"seconds": seconds, "notebook_seconds": seconds - 20, "peak_process_gpu_gb": None},
                       "02_baseline": {"seconds": seconds, "peak_process_gpu_gb": peak}}}


def test_each_whole_run_gets_a_column_newest_first_and_a_partial_run_none() -> None:
    profile = {"today": {"stages": {"01_data": {}, "02_baseline": {}}},
               "after": whole_run("d6e5e6d75e39", 60.0, 3.91),
               "after_earlier": [whole_run("e6bc537aaaa", 30.0, 4.04),
                                 {"environment": {"git_commit": "0000000"}, "stages": {"01_data": {"seconds": 1.0}}}]}
    lines = measured_runs_table(profile)
    assert lines[2] == "| stage | `d6e5e6d`, H200 | `e6bc537`, H200 |"  # the partial run has no column
    assert lines[4] == "| 01_data | 1.0 min (notebook 40 s), CPU only | 30 s (notebook 10 s), CPU only |"
    assert lines[5] == "| 02_baseline | 1.0 min, 3.91 GB | 30 s, 4.04 GB |"
    assert lines[6] == "| **01 → 06** | **2.0 min**, 3.91 GB | **1.0 min**, 4.04 GB |"
    assert measured_runs_table({**profile, "after_earlier": []}) == []  # one run: the main table says it all
