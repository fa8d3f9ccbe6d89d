"""The final evaluation (notebook 06): every system on the test split, one table with bootstrap intervals.

The baselines' test predictions come from 02 (``predictions/test.json``); the fine-tuned adapter
and the merged NF4 model 05 preferred are generated here and added to the same file. One of the two is
the final model 05 chose (:func:`final_system`). Beside the table: paired-bootstrap intervals of the
differences (each fine-tuned model against the constant report, and the two fine-tuned models against each
other), the collapse signals, and one sentence comparing the final model's CE micro-F1 with the constant
report's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from medcap_helpers import runs
from medcap_helpers.baselines import CONSTANT_SYSTEM
from medcap_helpers.checkpoints import is_adapter_dir
from medcap_helpers.config import MedcapConfig
from medcap_helpers.metrics import (
    CE_MICRO_F1,
    DIFFERENCE_METRICS,
    ce_comparison,
    collapse_signals,
    paired_differences,
    score_systems,
)
from medcap_helpers.sharding import generate_sharded

PUBLISHED_FILE = "published_iu_xray.json"

MERGED_SYSTEM = "fine-tuned, merged NF4"
ADAPTER_SYSTEM = "fine-tuned (adapter on 4-bit base)"
FINAL_LABELS = {MERGED_SYSTEM: "fine-tuned model (merged NF4, the final model)",
                ADAPTER_SYSTEM: "fine-tuned model (adapter on its 4-bit base, the final model)"}
"""How the CE sentence names the final model, per table row."""


@dataclass
class FinalEvaluation:
    table: dict[str, dict[str, Any]]
    examples: dict[str, list[str]]
    final_model_dir: str
    is_smoke_sample: bool
    collapse: dict[str, Any] = field(default_factory=dict)
    """:func:`~medcap_helpers.metrics.collapse_signals` of every system on the test split."""
    final_system: str = MERGED_SYSTEM
    """The table row of the final model 05 chose (:data:`MERGED_SYSTEM` or :data:`ADAPTER_SYSTEM`)."""
    differences: list[dict[str, Any]] = field(default_factory=list)
    """Paired-bootstrap differences on the test studies (:func:`~medcap_helpers.metrics.paired_differences`)."""

    @property
    def ce_statement(self) -> str:
        """Does the final model name the findings better than the constant report? In words, from the numbers."""
        paired = next((d for d in self.differences if d["system"] == self.final_system
                       and d["baseline"] == CONSTANT_SYSTEM and d["metric"] == CE_MICRO_F1), None)
        return ce_comparison(self.table, self.final_system, CONSTANT_SYSTEM,
                             labels=(FINAL_LABELS[self.final_system], "constant report"), difference=paired)

    def stage_metrics(self) -> dict[str, Any]:
        note = ("Smoke sample: placeholder images generated from real report text; these numbers say "
                "nothing about model quality." if self.is_smoke_sample else
                "CIDEr and CE micro-F1 with 95% bootstrap intervals over test studies.")
        return {"split": "test", "test_table": self.table, "test_note": note, "ce_statement": self.ce_statement,
                "collapse": self.collapse, "final_model_dir": self.final_model_dir,
                "final_system": self.final_system, "test_differences": self.differences,
                "is_smoke_sample": self.is_smoke_sample}


def final_model_dir(run_dir: str | Path) -> str:
    """The folder of the final model 05 chose (a merged NF4 model or the adapter), in this run folder (which
    may have been moved since)."""
    return _recorded_folder(run_dir, "final_dir")


def merged_model_dir(run_dir: str | Path) -> str:
    """The folder of the merged NF4 model 05 preferred among the merges (the final one unless the adapter is)."""
    return _recorded_folder(run_dir, "merged_dir")


def _recorded_folder(run_dir: str | Path, key: str) -> str:
    recorded_stage = runs.read_stage_metrics(run_dir, "05_merge_requant")
    recorded = Path(recorded_stage.get(key) or recorded_stage["final_dir"])
    here = Path(run_dir) / recorded.name
    return str(here if here.is_dir() else recorded)


def final_system(run_dir: str | Path) -> str:
    """The test-table row of the run's final model: :data:`ADAPTER_SYSTEM` or :data:`MERGED_SYSTEM`."""
    return ADAPTER_SYSTEM if is_adapter_dir(final_model_dir(run_dir)) else MERGED_SYSTEM


