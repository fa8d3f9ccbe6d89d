"""Notebook hygiene, and the whole smoke pipeline executed with papermill (recommenders-style).

Hygiene is checked on the notebooks as git tracks them (the index: what is staged or committed), so
a user's executed notebooks in the working tree (JupyterLab saves outputs) never fail ``make test``;
outside a git checkout (an sdist, a copy) the files on disk are checked.

The smoke run executes 01 → 06 once per session into a temporary run folder; each test then asserts
on what a stage recorded. This is also CI's end-to-end run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from medcap_helpers import runs
from medcap_helpers.config import STAGES
from medcap_helpers.pipeline import notebook_dir, run_pipeline

NOTEBOOKS = sorted(notebook_dir().glob("*.ipynb"))


def tracked_text(path: Path) -> tuple[str, str]:
    """``path``'s text as git tracks it (``git show :<path>``: the staged or committed version) and where
    it came from; the file on disk when ``path`` is not in a git checkout or not tracked there."""
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=path.parent, capture_output=True,
                             text=True, timeout=30, check=True).stdout.strip()
        relative = path.resolve().relative_to(Path(top).resolve()).as_posix()
        shown = subprocess.run(["git", "show", f":{relative}"], cwd=top, capture_output=True, timeout=30, check=True)
        return shown.stdout.decode(), f"{relative} (as git tracks it)"
    except (OSError, ValueError, subprocess.SubprocessError):
        return path.read_text(), str(path)


def test_the_six_notebooks_are_the_pipeline_stages() -> None:
    assert [p.stem for p in NOTEBOOKS] == list(STAGES)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_clean_and_thin(path: Path) -> None:
    text, source = tracked_text(path)
    book = nbformat.reads(text, as_version=4)
    assert "widgets" not in book.metadata, f"widget state saved in {source}"
    code = [c for c in book.cells if c.cell_type == "code"]
    for cell in code:
        assert not cell.get("outputs"), f"{source} has outputs"
        assert cell.get("execution_count") is None, f"{source} has execution counts"
        for line in cell.source.splitlines():
            assert not line.lstrip().startswith(("def ", "class ", "lambda")), \
                f"{source} defines a function: logic belongs in medcap_helpers ({line!r})"
    parameters = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(parameters) == 1, f"{source} needs exactly one cell tagged 'parameters'"
    for name in ("PROFILE", "RUN_DIR", "OVERRIDES"):
        assert f"{name} =" in parameters[0].source
    assert any(c.cell_type == "markdown" for c in book.cells[:1]), "a notebook opens with its explanation"
    assert "write_stage_metrics" in code[-1].source, "the last cell records the stage's metrics"


def test_hygiene_reads_what_git_tracks_not_a_users_executed_copy(tmp_path: Path) -> None:
    """A notebook run and saved in JupyterLab (outputs, counts) is not what the hygiene test reads."""
    clean = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 + 1")])
    path = tmp_path / "notebooks" / "x.ipynb"
    path.parent.mkdir()
    nbformat.write(clean, path)
    assert tracked_text(path) == (path.read_text(), str(path))  # not a git checkout: the file on disk

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "add", "notebooks/x.ipynb"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "clean"], cwd=tmp_path, check=True)
    executed = nbformat.read(path, as_version=4)
    executed.cells[0].outputs = [nbformat.v4.new_output("execute_result", {"text/plain": "2"}, execution_count=1)]
    executed.cells[0].execution_count = 1
    executed.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    nbformat.write(executed, path)

    text, source = tracked_text(path)
    book = nbformat.reads(text, as_version=4)
    assert source == "notebooks/x.ipynb (as git tracks it)"
    assert not book.cells[0].outputs and "widgets" not in book.metadata


@pytest.mark.slow
def test_pipeline_writes_every_stage(smoke_run: dict) -> None:
    run_dir = smoke_run["dir"]
    assert [o.status for o in smoke_run["outcomes"]] == ["ran"] * len(STAGES)
    for stage in STAGES:
        executed = nbformat.read(run_dir / "notebooks" / f"{stage}.ipynb", as_version=4)
        assert any(c.get("outputs") for c in executed.cells if c.cell_type == "code")
        assert "widgets" not in executed.metadata, f"{stage}: the executed notebook holds widget state"
        assert runs.is_done(run_dir, stage)
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["packages"]["transformers"] and "git_commit" in env
    assert json.loads((run_dir / "config.json").read_text())["profile"] == "smoke"


@pytest.mark.slow
def test_01_data_records_counts_and_no_leak(smoke_run: dict) -> None:
    m = smoke_run["metrics"]["01_data"]
    assert m["is_smoke_sample"] is True and m["leakage_ok"] is True
    assert m["bundled_collection"]["reports"] == 3955
    assert m["bundled_collection"]["with_target"] == 3425
    assert m["bundled_collection"]["with_target_and_images"] == 3337
    sizes = m["split_sizes"]
    assert sum(s["studies"] for s in sizes.values()) == smoke_run["config"].smoke_num_reports
    assert sizes["train"]["examples"] > sizes["test"]["examples"] > sizes["validation"]["examples"] > 0
    assert len(m["top_sentences"]) == 20
    assert (smoke_run["dir"] / "dataset" / "dataset_dict.json").exists()


TABLE_KEYS = {"CIDEr", "BLEU-4", "ROUGE-L", "CIDEr_ci_low", "CIDEr_ci_high"}


@pytest.mark.slow
def test_02_baseline_table(smoke_run: dict) -> None:
    table = smoke_run["metrics"]["02_baseline"]["test_table"]
    assert set(table) == {"zero-shot base", "constant (most frequent report)",
                          "nearest neighbour (base vision embedding)"}
    for row in table.values():
        assert TABLE_KEYS <= set(row)
        assert row["CIDEr_ci_low"] <= row["CIDEr"] <= row["CIDEr_ci_high"]


@pytest.mark.slow
def test_03_training_records_epochs_memory_and_adapter(smoke_run: dict) -> None:
    m = smoke_run["metrics"]["03_qlora_train"]
    epochs = m["epochs"]
    assert len(epochs) == int(smoke_run["config"].num_train_epochs)
    assert all(e["val_cider"] is not None and e["peak_memory"] for e in epochs)
    best = max(epochs, key=lambda e: e["val_scores"][m["best_model_metric"]])
    assert m["best_epoch"] == best["epoch"] and m["best_val_cider"] == best["val_cider"]
    assert m["quantized_4bit"] is True and 0 < m["trainable_share"] < 0.5
    assert (smoke_run["dir"] / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_04_sweep_halving_and_choice(smoke_run: dict) -> None:
    from medcap_helpers.sweep import sweep_schedule

    m = smoke_run["metrics"]["04_sweep"]
    config = smoke_run["config"]
    n_train = smoke_run["metrics"]["01_data"]["split_sizes"]["train"]["examples"]
    rungs = sweep_schedule(config, n_train)
    assert [sum(t["rung"] == r.index for t in m["trials"]) for r in rungs] == [r.trials for r in rungs]
    assert len([t for t in m["trials"] if t["rung"] == 0]) == len(config.sweep_ranks) * len(config.sweep_alphas)
    # The whole sweep trains on at most sweep_budget_share of one training run.
    assert sum(t["train_examples"] for t in m["trials"]) <= config.sweep_budget_share * n_train * config.num_train_epochs
    last = [t for t in m["trials"] if t["rung"] == rungs[-1].index]
    assert (m["chosen"]["lora_r"], m["chosen"]["lora_alpha"]) in [(t["lora_r"], t["lora_alpha"]) for t in last]
    assert "can't be measured on the CPU" in m["budget_note"]
    trainable = {t["lora_r"]: t["trainable_params"] for t in m["trials"]}
    assert trainable[max(trainable)] > trainable[min(trainable)]  # more rank, more parameters


@pytest.mark.slow
def test_05_nf4_checkpoint_is_smaller_and_loads_in_a_fresh_process(smoke_run: dict) -> None:
    m = smoke_run["metrics"]["05_merge_requant"]
    sizes = m["sizes_bytes"]
    assert sizes["merged-nf4"] < sizes["merged-16bit"] and sizes["merged-16bit"] == sizes["base-16bit"]
    assert set(m["deltas"]) and m["inference"]["latency_s_median"] > 0
    image = smoke_run["dir"] / "fresh_process_test.png"
    from PIL import Image
    Image.new("RGB", (64, 64), (90, 90, 90)).save(image)
    script = (
        "import sys; from transformers import BlipForConditionalGeneration, BlipProcessor; from PIL import Image\n"
        "m = BlipForConditionalGeneration.from_pretrained(sys.argv[1]); p = BlipProcessor.from_pretrained(sys.argv[1])\n"
        "assert any('4bit' in type(x).__name__ for x in m.modules()), 'not 4-bit'\n"
        "out = m.generate(**p(images=Image.open(sys.argv[2]).convert('RGB'), return_tensors='pt'), max_new_tokens=12)\n"
        "print('CAPTION:', p.decode(out[0], skip_special_tokens=True))\n")
    done = subprocess.run([sys.executable, "-c", script, m["merged_dir"], str(image)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "CAPTION:" in done.stdout


@pytest.mark.slow
def test_06_final_table_and_summary(smoke_run: dict) -> None:
    table = smoke_run["metrics"]["06_eval_and_demo"]["test_table"]
    assert len(table) == 5
    for row in table.values():
        assert TABLE_KEYS <= set(row)
    summary = (smoke_run["dir"] / "summary.md").read_text()
    for name in table:
        assert f"| {name} |" in summary
    assert "Smoke sample" in summary


@pytest.mark.slow
def test_rerun_skips_finished_stages(smoke_run: dict) -> None:
    start = time.perf_counter()
    outcomes = run_pipeline(smoke_run["config"], progress=False)
    assert [o.status for o in outcomes] == ["skipped"] * len(STAGES)
    assert time.perf_counter() - start < 30


@pytest.mark.slow
def test_05_reuses_the_validation_reports_03_generated_with_the_kept_adapter(smoke_run: dict) -> None:
    from medcap_helpers import runs as run_files

    m3, m5 = smoke_run["metrics"]["03_qlora_train"], smoke_run["metrics"]["05_merge_requant"]
    assert (smoke_run["dir"] / "predictions" / run_files.BEST_EPOCH_PREDICTIONS).exists()
    adapter = m5["validation"]["adapter on 4-bit base"]
    assert adapter["CIDEr"] == m3["best_val_cider"] and adapter["CE micro-F1"] == m3["best_val_ce_micro_f1"]
