"""`pip install .` (not editable) of a clean copy, then `medcap run` from another folder: the notebooks
ship inside the package and the run's summary has no dead link."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IGNORED = shutil.ignore_patterns(".git", ".venv", "runs", "data", "*.egg-info", "__pycache__", ".pytest_cache",
                                 "build", ".whl", ".installed")


def relative_links(markdown: str) -> list[str]:
    """Targets of markdown links and images that are not URLs or anchors."""
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", markdown) if not re.match(r"^[a-z]+://|^#", t)]


def test_relative_links_are_found() -> None:
    text = "see [a](metrics/a.json), ![p](figures/p.png), [web](https://x.org/y) and [top](#top)"
    assert relative_links(text) == ["metrics/a.json", "figures/p.png"]


@pytest.mark.slow
def test_a_plain_install_runs_the_pipeline_from_anywhere(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    shutil.copytree(REPO, clone, ignore=IGNORED)
    target = tmp_path / "site"
    # --no-deps: the dependencies are this interpreter's; what is tested is the package as built.
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(clone)], check=True, capture_output=True, text=True)
    shutil.rmtree(clone)  # nothing may be read from a source tree
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import medcap_helpers; print(medcap_helpers.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(target)), where
    assert sorted(p.name for p in (target / "medcap_helpers" / "notebooks").glob("*.ipynb"))[0] == "01_data.ipynb"
    run = subprocess.run([sys.executable, "-m", "medcap_helpers.cli", "run", "--profile", "smoke", "--out", "x",
                          "--no-progress"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    run_dir = elsewhere / "x"
    summary = (run_dir / "summary.md").read_text()
    links = relative_links(summary)
    assert any(link.startswith("notebooks/") for link in links) and any(link.startswith("figures/") for link in links)
    dead = [link for link in links if not (run_dir / link).exists()]
    assert not dead, f"summary.md links to missing files: {dead}"
