"""What the smoke run records at the end of the pipeline: 03's best epoch, 05's final model, 06's table, summary.md.

Each test reads the session's ``smoke_run`` (tests/conftest.py) and checks one recorded choice or
number against the values it must follow from, as a reviewer of the run folder would.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from medcap_helpers.merge import (
    ADAPTER_CANDIDATE,
    FINAL_CANDIDATES,
    FINAL_RULE,
    MERGES,
    choose_final,
)

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


def test_05_final_model_follows_the_noise_aware_rule_and_06_scores_it(smoke_run: dict) -> None:
    m = smoke_run["metrics"]["05_merge_requant"]
    metric = m["final_chosen_by"]
    assert set(m["validation"]) == set(FINAL_CANDIDATES.values())
    differences = m["validation_differences"]
    assert choose_final(differences, metric) == m["final_model"]
    assert choose_final(differences, metric, candidates=MERGES) == m["merged_model"]
    assert m["final_rule"] == FINAL_RULE.format(metric=metric)
    for difference in differences:  # each paired interval brackets its point difference
        assert difference["low"] <= difference["point"] <= difference["high"], difference
    expected_dir = "adapter" if m["final_model"] == ADAPTER_CANDIDATE else m["final_model"]
    assert Path(m["final_dir"]) == smoke_run["dir"] / expected_dir
    assert Path(m["merged_dir"]) == smoke_run["dir"] / m["merged_model"]
    final = smoke_run["metrics"]["06_eval_and_demo"]
    assert final["final_model_dir"] == m["final_dir"]
    assert final["final_system"] == ("fine-tuned (adapter on 4-bit base)" if expected_dir == "adapter"
                                     else "fine-tuned, merged NF4")


def test_06_and_summary_show_paired_differences_against_the_constant_report(smoke_run: dict) -> None:
    final = smoke_run["metrics"]["06_eval_and_demo"]
    pairs = {(d["system"], d["baseline"], d["metric"]) for d in final["test_differences"]}
    for system in TEST_TABLE_ROWS[3:]:
        assert (system, "constant (most frequent report)", "CE micro-F1") in pairs
    assert {d["system"] for d in smoke_run["metrics"]["02_baseline"]["test_differences"]} == {
        "zero-shot base", "nearest neighbour (base vision embedding)"}
    summary = (smoke_run["dir"] / "summary.md").read_text()
    assert "Paired differences" in summary and "| constant (most frequent report) | CE micro-F1 |" in summary


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


def test_an_adapter_final_model_loads_for_06_and_the_demo(smoke_run: dict, tmp_path: Path) -> None:
    """When 05 chooses the unmerged adapter, 06, the demo and the cards load and name it as such."""
    import shutil

    from medcap_helpers import cards, runs
    from medcap_helpers.checkpoints import is_adapter_dir, load_final_model
    from medcap_helpers.demo import demo_captioners
    from medcap_helpers.evaluation import ADAPTER_SYSTEM, final_model_dir, final_system
    from medcap_helpers.generation import generate_reports

    run = tmp_path / "run"
    shutil.copytree(smoke_run["dir"], run, symlinks=True, ignore=shutil.ignore_patterns("kernel-ipc-*", ".lock*"))
    recorded = runs.read_stage_metrics(run, "05_merge_requant")
    runs.write_stage_metrics(run, "05_merge_requant", {**recorded, "final_model": ADAPTER_CANDIDATE,
                                                       "final_dir": "/moved/away/adapter"})
    assert final_model_dir(run) == str(run / "adapter") and is_adapter_dir(final_model_dir(run))
    assert final_system(run) == ADAPTER_SYSTEM
    config = smoke_run["config"].replace(run_dir=str(run))
    model, processor = load_final_model(config, final_model_dir(run))
    assert type(model).__name__ == "PeftModel"
    from PIL import Image
    report = generate_reports(model, processor, [Image.new("RGB", (64, 64), (90, 90, 90))], max_new_tokens=12,
                              num_beams=1, batch_size=1, progress=False)[0]
    assert isinstance(report, str) and report.strip()
    assert list(demo_captioners(config)) == ["base model", "fine-tuned (adapter on 4-bit base)"]
    written = cards.write_model_cards(run)
    assert "this run's **final model**" in written["adapter"].read_text()
    assert "not this run's final model" in written["merged"].read_text()
