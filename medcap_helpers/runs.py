"""Run folders: config, metrics, package versions and stage markers written atomically.

Layout of ``runs/<run>/``::

    config.json            the MedcapConfig of the run
    environment.json       package versions, python, git commit, device
    metrics/<stage>.json   what each stage measured
    <stage>.done           written last, only once a stage's outputs are complete
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

TRACKED_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "evaluate",
                    "pycocoevalcap", "tokenizers", "accelerate", "papermill", "ipywidgets", "numpy",
                    "pillow", "medcap")


_UMASK = os.umask(0o022)
os.umask(_UMASK)


class RunFolderError(OSError):
    """The run folder cannot be created or written; the message names the folder."""


def ensure_run_dir(run_dir: str | Path) -> Path:
    """Create ``run_dir`` (and parents) and check it is writable."""
    path = Path(run_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise RunFolderError(f"Cannot write to the run folder '{path}': {err.strerror or err}. "
                             "Choose another --out folder or fix its permissions.") from None
    return path


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes it owner-only; a run's files get normal permissions
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON atomically (never a half-written file)."""
    path = Path(path)
    with atomic_path(path) as tmp:
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
    return write_json(metrics_path(run_dir, stage), metrics)


def read_stage_metrics(run_dir: str | Path, stage: str) -> dict[str, Any]:
    path = metrics_path(run_dir, stage)
    if not path.exists():
        raise FileNotFoundError(f"Stage '{stage}' has no metrics in {run_dir}: run that stage first "
                                f"(expected {path}).")
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
    """The checked-out commit (with ``-dirty`` when there are local changes), or None outside git."""
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
