"""Run folders: config, metrics, predictions, package versions, stage markers and the run lock.

Layout of ``runs/<run>/``::

    config.json              the MedcapConfig of the run
    environment.json         package versions, python, git commit, device
    metrics/<stage>.json     what each stage measured
    predictions/<split>.json every system's reports for a split, by image id
    <stage>.done             written last, only once a stage's outputs are complete
    .lock                    who is writing the run (see :class:`RunLock`)

Every file is written through :mod:`medcap_helpers.atomic`.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import platform
import socket
import subprocess
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import IO, Any

from medcap_helpers.atomic import atomic_file
from medcap_helpers.config import STAGES
from medcap_helpers.errors import RunFolderError, RunLocked, StageNotRun

TRACKED_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "evaluate",
                    "pycocoevalcap", "tokenizers", "accelerate", "papermill", "ipywidgets", "numpy",
                    "pillow", "medcap")


DEMO_PAGE_NOTEBOOK = Path(__file__).resolve().parent / "demo_page" / "demo.ipynb"
"""The Voilà page ``medcap demo`` serves for a finished run (no code shown): it calls ``demo.show_page``."""
DEMO_RUN_ENV = "MEDCAP_DEMO_RUN"
"""The run folder the page shows, set by ``medcap demo --run RUN_DIR`` for the page's kernel."""


def check_finished_run(run_dir: str | os.PathLike[str]) -> Path:
    """The absolute run folder when every stage finished there, else :class:`StageNotRun` saying which
    command makes (or finishes) the run."""
    run = Path(run_dir).expanduser().resolve()
    saved = run / "config.json"
    if not saved.is_file():
        raise StageNotRun(f"No medcap run in '{run}'. Make one first: medcap run --profile smoke --out {run} "
                          "(minutes on a CPU), or point --run at a finished run folder.")
    missing = [stage for stage in STAGES if not is_done(run, stage)]
    if missing:
        profile = read_json(saved).get("profile", "smoke")
        raise StageNotRun(f"The run in '{run}' is not finished ({', '.join(missing)} not done). Finish it with: "
                          f"medcap run --profile {profile} --out {run}")
    return run


def ensure_run_dir(run_dir: str | Path) -> Path:
    """Create ``run_dir`` (and parents) and check it is writable."""
    path = Path(run_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test.{os.getpid()}"  # per process: data-parallel processes check at once
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise RunFolderError(f"Cannot write to the run folder '{path}': {err.strerror or err}. "
                             "Choose another --out folder or fix its permissions.") from None
    return path


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON atomically (never a half-written file)."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")
    return path


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"Cannot store {type(value).__name__} in JSON")


def metrics_path(run_dir: str | Path, stage: str) -> Path:
    return Path(run_dir) / "metrics" / f"{stage}.json"


def write_stage_metrics(run_dir: str | Path, stage: str, metrics: dict[str, Any]) -> Path:
    """Record a stage's metrics (a notebook's last cell); a notebook's lock on the run ends here."""
    path = write_json(metrics_path(run_dir, stage), metrics)
    release_run(run_dir)
    return path


def read_stage_metrics(run_dir: str | Path, stage: str) -> dict[str, Any]:
    path = metrics_path(run_dir, stage)
    if not path.exists():
        raise StageNotRun(f"Stage '{stage}' has no metrics in '{Path(run_dir).resolve()}': run that stage first "
                          f"(expected {path.name} there).")
    return read_json(path)


def mark_done(run_dir: str | Path, stage: str) -> None:
    write_json(Path(run_dir) / f"{stage}.done", {"stage": stage})


def is_done(run_dir: str | Path, stage: str) -> bool:
    return (Path(run_dir) / f"{stage}.done").exists()


def clear_done(run_dir: str | Path, stage: str) -> None:
    (Path(run_dir) / f"{stage}.done").unlink(missing_ok=True)


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(repo: str | Path | None = None) -> str | None:
    """The checked-out commit (with ``-dirty`` when there are local changes), or None outside git.

    ``MEDCAP_GIT_COMMIT`` wins when set: a copy of the tree on another machine (the GPU machine) may
    carry a stale ``.git`` or none.
    """
    if os.environ.get("MEDCAP_GIT_COMMIT"):
        return os.environ["MEDCAP_GIT_COMMIT"]
    cwd = Path(repo) if repo else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        # A copy of the tree without .git (e.g. a remote GPU machine) can be told its commit.
        return os.environ.get("MEDCAP_GIT_COMMIT")
    return sha + ("-dirty" if dirty else "")


def environment_info() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "packages": package_versions(), "git_commit": git_commit()}
    try:
        import torch

        info["cuda"] = torch.version.cuda
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def write_run_header(config: Any) -> Path:
    """Create the run folder and record the config and environment in it."""
    run_dir = ensure_run_dir(config.run_dir)
    write_json(run_dir / "config.json", config.to_dict())
    write_json(run_dir / "environment.json", environment_info())
    return run_dir


# --- predictions ----------------------------------------------------------------------------------
def predictions_path(run_dir: str | Path, split_name: str) -> Path:
    return Path(run_dir) / "predictions" / f"{split_name}.json"


def save_predictions(run_dir: str | Path, split_name: str, systems: dict[str, Sequence[str]],
                     image_ids: Sequence[str]) -> Path:
    """Add ``systems``' predictions to ``predictions/<split>.json`` (keyed by image id, for reuse and audit)."""
    path = predictions_path(run_dir, split_name)
    stored = read_json(path) if path.exists() else {"image_id": list(image_ids), "systems": {}}
    if stored["image_id"] != list(image_ids):
        raise RunFolderError(f"{path} was written for other {split_name} images: delete it and rerun 02_baseline.")
    stored["systems"].update({name: list(predictions) for name, predictions in systems.items()})
    return write_json(path, stored)


