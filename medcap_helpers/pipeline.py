"""Headless runner: executes the numbered notebooks in order with papermill.

``medcap run --profile smoke`` (see :mod:`medcap_helpers.cli`) calls :func:`run_pipeline`, which
writes into ``runs/<run>/``: the config and environment, one executed notebook per stage under
``notebooks/``, each stage's metrics under ``metrics/`` and, at the end, ``summary.md``.
A stage counts as finished only once its notebook ran to the end and its metrics file exists;
rerunning a run folder skips finished stages unless ``force`` is given.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medcap_helpers import runs
from medcap_helpers.config import STAGES, TINY_MODEL, MedcapConfig
from medcap_helpers.devices import temporary_environment
from medcap_helpers.errors import ConfigError, StageFailed
from medcap_helpers.images import use_pixel_limit
from medcap_helpers.summary import write_summary

KERNEL_NAME = "python3"
_PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT_ENV = "MEDCAP_PROJECT_ROOT"
"""The one setting that tells notebooks where the project is (relative run folders resolve against it)."""


def project_root() -> Path:
    """The folder relative run folders (``runs/<profile>``) and data paths in a notebook resolve against.

    1. ``$MEDCAP_PROJECT_ROOT`` when set;
    2. else the nearest folder at or above the working directory that holds ``pyproject.toml`` and the
       stage notebooks in ``notebooks/``: a medcap checkout, whichever of its folders the kernel runs
       in (JupyterLab starts a notebook's kernel in the notebook's folder, ``notebooks/``);
    3. else the working directory.

    So ``RUN_DIR = None`` in a notebook opened from a checkout means ``<checkout>/runs/<profile>``, the
    folder ``medcap run`` (started in the checkout) writes.
    """
    configured = os.environ.get(PROJECT_ROOT_ENV, "").strip()
    if configured:
        return Path(configured).expanduser().resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "notebooks" / f"{STAGES[0]}.ipynb").is_file():
            return folder
    return here


def notebook_dir() -> Path:
    """The stage notebooks: shipped inside the package (``pip install .``), else the source checkout's
    ``notebooks/`` (``pip install -e .``)."""
    for folder in (_PACKAGE_DIR / "notebooks", _PACKAGE_DIR.parent / "notebooks"):
        if (folder / f"{STAGES[0]}.ipynb").is_file():
            return folder
    raise StageFailed(f"The stage notebooks are missing: neither {_PACKAGE_DIR / 'notebooks'} nor "
                      f"{_PACKAGE_DIR.parent / 'notebooks'} holds {STAGES[0]}.ipynb. Reinstall medcap.")


@dataclass
class StageOutcome:
    stage: str
    status: str  # "ran" | "skipped"
    seconds: float
    notebook: Path


def notebook_config(profile: str = "smoke", run_dir: str | None = None,
                    overrides: dict[str, Any] | None = None) -> MedcapConfig:
    """The config a notebook runs with: its parameters cell maps straight onto this.

    ``run_dir`` (``None``: ``runs/<profile>``) and relative paths in ``overrides`` resolve against
    :func:`project_root`, not the kernel's working directory. A run folder that already holds a
    ``config.json`` continues with its saved settings plus ``overrides``, as a rerun of ``medcap run``
    does. ``overrides`` may hold any :class:`MedcapConfig` field (the pipeline injects the whole
    config, with absolute paths).

    Locks the run folder for this kernel until the notebook's last cell records its metrics
    (:func:`medcap_helpers.runs.write_stage_metrics`); seeds Python, NumPy and torch, sets torch's CPU
    threads (``config.cpu_threads``), makes ``config.max_image_pixels`` Pillow's limit too, and
    quietens chatty libraries.
    """
    config = resolve_config(profile, run_dir, overrides, base=project_root())
    runs.lock_run(config.run_dir, holder="a notebook kernel (its lock ends when the notebook records its metrics)")
    runs.write_run_header(config)
    seed_everything(config.seed)
    set_cpu_threads(config.cpu_threads)
    use_pixel_limit(config.max_image_pixels)
    quiet_libraries()
    return config


def resolve_config(profile: str, run_dir: str | os.PathLike[str] | None = None,
                   overrides: dict[str, Any] | None = None, base: Path | None = None,
                   fresh: bool = False) -> MedcapConfig:
    """``profile``'s settings with ``overrides``, or, when the run folder already holds a ``config.json``
    (and not ``fresh``), that run's saved settings with ``overrides``; paths absolute, relative ones taken
    from ``base`` (default: the working directory). A saved run of another profile is a
    :class:`ConfigError` naming the folder."""
    values = dict(overrides or {})
    values.pop("profile", None)
    if run_dir:
        values["run_dir"] = str(run_dir)
    target = Path(values.get("run_dir") or MedcapConfig.from_profile(profile).run_dir)
    folder = _absolute(target, base or Path.cwd())
    saved = folder / "config.json"
    if saved.is_file() and not fresh:
        stored = json.loads(saved.read_text())
        if stored.get("profile") != profile:
            raise ConfigError(f"The run folder '{folder}' holds a '{stored.get('profile')}' run, not '{profile}': "
                              "choose another run folder (--out / RUN_DIR), or start it afresh (medcap run --force).")
        stored.update(values)
        config = MedcapConfig.from_dict(stored)
    else:
        config = MedcapConfig.from_profile(profile, **values)
    return absolute_paths(config.replace(run_dir=str(folder)), base)


def _absolute(path: str | os.PathLike[str], base: Path) -> Path:
    path = Path(path).expanduser()
    return (path if path.is_absolute() else base / path).resolve()


def set_cpu_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` when given (see ``MedcapConfig.cpu_threads``)."""
    if threads is not None:
        torch.set_num_threads(threads)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