def protocol_line(config: MedcapConfig, n_studies: int) -> str:
    """How the test table was computed, in one line, to set beside published results."""
    split = ("the R2Gen split (2,069 / 296 / 590 studies)" if config.split_mode == "r2gen" else
             f"a random split by study (seed {config.seed}, {'/'.join(f'{r:g}' for r in config.split_ratios)})")
    views = ("both views of a study as one input" if config.views == "both" else
             "one view per study (the frontal where the source says which)")
    return (f"Protocol: {config.target.upper()} on {split}; {n_studies} test studies, one report per study "
            f"scored against the study's report; {views}; R2Gen's text cleaning for every metric; CIDEr-D with "
            "document frequencies from the evaluated test references; 95% intervals from "
            f"{config.bootstrap_samples} bootstrap resamples of studies.")


def published_results() -> dict[str, Any]:
    """Published IU X-Ray results on the R2Gen protocol (package data, with sources)."""
    return json.loads(resources.files("medcap_helpers").joinpath(PUBLISHED_FILE).read_text())


def same_protocol(config: MedcapConfig) -> bool:
    """Whether this run follows the published results' protocol (R2Gen split, both views, FINDINGS)."""
    return config.split_mode == "r2gen" and config.views == "both" and config.target == "findings"


def published_markdown(table: dict[str, dict[str, Any]], config: MedcapConfig) -> str:
    """Published systems beside this run's baselines and models, one metric set, so a run can be placed."""
    published = published_results()
    columns = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
    lines = ["| system | source | " + " | ".join(columns) + " |", "|---|---|" + "---:|" * len(columns)]
    for entry in published["systems"]:
        cells = " | ".join("–" if entry.get(c) is None else f"{entry[c]:.3f}" for c in columns)
        lines.append(f"| {entry['system']} | [paper]({entry['url']}) | {cells} |")
    for name, row in table.items():
        cells = " | ".join("–" if row.get(c) is None else f"{row[c]:.3f}" for c in columns)
        lines.append(f"| {name} | this run | {cells} |")
    same = same_protocol(config)
    lines += ["", f"Published: {published['protocol']}. {published['note']}",
              "This run follows the same protocol." if same else
              "**This run does not follow that protocol** (split, views or target differ), so its figures are "
              "not comparable with the published ones."]
    return "\n".join(lines)


def final_evaluation(config: MedcapConfig, dataset: Any) -> FinalEvaluation:
    """The test table: the baselines of 02, the fine-tuned adapter and the merged NF4 model of 05, and the
    paired differences that say which gaps the test set establishes."""
    run = Path(config.run_dir)
    test = dataset["test"]
    image_ids = list(test["image_id"])
    systems = dict(runs.load_predictions(run, "test", image_ids))
    # In shares on every GPU when stage 03 trained on several (num_gpus), else in this process.
    systems[ADAPTER_SYSTEM] = generate_sharded(config, run / "adapter", "test", test)
    systems[MERGED_SYSTEM] = generate_sharded(config, merged_model_dir(run), "test", test)
    runs.save_predictions(run, "test", {k: v for k, v in systems.items() if k.startswith("fine-tuned")}, image_ids)
    table = score_systems(systems, test, config)
    final = final_system(run)
    other = MERGED_SYSTEM if final == ADAPTER_SYSTEM else ADAPTER_SYSTEM
    pairs = [(name, CONSTANT_SYSTEM) for name in (final, other) if CONSTANT_SYSTEM in systems] + [(final, other)]
    metrics = tuple(dict.fromkeys((config.best_model_metric, *DIFFERENCE_METRICS)))
    differences = paired_differences(systems, test, config, pairs, metrics=metrics)
    examples = {name: systems[name] for name in ("zero-shot base", final) if name in systems}
    smoke = runs.read_stage_metrics(run, "01_data").get("is_smoke_sample", config.is_smoke)
    return FinalEvaluation(table=table, examples=examples, final_model_dir=final_model_dir(run), is_smoke_sample=smoke,
                           collapse=collapse_signals(systems, list(test["text"])), final_system=final,
                           differences=differences)
