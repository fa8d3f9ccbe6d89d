"""Shared fixtures. Tests that need ../shared skip with a reason when it is absent (a user's clone)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from medcap_helpers import runs
from medcap_helpers.config import STAGES, MedcapConfig
from medcap_helpers.pipeline import run_pipeline

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("MEDCAP_SHARED_DIR", REPO_ROOT.parent / "shared"))
IU_SAMPLE = SHARED_DIR / "iu_xray_sample"
BLIP_LARGE_REFERENCE = SHARED_DIR / "reference" / "blip_large_config.json"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def iu_sample() -> Path:
    """The real 18-image IU X-Ray sample in ../shared (skips when absent, as on a user's clone)."""
    if not IU_SAMPLE.is_dir():
        pytest.skip(f"{IU_SAMPLE} is absent: the real IU X-Ray sample ships with the project's CI only")
    return IU_SAMPLE


@pytest.fixture(scope="session")
def blip_large_reference() -> Path:
    if not BLIP_LARGE_REFERENCE.is_file():
        pytest.skip(f"{BLIP_LARGE_REFERENCE} is absent")
    return BLIP_LARGE_REFERENCE


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The whole smoke pipeline, once per session: CI's end-to-end run and the reference of other tests."""
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    config = MedcapConfig.from_profile("smoke", run_dir=str(run_dir))
    start = time.perf_counter()
    outcomes = run_pipeline(config, progress=False)
    seconds = time.perf_counter() - start
    print(f"smoke pipeline 01 → 06: {seconds:.0f} s")
    metrics = {stage: runs.read_stage_metrics(run_dir, stage) for stage in STAGES}
    return {"dir": run_dir, "outcomes": outcomes, "metrics": metrics, "seconds": seconds, "config": config}


@pytest.fixture
def synthetic_iu(tmp_path: Path):  # -> tests.fixtures.SyntheticIU
    """A tiny synthetic IU X-Ray in the Open-i, Kaggle and R2Gen layouts (no shared files needed)."""
    from tests.fixtures import write_synthetic_iu

    return write_synthetic_iu(tmp_path / "synthetic_iu")


@pytest.fixture(autouse=True)
def fresh_generation_batch_sizes():
    """What one test's simulated out-of-memory teaches ``generate_reports`` stays in that test."""
    from medcap_helpers import generation

    generation._batch_size_after_oom.clear()
    yield
    generation._batch_size_after_oom.clear()