HEADLESS_ENV = "MEDCAP_HEADLESS"
"""Set to "1" in the kernels ``medcap run`` starts: nobody watches a progress bar there."""
NOTEBOOK_DEFAULT_PROFILE = "smoke"
"""``PROFILE`` in every notebook's parameters cell."""
_QUIET_WARNINGS = (
    r".*gemm_4bit_forward.*",  # bitsandbytes on a CPU without its optional "kernels" package
    r".*MatMul8bitLt: inputs will be cast.*",
    r".*`use_cache=True` is incompatible with gradient checkpointing.*",
)


def headless() -> bool:
    """Whether this process runs under ``medcap run`` (papermill), where progress bars only add noise."""
    return os.environ.get(HEADLESS_ENV) == "1"


def progress_bars_enabled() -> bool:
    """Progress bars in a notebook a person runs; none in the executed notebooks of ``medcap run``."""
    return not headless()


PROGRESS_WIDGET = "application/vnd.jupyter.widget-view+json"


@contextmanager
def progress_hidden() -> Iterator[None]:
    """Around a long step in a notebook: under ``medcap run`` (:func:`headless`) drop the progress displays
    the step makes (tqdm's widgets, the Trainer's HTML progress table) and keep everything else it shows, in
    order; in a notebook a person runs, change nothing (the bars are useful there). Outside IPython, a no-op.
    """
    shell = _ipython()
    if not headless() or shell is None:
        yield
        return
    from IPython.utils.capture import capture_output

    captured = capture_output(stdout=False, stderr=False, display=True)
    outputs = captured.__enter__()
    try:
        yield
    finally:  # shown even when the step fails: what it displayed up to the error helps
        captured.__exit__(None, None, None)
        for output in outputs.outputs:
            if not _is_progress_display(output.data):
                output.display()


def _ipython() -> Any:
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover
        return None
    return get_ipython()


def _is_progress_display(data: dict[str, Any]) -> bool:
    plain = str(data.get("text/plain", ""))
    return (PROGRESS_WIDGET in data and ("%|" in plain or "FloatProgress" in plain)) \
        or "<progress" in str(data.get("text/html", ""))