BEST_EPOCH_PREDICTIONS = "validation_best_epoch.json"


def save_best_epoch_predictions(run_dir: str | Path, image_ids: Sequence[str], reports: Sequence[str],
                                checkpoint: str) -> Path:
    """The validation reports training generated with the adapter it kept (stage 05 reuses them)."""
    path = Path(run_dir) / "predictions" / BEST_EPOCH_PREDICTIONS
    write_json(path, {"image_id": list(image_ids), "reports": list(reports), "checkpoint": checkpoint})
    return path


def forget_best_epoch_predictions(run_dir: str | Path) -> None:
    """Training starts: reports of an earlier training must not pass for this one's."""
    (Path(run_dir) / "predictions" / BEST_EPOCH_PREDICTIONS).unlink(missing_ok=True)


def load_best_epoch_predictions(run_dir: str | Path, image_ids: Sequence[str]) -> list[str] | None:
    """:func:`save_best_epoch_predictions`' reports when they cover exactly ``image_ids``, else None."""
    path = Path(run_dir) / "predictions" / BEST_EPOCH_PREDICTIONS
    if not path.exists():
        return None
    stored = read_json(path)
    return list(stored["reports"]) if stored.get("image_id") == list(image_ids) else None


def load_predictions(run_dir: str | Path, split_name: str, image_ids: Sequence[str]) -> dict[str, list[str]]:
    path = predictions_path(run_dir, split_name)
    if not path.exists():
        raise StageNotRun(f"No saved {split_name} predictions in '{path.resolve()}': run 02_baseline first.")
    stored = read_json(path)
    if stored["image_id"] != list(image_ids):
        raise RunFolderError(f"{path} was written for other {split_name} images: rerun 02_baseline.")
    return stored["systems"]


# --- one writer per run folder --------------------------------------------------------------------
LOCK_NAME = ".lock"
KERNEL_LOCK_NAME = ".lock.kernel"
"""Held by a notebook kernel the pipeline started, for its lifetime: a kernel outlives a killed
``medcap run`` by a moment (until it notices its parent is gone), and the next run waits for it."""
LOCK_ENV = "MEDCAP_LOCKED_RUN"
"""Set by the pipeline for the notebook kernels it starts: they run under its lock."""


class RunLock:
    """An exclusive lock on a run folder, held while a run (CLI) or a notebook writes it.

    ``fcntl.flock`` on ``<run>/.lock``: the kernel drops it when the holder exits, however it exits,
    so a lock left by a killed process is free for the next run. The file records the holder (pid,
    host, since) for the message a second writer gets.
    """

    def __init__(self, run_dir: str | Path, holder: str = "medcap run", name: str = LOCK_NAME) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.holder = holder
        self.name = name
        self._handle: IO[str] | None = None

    @property
    def path(self) -> Path:
        return self.run_dir / self.name

    def acquire(self, wait_s: float = 0.0) -> RunLock:
        """Take the lock (retrying for up to ``wait_s`` seconds) or raise :class:`RunLocked` saying who holds it."""
        ensure_run_dir(self.run_dir)
        handle = open(self.path, "a+")
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                handle.seek(0)
                raw = handle.read()
                handle.close()
                raise RunLocked(f"The run folder '{self.run_dir}' is in use by {_describe_holder(raw)}. Wait for "
                                "it to finish, stop it, or choose another folder (--out / RUN_DIR).") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "holder": self.holder,
                                 "since": datetime.datetime.now().isoformat(timespec="seconds")}))
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    @property
    def held(self) -> bool:
        return self._handle is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _describe_holder(raw: str) -> str:
    try:
        info = json.loads(raw)
        return (f"{info.get('holder', 'another process')} (pid {info['pid']} on {info['host']}, "
                f"since {info['since']})")
    except (ValueError, KeyError, TypeError):
        return "another process"


_HELD: dict[Path, RunLock] = {}
_KERNEL_LOCKS: list[RunLock] = []


def lock_run(run_dir: str | Path, holder: str) -> RunLock:
    """Lock ``run_dir`` for this process (once). Under a pipeline that holds the run's lock (a kernel
    it started), the kernel's own lock (:data:`KERNEL_LOCK_NAME`) is taken instead, for the kernel's life."""
    key = Path(run_dir).resolve()
    lock = _HELD.get(key)
    if lock is None or not lock.held:
        if os.environ.get(LOCK_ENV) == str(key):
            lock = RunLock(key, "a notebook kernel of medcap run", KERNEL_LOCK_NAME).acquire(wait_s=60)
            _KERNEL_LOCKS.append(lock)  # never released: it ends with the kernel
            return lock
        lock = _HELD[key] = RunLock(key, holder).acquire()
    return lock


def wait_for_old_kernels(run_dir: str | Path, wait_s: float = 60.0) -> None:
    """Wait until no kernel of an earlier (killed) pipeline run still works in ``run_dir``."""
    RunLock(run_dir, "medcap run", KERNEL_LOCK_NAME).acquire(wait_s=wait_s).release()


def release_run(run_dir: str | Path) -> None:
    """Release this process's lock on ``run_dir`` (if it holds one)."""
    lock = _HELD.pop(Path(run_dir).resolve(), None)
    if lock is not None:
        lock.release()
