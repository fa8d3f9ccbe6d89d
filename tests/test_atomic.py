"""One atomic writer: files and folders appear complete or not at all, even when the writer is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medcap_helpers import atomic


def _fill(folder: Path, marker: str, n: int = 3) -> None:
    for i in range(n):
        (folder / f"part{i}.txt").write_text(marker)
    (folder / "done.txt").write_text(marker)


def _content(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


def test_a_failed_file_write_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "x.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic.atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]


def test_files_get_normal_permissions(tmp_path: Path) -> None:
    path = atomic.write_text(tmp_path / "a.json", "{}")
    assert path.stat().st_mode & 0o044 == 0o044  # group/other can read, like any file the user writes


@pytest.mark.parametrize("with_exchange", [True, False], ids=["renameat2-exchange", "rename-fallback"])
def test_folder_replacement(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_exchange: bool) -> None:
    if not with_exchange:
        monkeypatch.setattr(atomic, "_RENAMEAT2", None)
    target = tmp_path / "adapter"
    with atomic.atomic_folder(target) as staging:
        _fill(staging, "v1")
    assert _content(target)["done.txt"] == "v1"
    with pytest.raises(RuntimeError), atomic.atomic_folder(target) as staging:
        _fill(staging, "v2", n=1)
        raise RuntimeError("crash while saving")
    assert set(_content(target).values()) == {"v1"}
    with atomic.atomic_folder(target) as staging:
        _fill(staging, "v2")
    assert set(_content(target).values()) == {"v2"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


@pytest.mark.skipif(atomic._RENAMEAT2 is None, reason="renameat2 is Linux-only")
def test_exchange_swaps_two_folders_in_one_step(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    (first / "f").write_text("a"), (second / "f").write_text("b")
    assert atomic.exchange(first, second)
    assert (first / "f").read_text() == "b" and (second / "f").read_text() == "a"


def test_a_crash_between_the_fallback_renames_is_recovered(tmp_path: Path) -> None:
    """Without RENAME_EXCHANGE the old folder is renamed aside first; if the writer dies right then,
    the next reader or writer puts it back."""
    target = tmp_path / "model"
    target.mkdir()
    _fill(target, "old")
    os.replace(target, atomic._backup_of(target))  # the moment a killed fallback writer could leave
    assert atomic.folder_ready(target, "done.txt")
    assert set(_content(target).values()) == {"old"}


WRITER = """
import sys, time
from pathlib import Path
from medcap_helpers import atomic
target = Path(sys.argv[1])
with atomic.atomic_folder(target) as staging:
    for i in range(200):
        (staging / f"part{i}.txt").write_text("new")
        if i == 5:
            print("writing", flush=True)
        time.sleep(0.02)
    (staging / "done.txt").write_text("new")
"""


@pytest.mark.parametrize("with_exchange", [True, False], ids=["renameat2-exchange", "rename-fallback"])
def test_a_writer_killed_mid_write_leaves_the_old_folder_intact(tmp_path: Path, with_exchange: bool) -> None:
    target = tmp_path / "dataset"
    with atomic.atomic_folder(target) as staging:
        _fill(staging, "old")
    script = WRITER if with_exchange else WRITER.replace("from medcap_helpers import atomic",
                                                         "from medcap_helpers import atomic\natomic._RENAMEAT2 = None")
    writer = subprocess.Popen([sys.executable, "-c", script, str(target)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None and writer.stdout.readline().strip() == "writing"
    time.sleep(0.1)
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    assert atomic.folder_ready(target, "done.txt")
    assert set(_content(target).values()) == {"old"}
    with atomic.atomic_folder(target) as staging:  # the next write cleans up what the killed one left
        _fill(staging, "next")
    assert set(_content(target).values()) == {"next"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset"]