def quiet_libraries() -> None:
    """Offline-friendly defaults and less noise in notebook outputs.

    Call it before the libraries load (a notebook's first cell does) so that import-time messages, such
    as bitsandbytes' note that the optional CPU kernels package is missing, stay quiet too. Under
    ``medcap run`` (:func:`headless`) the Hugging Face and ``datasets`` progress bars are off as well.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # "kernels": bitsandbytes asks it for an optional CPU kernel from the hub at import time; offline it
    # warns that it skips the publisher check, then bitsandbytes falls back to its own kernel.
    for name in ("transformers", "datasets", "peft", "bitsandbytes", "papermill", "accelerate", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for message in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    if headless():
        try:
            import datasets

            datasets.disable_progress_bars()
        except ImportError:  # pragma: no cover
            pass
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        # No "Loading weights" / "Writing model shards" bars in every cell that loads or saves a model;
        # the Trainer's bars and hub downloads (a real model's first run) keep theirs.
        hf_logging.disable_progress_bar()
        from huggingface_hub.utils import enable_progress_bars

        enable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


def stage_notebook(stage: str) -> Path:
    if stage not in STAGES:
        raise ConfigError(f"Unknown stage {stage!r}; stages are {', '.join(STAGES)}.")
    return notebook_dir() / f"{stage}.ipynb"


def parse_stages(spec: str | Sequence[str] | None) -> list[str]:
    """Stages from a spec like ``"01,03"``, ``"01-03"`` or full names; None means all."""
    if spec is None:
        return list(STAGES)
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    chosen: list[str] = []
    for item in (i.strip() for i in items if i.strip()):
        if "-" in item and item.split("-")[0].isdigit() and item.split("-")[1].isdigit():
            lo, hi = (int(x) for x in item.split("-"))
            chosen += [s for s in STAGES if lo <= int(s[:2]) <= hi]
            continue
        matches = [s for s in STAGES if s == item or s[:2] == item.zfill(2)]
        if not matches:
            raise ConfigError(f"Unknown stage {item!r}; stages are {', '.join(STAGES)}.")
        chosen += matches
    return [s for s in STAGES if s in chosen]


def run_stage(config: MedcapConfig, stage: str, force: bool = False,
              progress: bool = True) -> StageOutcome:
    """Execute one stage's notebook into the run folder (skipped when already finished)."""
    import papermill as pm

    run_dir = Path(config.run_dir)
    executed = run_dir / "notebooks" / f"{stage}.ipynb"
    if runs.is_done(run_dir, stage) and not force:
        return StageOutcome(stage, "skipped", 0.0, executed)
    runs.clear_done(run_dir, stage)
    # A stale metrics file must not make an unfinished rerun look finished.
    runs.metrics_path(run_dir, stage).unlink(missing_ok=True)
    executed.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        with temporary_environment({HEADLESS_ENV: "1", "TQDM_DISABLE": "1"}):  # inherited by the kernel
            pm.execute_notebook(
                str(stage_notebook(stage)), str(executed), parameters=injected_parameters(config),
                kernel_name=KERNEL_NAME, progress_bar=progress, cwd=str(run_dir.resolve()),
                request_save_on_cell_execute=True, store_widget_state=False, **kernel_manager_options(),
            )
    except pm.PapermillExecutionError as err:
        raise StageFailed(f"Stage {stage} failed in cell {err.exec_count}: {err.ename}: {err.evalue}\n"
                          f"The executed notebook with the error is {executed}.") from None
    if not runs.metrics_path(run_dir, stage).exists():
        raise StageFailed(f"Stage {stage} ran but wrote no metrics ({runs.metrics_path(run_dir, stage)}).")
    runs.mark_done(run_dir, stage)
    return StageOutcome(stage, "ran", time.perf_counter() - start, executed)


