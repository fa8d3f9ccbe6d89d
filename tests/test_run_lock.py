"""One writer per run folder: a second run is told who holds the folder; a killed holder's lock is free."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from medcap_helpers import runs
from medcap_helpers.cli import main
from medcap_helpers.errors import RunLocked
from medcap_helpers.pipeline import notebook_config

HOLDER = """
import sys, time
from medcap_helpers import runs
lock = runs.RunLock(sys.argv[1], holder="test holder").acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_writer_is_told_who_holds_the_folder(tmp_path: Path) -> None:
    with runs.RunLock(tmp_path, holder="medcap run"):
        with pytest.raises(RunLocked) as caught:
            runs.RunLock(tmp_path).acquire()
    message = str(caught.value)
    assert f"pid {os.getpid()}" in message and socket.gethostname() in message and "since" in message
    assert "medcap run" in message and str(tmp_path.resolve()) in message
    runs.RunLock(tmp_path).acquire().release()  # free again once released


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked, match=f"pid {holder.pid}"):
            runs.RunLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    lock = runs.RunLock(tmp_path).acquire()  # the stale lock file is still there, the lock is not
    assert lock.held and (tmp_path / runs.LOCK_NAME).is_file()
    lock.release()


def test_a_notebook_holds_the_run_until_it_records_its_metrics(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    config = notebook_config("smoke", str(run_dir))
    with pytest.raises(RunLocked, match="notebook kernel"):
        runs.RunLock(run_dir).acquire()
    notebook_config("smoke", str(run_dir))  # the same kernel running its cells again is fine
    runs.write_stage_metrics(config.run_dir, "01_data", {"examples": 1})
    runs.RunLock(run_dir).acquire().release()


KERNEL = """
import os, sys, time
from medcap_helpers import runs
os.environ[runs.LOCK_ENV] = sys.argv[1]
runs.lock_run(sys.argv[1], "kernel")
print("kernel locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_kernels_started_by_the_pipeline_run_under_its_lock(tmp_path: Path) -> None:
    """A kernel of a run takes the kernel lock, not the run lock; a new run waits for a leftover kernel."""
    run_dir = str(tmp_path.resolve())
    with runs.RunLock(tmp_path, holder="medcap run"):
        kernel = subprocess.Popen([sys.executable, "-c", KERNEL, run_dir, "1.5"], stdout=subprocess.PIPE, text=True)
        assert kernel.stdout is not None and kernel.stdout.readline().strip() == "kernel locked"
        with pytest.raises(RunLocked, match="a notebook kernel of medcap run"):
            runs.wait_for_old_kernels(tmp_path, wait_s=0)
        runs.wait_for_old_kernels(tmp_path, wait_s=30)  # returns once the leftover kernel has exited
        assert kernel.wait(timeout=30) == 0


def test_the_cli_says_the_folder_is_busy_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with runs.RunLock(tmp_path, holder="medcap run"):
        status = main(["run", "--profile", "smoke", "--out", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert status == 2
    assert "is in use by medcap run" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_errors_are_one_line_unless_debug(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--profile", "smoke", "--out", str(tmp_path), "--set", "lora_r=0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medcap: configuration error: lora_r") and "Traceback" not in err
    assert main(["--debug", "run", "--profile", "smoke", "--out", str(tmp_path), "--set", "lora_r=0"]) == 2
    assert "Traceback" in capsys.readouterr().err
