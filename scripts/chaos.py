"""Kill `medcap run` at random moments, rerun it, and check nothing was lost.

    python scripts/chaos.py --kills 10 --seed 0 --out /tmp/chaos --reference runs/smoke

Each round starts ``medcap run --profile smoke --out OUT`` and SIGKILLs it (the whole process
group) at a seeded random moment inside a seeded random stage, weighted so the kills cover all six
stages in pipeline order; the moment is drawn from the stage's duration in the reference run. After
the last kill a plain rerun must finish, and its recorded metrics must equal the reference run's
(an uninterrupted run with the same settings) once timings, memory and paths are left out.
Prints one line per kill and a JSON summary; exit status 0 when every figure matches.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nbformat

from medcap_helpers import runs
from medcap_helpers.config import STAGES

VOLATILE = ("time", "_s", "seconds", "runtime", "memory", "peak", "rss", "_gb", "dir", "path", "resumed_from",
            "skipped", "checkpoint", "latency", "device", "budget_note", "samples_per_second", "steps_per_second",
            "flos", "convert", "note", "process_id")


def comparable(value: Any, key: str = "") -> Any:
    """``value`` without the fields that legitimately differ between two runs (timings, memory, paths)."""
    if isinstance(value, dict):
        return {k: comparable(v, k) for k, v in sorted(value.items()) if not any(s in k.lower() for s in VOLATILE)}
    if isinstance(value, list):
        return [comparable(v, key) for v in value]
    if isinstance(value, float):
        return round(value, 9) if math.isfinite(value) else str(value)
    return value


def differences(first: Any, second: Any, where: str = "") -> list[str]:
    if isinstance(first, dict) and isinstance(second, dict):
        out = []
        for key in sorted(set(first) | set(second)):
            out += differences(first.get(key), second.get(key), f"{where}.{key}")
        return out
    if isinstance(first, list) and isinstance(second, list) and len(first) == len(second):
        return [d for i, (a, b) in enumerate(zip(first, second)) for d in differences(a, b, f"{where}[{i}]")]
    return [] if first == second else [f"{where}: {first!r} != {second!r}"]


def stage_durations(reference: Path) -> dict[str, float]:
    durations = {}
    for stage in STAGES:
        book = nbformat.read(reference / "notebooks" / f"{stage}.ipynb", as_version=4)
        durations[stage] = float(book.metadata.get("papermill", {}).get("duration") or 10.0)
    return durations


def medcap_command(out: Path) -> list[str]:
    return [sys.executable, "-m", "medcap_helpers.cli", "run", "--profile", "smoke", "--out", str(out),
            "--no-progress"]


def running_stage(out: Path) -> str | None:
    return next((stage for stage in STAGES if not runs.is_done(out, stage)), None)


def kill_once(out: Path, stage: str, fraction: float, durations: dict[str, float], log: Path) -> dict[str, Any]:
    """Start a run, wait until ``stage`` is running plus ``fraction`` of its duration, SIGKILL the group."""
    with open(log, "a") as handle:
        process = subprocess.Popen(medcap_command(out), stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        start = time.monotonic()
        while process.poll() is None and STAGES.index(running_stage(out) or STAGES[-1]) < STAGES.index(stage):
            time.sleep(0.1)
        stage_start = time.monotonic()
        time.sleep(fraction * durations[stage])
        killed_in = running_stage(out) if process.poll() is None else None
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return {"target_stage": stage, "killed_in": killed_in, "after_s": round(time.monotonic() - start, 1),
            "into_stage_s": round(time.monotonic() - stage_start, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="run folder to torment (created)")
    parser.add_argument("--reference", type=Path, required=True, help="a finished uninterrupted smoke run")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    durations = stage_durations(args.reference)
    # With six kills or more every stage gets at least one; the rest land at random.
    every = list(range(len(STAGES))) if args.kills >= len(STAGES) else []
    targets = sorted(every + rng.choices(range(len(STAGES)), k=args.kills - len(every)))
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out.parent / f"{args.out.name}.chaos.log"
    kills = []
    for index in targets:
        record = kill_once(args.out, STAGES[index], rng.uniform(0.05, 0.95), durations, log)
        kills.append(record)
        print(f"kill {len(kills)}: {record}", flush=True)
    final = subprocess.run(medcap_command(args.out), capture_output=True, text=True)
    result: dict[str, Any] = {"kills": kills, "rerun_status": final.returncode}
    if final.returncode != 0:
        result["rerun_output"] = final.stdout[-2000:] + final.stderr[-2000:]
    else:
        mismatches = []
        for stage in STAGES:
            mismatches += differences(comparable(runs.read_stage_metrics(args.reference, stage)),
                                      comparable(runs.read_stage_metrics(args.out, stage)), stage)
        result["mismatches"] = mismatches
    result["ok"] = final.returncode == 0 and not result.get("mismatches")
    result["kills_landed"] = sum(1 for k in kills if k["killed_in"])
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
