"""Scoring systems on a split: one row per system with CIDEr's bootstrap interval over studies.

Used by 02 (baselines), 05 (degradation check) and 06 (the final test table), so every table in
the tutorial is computed the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medcap_helpers import runs
from medcap_helpers.config import MedcapConfig
from medcap_helpers.metrics import bootstrap_ci, caption_scores, table_row


def split_images(split: Any) -> Any:
    """The split's images in row order, decoded lazily batch by batch (a full split of radiographs
    would not fit in memory); generation and embedding convert each batch to RGB."""
    return split["image"]


def score_row(predictions: Sequence[str], split: Any, config: MedcapConfig) -> dict[str, Any]:
    """Metrics of ``predictions`` against the split's reports, CIDEr with a 95% bootstrap CI over studies."""
    references, study_ids = list(split["text"]), list(split["study_id"])
    interval = bootstrap_ci(list(predictions), references, groups=study_ids, metric="CIDEr",
                            n_samples=config.bootstrap_samples, seed=config.seed)
    row: dict[str, Any] = table_row(caption_scores(list(predictions), references), interval)
    row["n_examples"] = len(references)
    row["n_studies"] = len(set(study_ids))
    return row


def score_systems(systems: dict[str, Sequence[str]], split: Any, config: MedcapConfig) -> dict[str, dict[str, Any]]:
    return {name: score_row(predictions, split, config) for name, predictions in systems.items()}


def examples_side_by_side(split: Any, systems: dict[str, Sequence[str]], n: int) -> tuple[list[Any], dict[str, list[str]]]:
    """The first ``n`` images with their reference and every system's prediction (for plots.show_predictions)."""
    n = min(n, len(split))
    images = [split[i]["image"].convert("RGB") for i in range(n)]
    columns = {"reference": [split[i]["text"] for i in range(n)]}
    columns.update({name: list(predictions[:n]) for name, predictions in systems.items()})
    return images, columns


def generate_for_split(model: Any, processor: Any, split: Any, config: MedcapConfig) -> list[str]:
    """Reports for every image of ``split`` with the config's generation settings."""
    from medcap_helpers.model import generate_reports

    return generate_reports(model, processor, split_images(split), max_new_tokens=config.max_new_tokens,
                            num_beams=config.num_beams, batch_size=config.eval_batch_size)


def baseline_systems(base_model: Any, processor: Any, train_split: Any, test_split: Any,
                     config: MedcapConfig) -> dict[str, list[str]]:
    """Zero-shot base captions, the constant most-frequent report and nearest-neighbour retrieval."""
    from medcap_helpers.baselines import constant_baseline, image_embeddings, nearest_neighbour_baseline

    train_texts = list(train_split["text"])
    zero_shot = generate_for_split(base_model, processor, test_split, config)
    train_embeddings = image_embeddings(base_model, processor, split_images(train_split), config.eval_batch_size)
    test_embeddings = image_embeddings(base_model, processor, split_images(test_split), config.eval_batch_size)
    return {
        "zero-shot base": zero_shot,
        "constant (most frequent report)": constant_baseline(train_texts, len(test_split)),
        "nearest neighbour (base vision embedding)": nearest_neighbour_baseline(
            train_embeddings, train_texts, test_embeddings),
    }


def predictions_path(run_dir: str | Path, split_name: str) -> Path:
    return Path(run_dir) / "predictions" / f"{split_name}.json"


def save_predictions(run_dir: str | Path, split_name: str, systems: dict[str, Sequence[str]], split: Any) -> Path:
    """Add ``systems``' predictions to ``predictions/<split>.json`` (keyed by image id, for reuse and audit)."""
    path = predictions_path(run_dir, split_name)
    stored = runs.read_json(path) if path.exists() else {"image_id": list(split["image_id"]), "systems": {}}
    if stored["image_id"] != list(split["image_id"]):
        raise ValueError(f"{path} was written for other {split_name} images: delete it and rerun 02.")
    stored["systems"].update({name: list(predictions) for name, predictions in systems.items()})
    return runs.write_json(path, stored)


