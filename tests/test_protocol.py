"""Numbers a user can set beside published IU X-Ray results: one row per study, the protocol in one line,
published figures with their sources."""

from __future__ import annotations

from pathlib import Path

import pytest

from medcap_helpers import evaluation, runs
from medcap_helpers.config import MedcapConfig
from medcap_helpers.pipeline import run_pipeline


def test_the_protocol_line_says_split_views_and_scoring() -> None:
    full = MedcapConfig.from_profile("full")
    line = evaluation.protocol_line(full, 590)
    for fragment in ("R2Gen split (2,069 / 296 / 590 studies)", "590 test studies, one report per study",
                     "both views of a study as one input", "R2Gen's text cleaning", "CIDEr-D", "bootstrap"):
        assert fragment in line
    smoke = evaluation.protocol_line(MedcapConfig.from_profile("smoke"), 12)
    assert "random split by study" in smoke and "one view per study" in smoke


def test_published_results_have_sources_and_sit_beside_the_run() -> None:
    published = evaluation.published_results()
    assert len(published["systems"]) >= 3
    for entry in published["systems"]:
        assert entry["url"].startswith("https://") and 0 < entry["BLEU-4"] < entry["BLEU-1"] < 1
    table = {"constant (most frequent report)": {"BLEU-1": 0.3, "BLEU-4": 0.1, "CIDEr": 0.2}}
    text = evaluation.published_markdown(table, MedcapConfig.from_profile("full"))
    assert "| R2Gen (Chen et al., EMNLP 2020) |" in text and "| constant (most frequent report) | this run |" in text
    assert "This run follows the same protocol." in text
    assert "does not follow that protocol" in evaluation.published_markdown(table, MedcapConfig.from_profile("smoke"))


@pytest.mark.slow
def test_a_two_view_smoke_run_scores_one_row_per_study(tmp_path: Path) -> None:
    config = MedcapConfig.from_profile("smoke", run_dir=str(tmp_path / "both"), views="both")
    run_pipeline(config, stages="01-02", progress=False)
    sizes = runs.read_stage_metrics(config.run_dir, "01_data")["split_sizes"]
    assert all(s["examples"] == s["studies"] for s in sizes.values())  # train too: a study is one input
    table = runs.read_stage_metrics(config.run_dir, "02_baseline")["test_table"]
    assert {row["n_examples"] for row in table.values()} == {sizes["test"]["studies"]}
    assert all(row["n_studies"] == row["n_examples"] for row in table.values())