def injected_parameters(config: MedcapConfig) -> dict[str, Any]:
    """What papermill injects into a notebook: ``RUN_DIR``, and ``PROFILE`` and ``OVERRIDES`` only where they
    differ from the parameters cell's defaults (the settings that differ from the profile's), so the executed
    notebook shows what this run changed rather than the whole config. The notebook reads the rest from the
    run folder's ``config.json`` (:func:`resolve_config`)."""
    # Through JSON so tuples become lists: papermill writes literals of JSON-like types only.
    current = json.loads(json.dumps(config.to_dict()))
    defaults = json.loads(json.dumps(MedcapConfig.from_profile(config.profile).to_dict()))
    overrides = {key: value for key, value in current.items()
                 if key not in ("profile", "run_dir") and defaults.get(key) != value}
    parameters: dict[str, Any] = {"RUN_DIR": str(Path(config.run_dir))}
    if config.profile != NOTEBOOK_DEFAULT_PROFILE:
        parameters["PROFILE"] = config.profile
    if overrides:
        parameters["OVERRIDES"] = overrides
    return parameters


def kernel_manager_options() -> dict[str, Any]:
    """On POSIX, talk to the kernel over Unix domain sockets instead of TCP ports on localhost.

    With TCP, jupyter_client picks free ports, releases them and lets the kernel bind them; another
    process (a second run, a test session) can take one in between, and the kernel then fails with
    "ZMQError: Address already in use". IPC sockets are files named after the kernel's unique
    connection file, so there is nothing to race for (and no "running over TCP without encryption"
    warning).
    """
    if os.name != "posix":
        return {}
    from jupyter_client import AsyncKernelManager
    from traitlets import CaselessStrEnum

    class IpcKernelManager(AsyncKernelManager):
        transport = CaselessStrEnum(["tcp", "ipc"], default_value="ipc", config=True)

    return {"kernel_manager_class": IpcKernelManager}


def run_pipeline(config: MedcapConfig, stages: Sequence[str] | None = None, force: bool = False,
                 progress: bool = True) -> list[StageOutcome]:
    """Run the stages in order into ``config.run_dir`` and write ``summary.md``.

    The run folder is locked for the whole run (a second run on it stops with
    :class:`~medcap_helpers.errors.RunLocked`); the notebook kernels run under this lock.
    """
    config = absolute_paths(config)
    chosen = parse_stages(stages)
    with runs.RunLock(config.run_dir, holder="medcap run"):
        runs.wait_for_old_kernels(config.run_dir)
        previous = os.environ.get(runs.LOCK_ENV)
        os.environ[runs.LOCK_ENV] = str(Path(config.run_dir).resolve())  # inherited by the kernels
        try:
            run_dir = runs.write_run_header(config)
            outcomes: list[StageOutcome] = []
            for stage in chosen:
                stage_notebook(stage)
                print(f"[medcap] {stage} ...", flush=True)
                outcome = run_stage(config, stage, force=force, progress=progress)
                print(f"[medcap] {stage} {outcome.status}"
                      + (f" in {outcome.seconds:.0f} s" if outcome.status == "ran" else " (already finished)"),
                      flush=True)
                outcomes.append(outcome)
            runs.write_json(run_dir / "config.json", config.to_dict())
            write_summary(run_dir)
        finally:
            if previous is None:
                os.environ.pop(runs.LOCK_ENV, None)
            else:
                os.environ[runs.LOCK_ENV] = previous
    return outcomes


def absolute_paths(config: MedcapConfig, base: Path | None = None) -> MedcapConfig:
    """Paths made absolute against ``base`` (default: the caller's folder): notebooks run inside the run folder."""
    base = base or Path.cwd()
    changes: dict[str, Any] = {"run_dir": str(_absolute(config.run_dir, base))}
    for name in ("data_path", "images_dir"):
        value = getattr(config, name)
        if value:
            changes[name] = str(_absolute(value, base))
    if config.model_name != TINY_MODEL and _absolute(config.model_name, base).exists():
        changes["model_name"] = str(_absolute(config.model_name, base))
    return config.replace(**changes)