def load_predictions(run_dir: str | Path, split_name: str, split: Any) -> dict[str, list[str]]:
    path = predictions_path(run_dir, split_name)
    if not path.exists():
        raise FileNotFoundError(f"No saved {split_name} predictions in {path}: run 02_baseline first.")
    stored = runs.read_json(path)
    if stored["image_id"] != list(split["image_id"]):
        raise ValueError(f"{path} was written for other {split_name} images: rerun 02_baseline.")
    return stored["systems"]


@dataclass
class FinalEvaluation:
    table: dict[str, dict[str, Any]]
    examples: dict[str, list[str]]
    final_model_dir: str
    is_smoke_sample: bool

    def stage_metrics(self) -> dict[str, Any]:
        note = ("Smoke sample: placeholder images generated from real report text; these numbers say "
                "nothing about model quality." if self.is_smoke_sample else
                "CIDEr with a 95% bootstrap interval over test studies.")
        return {"split": "test", "test_table": self.table, "test_note": note,
                "final_model_dir": self.final_model_dir, "is_smoke_sample": self.is_smoke_sample}


def final_evaluation(config: MedcapConfig, dataset: Any) -> FinalEvaluation:
    """The test table: the baselines of 02, the fine-tuned adapter and the merged NF4 model of 05."""
    from medcap_helpers.merge import load_captioner, load_processor_from
    from medcap_helpers.model import device_map_for, pick_device
    from medcap_helpers.train import load_adapter_model

    run = Path(config.run_dir)
    test = dataset["test"]
    systems = dict(load_predictions(run, "test", test))
    adapter_dir = run / "adapter"
    processor = load_processor_from(adapter_dir)
    adapter_model = load_adapter_model(config, adapter_dir)
    systems["fine-tuned (adapter on 4-bit base)"] = generate_for_split(adapter_model, processor, test, config)
    del adapter_model
    final_dir = runs.read_stage_metrics(run, "05_merge_requant")["final_dir"]
    merged, merged_processor = load_captioner(final_dir, device_map=device_map_for(pick_device(config)))
    systems["fine-tuned, merged NF4"] = generate_for_split(merged, merged_processor, test, config)
    del merged
    save_predictions(run, "test", {k: v for k, v in systems.items() if k.startswith("fine-tuned")}, test)
    table = score_systems(systems, test, config)
    examples = {name: systems[name] for name in ("zero-shot base", "fine-tuned, merged NF4") if name in systems}
    smoke = runs.read_stage_metrics(run, "01_data").get("is_smoke_sample", config.is_smoke)
    return FinalEvaluation(table=table, examples=examples, final_model_dir=str(final_dir), is_smoke_sample=smoke)


def demo_captioners(config: MedcapConfig) -> dict[str, Any]:
    """Functions image → report for the demo: the base model and the final fine-tuned NF4 model."""
    from medcap_helpers.merge import load_captioner, load_processor_from
    from medcap_helpers.model import device_map_for, generate_reports, load_base_model, pick_device

    run = Path(config.run_dir)
    final_dir = runs.read_stage_metrics(run, "05_merge_requant")["final_dir"]
    base = load_base_model(config)
    base_processor = load_processor_from(run / "adapter")
    tuned, tuned_processor = load_captioner(final_dir, device_map=device_map_for(pick_device(config)))

    def captioner(model: Any, processor: Any) -> Any:
        def caption(image: Any) -> str:
            return generate_reports(model, processor, [image], max_new_tokens=config.max_new_tokens,
                                    num_beams=config.num_beams, batch_size=1, progress=False)[0]
        return caption

    return {"base model": captioner(base, base_processor), "fine-tuned (NF4)": captioner(tuned, tuned_processor)}
