"""Stepping through the tutorial: notebooks find the run folder wherever their kernel runs.

JupyterLab starts a notebook's kernel in the notebook's folder (``notebooks/``); ``RUN_DIR = None`` must
still mean ``<project>/runs/<profile>``, the folder ``medcap run`` writes, and every message names the
absolute folder it looked in.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from medcap_helpers import runs
from medcap_helpers.config import STAGES, ConfigError, MedcapConfig
from medcap_helpers.data import load_saved_dataset
from medcap_helpers.errors import StageNotRun
from medcap_helpers.pipeline import PROJECT_ROOT_ENV, notebook_config, project_root


@pytest.fixture
def checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A medcap checkout (pyproject.toml and the stage notebooks), the kernel working in its notebooks/."""
    root = tmp_path / "medcap"
    (root / "notebooks").mkdir(parents=True)
    (root / "pyproject.toml").write_text('[project]\nname = "medcap"\n')
    for stage in STAGES:
        (root / "notebooks" / f"{stage}.ipynb").write_text("{}")
    monkeypatch.delenv(PROJECT_ROOT_ENV, raising=False)
    monkeypatch.chdir(root / "notebooks")
    return root


@pytest.fixture(autouse=True)
def keep_pillows_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)


def _config(*args: object) -> MedcapConfig:
    config = notebook_config(*args)  # type: ignore[arg-type]
    runs.release_run(config.run_dir)  # as the notebook's last cell does
    return config


def test_a_kernel_in_notebooks_finds_the_project_root(checkout: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    assert project_root() == checkout.resolve()
    monkeypatch.chdir(checkout / "notebooks" / "..")
    assert project_root() == checkout.resolve()
    monkeypatch.setenv(PROJECT_ROOT_ENV, str(tmp_path / "elsewhere"))  # the one setting wins
    assert project_root() == (tmp_path / "elsewhere").resolve()
    monkeypatch.delenv(PROJECT_ROOT_ENV)
    monkeypatch.chdir(tmp_path)  # outside any checkout: the working directory
    assert project_root() == tmp_path.resolve()


def test_run_dir_none_is_the_folder_medcap_run_writes(checkout: Path) -> None:
    config = _config("smoke", None, {})
    assert config.run_dir == str(checkout.resolve() / "runs" / "smoke")
    assert (checkout / "runs" / "smoke" / "config.json").is_file()
    assert not (checkout / "notebooks" / "runs").exists()
    relative = _config("smoke", "runs/mine", {"data_path": "data/reports"})
    assert relative.run_dir == str(checkout.resolve() / "runs" / "mine")
    assert relative.data_path == str(checkout.resolve() / "data" / "reports")


def test_messages_name_the_absolute_folder_they_looked_in(checkout: Path) -> None:
    config = _config("smoke", None, {})
    with pytest.raises(StageNotRun) as raised:
        load_saved_dataset(config.run_dir)
    assert f"'{checkout.resolve() / 'runs' / 'smoke' / 'dataset'}'" in str(raised.value)


def test_a_run_folder_continues_with_its_saved_settings(checkout: Path) -> None:
    run = checkout / "runs" / "smoke"
    run.mkdir(parents=True)
    saved = MedcapConfig.from_profile("smoke", run_dir="/somewhere/it/was/before", smoke_num_reports=32, lora_r=4)
    (run / "config.json").write_text(json.dumps(saved.to_dict()))
    config = _config("smoke", None, {"lora_r": 16})
    assert (config.smoke_num_reports, config.lora_r, config.run_dir) == (32, 16, str(run.resolve()))
    with pytest.raises(ConfigError, match=f"'{run.resolve()}' holds a 'smoke' run, not 'full'"):
        notebook_config("full", "runs/smoke", {})


def test_notebook_config_makes_the_pixel_limit_pillows_too(checkout: Path) -> None:
    config = _config("smoke", None, {"max_image_pixels": 1_234_567})
    assert Image.MAX_IMAGE_PIXELS == config.max_image_pixels == 1_234_567
