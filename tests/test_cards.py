"""Model cards: the final NF4 folder and the adapter folder get a real Hugging Face card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from medcap_helpers import cards, runs
from medcap_helpers.config import BLIP_LARGE_ID, MedcapConfig
from medcap_helpers.errors import StageNotRun
from medcap_helpers.evaluation import ADAPTER_SYSTEM, MERGED_SYSTEM
from medcap_helpers.metrics import TABLE_COLUMNS
from medcap_helpers.summary import summary_markdown

PEFT_TEMPLATE = "---\nbase_model: /tmp/tmpabc/tiny_model\nlibrary_name: peft\n---\n\n# Model Card for Model ID\n"


def front_matter(text: str) -> dict[str, Any]:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def table_block(markdown: str) -> str:
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| system |"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end])


def fake_run(folder: Path, **settings: Any) -> Path:
    """A finished run's files that the cards read (no model needed)."""
    config = MedcapConfig.from_profile("smoke", run_dir=str(folder), **settings)
    runs.write_run_header(config)
    row = {"CIDEr": 0.0525, "CIDEr_ci_low": 0.025, "CIDEr_ci_high": 0.083, "BLEU-1": 0.30, "BLEU-4": 0.078,
           "ROUGE-L": 0.303, "METEOR": 0.101}
    table = {"zero-shot base": {**row, "CIDEr": 0.001}, "constant (most frequent report)": {**row, "CIDEr": 0.19},
             ADAPTER_SYSTEM: {**row, "CIDEr": 0.059}, MERGED_SYSTEM: row}
    runs.write_stage_metrics(folder, "05_merge_requant", {"final_dir": "/elsewhere/old/merged-nf4"})
    runs.write_stage_metrics(folder, "06_eval_and_demo", {"test_table": table, "test_note": "Smoke sample note."})
    for name in ("adapter", "merged-nf4"):
        (folder / name).mkdir()
        (folder / name / "README.md").write_text(PEFT_TEMPLATE)
    return folder


def test_cards_replace_peft_template_with_metadata_and_the_runs_figures(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "run")
    written = cards.write_model_cards(run)
    assert written == {"merged": run / "merged-nf4" / "README.md", "adapter": run / "adapter" / "README.md"}
    assert "this run's **final model**" in written["merged"].read_text()
    assert "not this run's final model" in written["adapter"].read_text()
    table = runs.read_stage_metrics(run, "06_eval_and_demo")["test_table"]
    summary_table = table_block(summary_markdown(run))
    for kind, system in (("merged", MERGED_SYSTEM), ("adapter", ADAPTER_SYSTEM)):
        text = written[kind].read_text()
        meta = front_matter(text)
        assert "/tmp" not in text and str(run) not in text, "a local path in the card"
        assert "base_model" not in meta, "the tiny smoke model has no hub base model"
        assert "smoke-test" in meta["tags"] and "tiny, randomly initialised" in text
        assert meta["library_name"] == ("transformers" if kind == "merged" else "peft")
        assert meta["pipeline_tag"] == "image-to-text" and meta["license"] == "other"
        assert meta["datasets"] and "IU X-Ray" in meta["datasets"][0]
        for phrase in ("Not for clinical use", "## Intended use", "BSD-3-Clause", "CC BY-NC-ND 4.0",
                       "## How to load it", "from_pretrained", "Smoke sample note."):
            assert phrase in text, phrase
        results = meta["model-index"][0]["results"][0]
        assert results["task"]["type"] == "image-to-text" and results["dataset"]["split"] == "test"
        figures = {m["name"].split(" (")[0]: m["value"] for m in results["metrics"]}
        assert figures == {c: table[system][c] for c in TABLE_COLUMNS if c in table[system]}
        cider = next(m for m in results["metrics"] if m["name"].startswith("CIDEr"))
        assert "0.025–0.083" in cider["name"]
        assert table_block(text) == summary_table  # the baselines beside the model, as summary.md shows them


def test_a_hub_base_model_is_named_by_its_id(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "run", model_name=BLIP_LARGE_ID)
    written = cards.write_model_cards(run)
    for path in written.values():
        text = path.read_text()
        assert front_matter(text)["base_model"] == BLIP_LARGE_ID
        assert "smoke model has no BLIP weights" not in text
    assert f'from_pretrained("{BLIP_LARGE_ID}"' in written["adapter"].read_text()


def test_missing_stage_metrics_say_which_stage(tmp_path: Path) -> None:
    config = MedcapConfig.from_profile("smoke", run_dir=str(tmp_path))
    runs.write_run_header(config)
    with pytest.raises(StageNotRun, match="06_eval_and_demo"):
        cards.write_model_cards(tmp_path)


@pytest.mark.slow
def test_cards_of_the_smoke_run(smoke_run: dict, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(smoke_run["dir"], run, symlinks=True, ignore=shutil.ignore_patterns("kernel-ipc-*", ".lock*"))
    written = cards.write_model_cards(run)
    merged_dir = Path(json.loads((run / "metrics" / "05_merge_requant.json").read_text())["merged_dir"]).name
    assert written["merged"] == run / merged_dir / "README.md"
    table = smoke_run["metrics"]["06_eval_and_demo"]["test_table"]
    meta = front_matter(written["merged"].read_text())
    values = {m["name"].split(" (")[0]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert values["CIDEr"] == table[MERGED_SYSTEM]["CIDEr"]
    assert table_block(written["adapter"].read_text()) == table_block((run / "summary.md").read_text())
    assert "# Model Card for Model ID" not in written["adapter"].read_text()


def test_a_mimic_trained_model_says_not_to_share_it(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "run", model_name=BLIP_LARGE_ID)
    config = MedcapConfig.load(run / "config.json")
    table = runs.read_stage_metrics(run, "06_eval_and_demo")["test_table"]
    mimic = config.replace(data_source="mimic_r2gen", data_path=str(tmp_path / "annotation.json"))
    text = cards.model_card(mimic, table, {}, {}, "adapter", "run")
    assert "MIMIC-CXR (PhysioNet" in text and "Do not share or upload these weights" in text
    assert "CC BY-NC-ND" not in text and "(IU X-Ray)" not in text
    assert "CC BY-NC-ND" in cards.model_card(config, table, {}, {}, "adapter", "run")
