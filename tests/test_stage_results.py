"""What the smoke run records at the end of the pipeline: 03's best epoch, 05's final model, 06's table, summary.md.

Each test reads the session's ``smoke_run`` (tests/conftest.py) and checks one recorded choice or
number against the values it must follow from, as a reviewer of the run folder would.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from medcap_helpers.merge import FINAL_CANDIDATES

pytestmark = pytest.mark.slow

TEST_TABLE_ROWS = ["zero-shot base", "constant (most frequent report)", "nearest neighbour (base vision embedding)",
                   "fine-tuned (adapter on 4-bit base)", "fine-tuned, merged NF4"]
MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def test_06_test_table_has_the_five_systems_with_intervals_and_the_test_split_size(smoke_run: dict) -> None:
    table = smoke_run["metrics"]["06_eval_and_demo"]["test_table"]
    test_size = smoke_run["metrics"]["01_data"]["split_sizes"]["test"]
    assert list(table) == TEST_TABLE_ROWS
    for name, row in table.items():
        assert row["CIDEr_ci_low"] <= row["CIDEr"] <= row["CIDEr_ci_high"], name
        assert row["n_examples"] == test_size["examples"], name
        assert row["n_studies"] == test_size["studies"], name


def test_05_final_model_is_the_candidate_with_the_higher_validation_score(smoke_run: dict) -> None:
    m = smoke_run["metrics"]["05_merge_requant"]
    metric = m["final_chosen_by"]
    cider = {name: m["validation"][label][metric] for name, label in FINAL_CANDIDATES.items()}
    assert set(cider) == {"merged-nf4", "merged-dequantized-nf4"}
    best = max(cider.values())
    assert cider[m["final_model"]] == best, (m["final_model"], cider)
    if cider["merged-nf4"] == cider["merged-dequantized-nf4"]:
        assert m["final_model"] == "merged-dequantized-nf4"  # ties go to the merge of the trained weights
    assert Path(m["final_dir"]) == smoke_run["dir"] / m["final_model"]
    assert smoke_run["metrics"]["06_eval_and_demo"]["final_model_dir"] == m["final_dir"]


def test_03_best_epoch_is_the_argmax_of_the_selection_metric_and_is_what_ships(smoke_run: dict) -> None:
    m = smoke_run["metrics"]["03_qlora_train"]
    scores = [epoch["val_scores"][m["best_model_metric"]] for epoch in m["epochs"]]
    assert all(isinstance(s, float) for s in scores)
    first_best = scores.index(max(scores))
    assert m["best_epoch"] == m["epochs"][first_best]["epoch"]
    assert m["best_val_cider"] == m["epochs"][first_best]["val_cider"]
    # The saved adapter is the best epoch's: 05 scores it on the same validation rows and gets the same CIDEr.
    shipped = smoke_run["metrics"]["05_merge_requant"]["validation"]["adapter on 4-bit base"]["CIDEr"]
    assert shipped == pytest.approx(m["best_val_cider"], rel=1e-9, abs=1e-12)


def test_every_relative_link_in_summary_md_exists(smoke_run: dict) -> None:
    run_dir = smoke_run["dir"]
    summary = (run_dir / "summary.md").read_text()
    targets = MARKDOWN_LINK.findall(summary)
    relative = [t for t in targets if not urlparse(t).scheme and not t.startswith("#")]
    assert len(relative) == len(targets), "summary.md links outside the run folder"
    missing = [t for t in relative if not (run_dir / unquote(t.split("#")[0])).is_file()]
    assert not missing, f"dead links in summary.md: {missing}"
    assert not [t for t in relative if Path(t).is_absolute() or ".." in Path(t).parts]
    # Every stage's metrics and executed notebook, and the figures, are linked (the test would pass on none).
    for stage in smoke_run["metrics"]:
        assert f"metrics/{stage}.json" in relative and f"notebooks/{stage}.ipynb" in relative, stage
    figures = sorted(p.name for p in (run_dir / "figures").glob("*.png"))
    assert figures and [t for t in relative if t.startswith("figures/")] == [f"figures/{f}" for f in figures]
