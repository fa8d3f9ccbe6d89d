"""The data stage (notebook 01): examples -> leak-free splits -> a saved ``datasets.DatasetDict``, and statistics.

Rows: ``image`` (``datasets.Image(mode="RGB")``: file paths, decoded lazily to 8-bit RGB), ``text``
(the cleaned target), ``study_id``, ``image_id``, ``view`` (frontal|lateral|unknown), ``report_uid``.
Reading each source is :mod:`medcap_helpers.sources`' job.

Splits group by report uid, so every image of a study (and of a report spanning two series) lands in
one split.
"""

from __future__ import annotations

import json
import random
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medcap_helpers.atomic import atomic_folder, folder_ready, write_text
from medcap_helpers.config import MedcapConfig
from medcap_helpers.errors import DataSourceError, StageNotRun
from medcap_helpers.smoke_sample import SMOKE_SAMPLE_NOTE
from medcap_helpers.sources import (
    COLUMNS,
    DataReport,
    Example,
    column_values,
    hub_rows,
    load_examples,
    load_hub_dataset,
)

if TYPE_CHECKING:
    from datasets import DatasetDict

R2GEN_SPLIT_FILE = "r2gen_split.json"
SPLITS = ("train", "validation", "test")
VALIDATION = "validation"
DATASET_FOLDER = "dataset"
REPORT_NAME = "data_report.json"


# --- splits -------------------------------------------------------------------------------------
def assign_splits(group_keys: Iterable[str], ratios: Sequence[float] = (0.7, 0.1, 0.2),
                  seed: int = 42) -> dict[str, str]:
    """Map each distinct group key to train/validation/test, deterministically for ``seed``.

    The mapping's order is the shuffled order of the keys.

    Counts follow ``ratios`` by largest remainder; a split with a non-zero ratio gets at least one
    group when there are enough groups.
    """
    keys = sorted(set(group_keys))
    random.Random(seed).shuffle(keys)
    counts = _split_counts(len(keys), ratios)
    assignment: dict[str, str] = {}
    start = 0
    for split, count in zip(SPLITS, counts):
        for key in keys[start:start + count]:
            assignment[key] = split
        start += count
    return assignment


def split_by_study(examples: Sequence[Example], ratios: Sequence[float] = (0.7, 0.1, 0.2),
                   seed: int = 42) -> dict[str, list[Example]]:
    """Split examples so that all images of a report (hence of a study) share one split.

    Within a split, examples follow the shuffled order of their reports (so a prefix is a random subset).
    """
    assignment = assign_splits((e.report_uid for e in examples), ratios, seed)
    order = {key: i for i, key in enumerate(assignment)}  # assignment is in shuffled order
    out: dict[str, list[Example]] = {split: [] for split in SPLITS}
    for example in sorted(examples, key=lambda e: (order[e.report_uid], e.image_id)):
        out[assignment[example.report_uid]].append(example)
    return out


def _split_counts(n: int, ratios: Sequence[float]) -> list[int]:
    total = float(sum(ratios))
    exact = [n * r / total for r in ratios]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(ratios)), key=lambda i: exact[i] - counts[i], reverse=True)[: n - sum(counts)]:
        counts[i] += 1
    for i, ratio in enumerate(ratios):  # a wanted split never ends up empty while another has spare groups
        if ratio > 0 and counts[i] == 0:
            donor = max(range(len(counts)), key=lambda j: counts[j])
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[i] += 1
    return counts


def leakage_check(splits: Any) -> dict[str, Any]:
    """Study ids, image ids and report uids shared by any two splits; ``ok`` is True when none are.

    ``splits``: a ``DatasetDict`` or a mapping of split name to a list of :class:`Example`.
    """
    ids: dict[str, dict[str, set[str]]] = {}
    for name, split in splits.items():
        ids[name] = {column: set(column_values(split, column)) for column in ("study_id", "image_id", "report_uid")
                     if _has_column(split, column)}
    pairs: dict[str, dict[str, list[str]]] = {}
    names = list(ids)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            shared = {column: sorted(ids[first][column] & ids[second].get(column, set()))
                      for column in ids[first]}
            pairs[f"{first}/{second}"] = shared
    ok = all(not values for shared in pairs.values() for values in shared.values())
    return {"ok": ok, "pairs": pairs}


def _has_column(split: Any, column: str) -> bool:
    if hasattr(split, "column_names"):
        return column in split.column_names
    return not split or hasattr(split[0], column)


# --- datasets -----------------------------------------------------------------------------------
def build_dataset(config: MedcapConfig, progress: bool = True) -> tuple[DatasetDict, DataReport]:
    """Load, split (by report, or R2Gen's), trim to the configured sizes and build the ``DatasetDict``."""
    if config.data_source == "hub":
        dd, report = standardise_hub_dataset(load_hub_dataset(config.hub_dataset_id), config)
        limits = {"train": config.max_train_examples, "validation": config.max_eval_examples,
                  "test": config.max_eval_examples}
        for split, limit in limits.items():
            if limit and len(dd[split]) > limit:
                dd[split] = dd[split].select(range(limit))
        return dd, report
    examples, report = load_examples(config, progress)
    if not examples:
        where = ", ".join(f"{name}={value!r}" for name, value in
                          (("data_path", config.data_path), ("images_dir", config.images_dir)) if value)
        raise DataSourceError(f"No usable examples in data_source={config.data_source!r}"
                              f"{' (' + where + ')' if where else ''}: "
                              f"{report.reports_total} reports, {report.dropped_empty_target} without "
                              f"{config.target}, {report.images_total} images found, {report.images_missing} "
                              f"missing, {len(report.skipped_images)} unreadable. Check data_path/images_dir.")
    if config.split_mode == "r2gen":
        splits = r2gen_splits(examples, report)
    else:
        splits = split_by_study(examples, config.split_ratios, config.seed)
    splits = {name: study_examples(items, config, name) for name, items in splits.items()}
    splits = _trim(splits, config.max_train_examples, config.max_eval_examples)
    dd = _to_dataset_dict(splits)
    if report.is_smoke_sample:
        for split in dd.values():
            split.info.description = f"SMOKE SAMPLE: {SMOKE_SAMPLE_NOTE}"
    _record_splits(report, splits)
    return dd, report


@lru_cache(maxsize=1)
def r2gen_split() -> dict[str, str]:
    """The standard R2Gen split of IU X-Ray (2,069 / 296 / 590 studies): study id -> split.

    Package data derived from R2Gen's ``annotation.json`` (ids only; ``scripts/make_r2gen_split.py``).
    Study ids are Open-i's ``CXR<uid>_IM-<series>``, which every source here produces.
    """
    values = json.loads(resources.files("medcap_helpers").joinpath(R2GEN_SPLIT_FILE).read_text())
    return {study: split for split in SPLITS for study in values[split]}


def r2gen_splits(examples: Sequence[Example], report: DataReport) -> dict[str, list[Example]]:
    """Examples placed by the R2Gen split; studies outside it are dropped and counted in ``report``.

    An R2Gen ``annotation.json`` source keeps the split it carries (the standard file's equals this one).
    """
    assignment = r2gen_split()
    splits: dict[str, list[Example]] = {split: [] for split in SPLITS}
    outside: set[str] = set()
    for example in examples:
        split = example.split or assignment.get(example.study_id)
        if split is None:
            outside.add(example.study_id)
            report.examples_outside_split += 1
        else:
            splits[split].append(example)
    report.studies_outside_split = len(outside)
    return splits


def _view_order(example: Example) -> tuple[int, str]:
    return ({"frontal": 0, "lateral": 1}.get(example.view, 2), example.image_id)


def one_image_per_study(examples: Sequence[Example]) -> list[Example]:
    """One example per report (a study, in IU X-Ray's sense): its frontal image, else the first by id."""
    by_report: dict[str, list[Example]] = defaultdict(list)
    for example in examples:
        by_report[example.report_uid].append(example)
    return [min(group, key=_view_order) for group in by_report.values()]


def two_view_studies(examples: Sequence[Example]) -> list[Example]:
    """One example per report with its first two views (frontal, lateral, then by id); ``image_path_2``
    is None for a one-image study. A third image, rare in IU X-Ray, is left out."""
    by_report: dict[str, list[Example]] = defaultdict(list)
    for example in examples:
        by_report[example.report_uid].append(example)
    studies = []
    for group in by_report.values():
        first, *rest = sorted(group, key=_view_order)
        studies.append(replace(first, image_path_2=rest[0].image_path if rest else None))
    return studies


def study_examples(examples: Sequence[Example], config: MedcapConfig, split: str) -> list[Example]:
    """A split's rows: one per study (validation, test, and training with ``views="both"``), or one per
    image (training with ``views="single"`` and ``example_unit="image"``). Order is kept."""
    if config.views == "both":
        return two_view_studies(examples)
    if split == "train" and config.example_unit == "image":
        return list(examples)
    return one_image_per_study(examples)


def _trim(splits: dict[str, list[Example]], max_train: int | None, max_eval: int | None) -> dict[str, list[Example]]:
    limits = {"train": max_train, "validation": max_eval, "test": max_eval}
    return {split: items[: limits[split]] if limits.get(split) else items for split, items in splits.items()}


def _record_splits(report: DataReport, splits: dict[str, Sequence[Example]]) -> None:
    report.split_sizes = {split: {"studies": len({e.study_id for e in items}),
                                  "reports": len({e.report_uid for e in items}), "examples": len(items)}
                          for split, items in splits.items()}
    report.examples = sum(len(items) for items in splits.values())


def _features() -> Any:
    from datasets import Features, Image, Value

    images = {"image": Image(mode="RGB"), "image_2": Image(mode="RGB")}
    return Features({c: images.get(c, Value("string")) for c in COLUMNS})


def _to_dataset_dict(splits: dict[str, Sequence[Example]]) -> DatasetDict:
    from datasets import Dataset, DatasetDict

    features = _features()
    return DatasetDict({
        split: Dataset.from_dict({
            "image": [e.image_path for e in items], "image_2": [e.image_path_2 for e in items],
            "text": [e.text for e in items],
            "study_id": [e.study_id for e in items], "image_id": [e.image_id for e in items],
            "view": [e.view for e in items], "report_uid": [e.report_uid for e in items],
        }, features=features)
        for split, items in splits.items()
    })


def standardise_hub_dataset(raw: Any, config: MedcapConfig) -> tuple[DatasetDict, DataReport]:
    """A hub dataset in our columns (:func:`~medcap_helpers.sources.hub_rows`), split.

    Existing train/validation/test splits are kept; otherwise rows are split by study.
    """
    from datasets import Dataset, DatasetDict

    report = DataReport(source="hub", target=config.target, example_unit=config.example_unit,
                        split_mode=config.split_mode, seed=config.seed, max_image_pixels=config.max_image_pixels)
    rows = hub_rows(raw, config, report)
    if all(r["_split"] for r in rows) and {r["_split"] for r in rows} >= {"train", "test"}:
        split_of = [r["_split"] for r in rows]
    else:
        assignment = assign_splits((r["study_id"] for r in rows), config.split_ratios, config.seed)
        split_of = [assignment[r["study_id"]] for r in rows]
    features = _features()
    dd = DatasetDict()
    for split in SPLITS:
        chosen = [r for r, s in zip(rows, split_of) if s == split]
        dd[split] = Dataset.from_dict({c: [r[c] for r in chosen] for c in COLUMNS}, features=features)
    report.images_total = report.examples = sum(len(d) for d in dd.values())
    report.split_sizes = {s: {"studies": len(set(dd[s]["study_id"])), "reports": len(set(dd[s]["report_uid"])),
                              "examples": len(dd[s])} for s in dd}
    return dd, report


# --- saving -------------------------------------------------------------------------------------
def save_dataset(dd: DatasetDict, report: DataReport, run_dir: str | Path) -> Path:
    """Write ``<run_dir>/dataset/`` (``save_to_disk`` + ``data_report.json``); replaces it atomically."""
    from datasets import DatasetDict

    target = Path(run_dir) / DATASET_FOLDER
    with atomic_folder(target) as staging:
        DatasetDict({name: split.with_format(None) for name, split in dd.items()}).save_to_disk(str(staging))
        write_text(staging / REPORT_NAME, json.dumps(report.to_dict(), indent=2) + "\n")
    return target


def load_saved_dataset(run_dir: str | Path) -> tuple[DatasetDict, DataReport]:
    """The ``DatasetDict`` and :class:`DataReport` written by :func:`save_dataset`."""
    from datasets import Image, load_from_disk

    folder = Path(run_dir) / DATASET_FOLDER
    if not folder_ready(folder, REPORT_NAME) or not (folder / "dataset_dict.json").is_file():
        raise StageNotRun(f"No saved dataset in '{folder.resolve()}': run the data stage first "
                          "(notebook 01_data, or `medcap run`, which starts with it).")
    dd = load_from_disk(str(folder))
    report = DataReport.from_dict(json.loads((folder / REPORT_NAME).read_text()))
    for name, split in dd.items():
        if len(split):
            first = split.with_format(None).cast_column("image", Image(decode=False))[0]["image"]
            path = first.get("path") if isinstance(first, dict) else None
            if path and not first.get("bytes") and not Path(path).is_file():
                warnings.warn(f"The saved dataset's {name} images are no longer at '{path}': the dataset stores "
                              "paths, so keep the image folders (and the run folder) in place or rebuild it.",
                              stacklevel=2)
                break
    return dd, report


# --- statistics (notebook 01) --------------------------------------------------------------------
def length_stats(texts: Sequence[str], tokenizer: Any = None) -> dict[str, Any]:
    """Words per text (and tokens, without special tokens, when a tokenizer is given): mean, quantiles."""
    import numpy as np

    def summary(lengths: Sequence[int]) -> dict[str, float]:
        values = np.asarray(lengths, dtype=float)
        if not values.size:
            return {"mean": 0.0, "median": 0.0, "p90": 0.0, "p95": 0.0, "min": 0.0, "max": 0.0}
        return {"mean": float(values.mean()), "median": float(np.median(values)),
                "p90": float(np.percentile(values, 90)), "p95": float(np.percentile(values, 95)),
                "min": float(values.min()), "max": float(values.max())}

    texts = list(texts)
    stats: dict[str, Any] = {"texts": len(texts), "words": summary([len(t.split()) for t in texts])}
    if tokenizer is not None:
        stats["tokens"] = summary([len(ids) for ids in _token_ids(tokenizer, texts)])
    return stats


def _token_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    if type(tokenizer).__module__.startswith("tokenizers"):  # a raw tokenizers.Tokenizer
        return [encoding.ids for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)]
    return list(tokenizer(texts, add_special_tokens=False)["input_ids"])


_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    """Normalised sentences of a report: lower-case, stripped, no end punctuation; list markers dropped."""
    sentences = []
    for raw in _SENTENCE_SPLIT.split(text or ""):
        sentence = raw.strip().lower().rstrip(".!? ").strip()
        if sentence and not re.fullmatch(r"\(?\d+[.)]?", sentence):
            sentences.append(sentence)
    return sentences


def top_sentences(texts: Sequence[str], n: int = 20) -> list[tuple[str, int, float]]:
    """The ``n`` sentences found in most reports: (sentence, reports containing it, share of reports)."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(set(split_sentences(text)))
    total = len(texts) or 1
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:n]
    return [(sentence, count, count / total) for sentence, count in ranked]


def report_lengths(texts: Sequence[str], tokenizer: Any = None) -> tuple[list[int], list[int] | None]:
    """Per-text word counts and (with a tokenizer) token counts, for histograms."""
    texts = list(texts)
    tokens = [len(ids) for ids in _token_ids(tokenizer, texts)] if tokenizer is not None else None
    return [len(t.split()) for t in texts], tokens


def unique_report_texts(split: Any) -> list[str]:
    """One text per report of a split (a study's two images share one report)."""
    texts = dict(zip(column_values(split, "report_uid"), column_values(split, "text")))
    return list(texts.values())


def collection_stats_markdown(stats: dict[str, int], target: str = "findings") -> str:
    return (f"Of the **{stats['reports']:,}** bundled Open-i reports, **{stats['with_target']:,}** have "
            f"{target.upper()} and **{stats['with_target_and_images']:,}** have {target.upper()} and at least one "
            f"image; {stats['without_images']:,} reports list no image at all ({stats['image_ids']:,} image ids in "
            f"total).")


def data_report_markdown(report: DataReport) -> str:
    """The data stage's counts as a table, with every drop and skip named."""
    rows = [("source", report.source), ("reports read", report.reports_total),
            ("malformed report files", len(report.reports_malformed)),
            (f"reports with {report.target}", report.reports_with_target),
            (f"reports dropped: empty {report.target}", report.dropped_empty_target),
            (f"reports with {report.target} and ≥1 image", report.reports_with_target_and_images),
            ("reports without a usable image", report.reports_without_images),
            ("images found", report.images_total), ("images named but missing", report.images_missing),
            ("images without a report", report.images_without_report),
            ("unreadable images skipped", len(report.skipped_images))]
    if report.split_mode == "r2gen":
        rows += [("studies outside the R2Gen split (dropped)", report.studies_outside_split),
                 ("images of those studies", report.examples_outside_split)]
    rows.append(("examples", report.examples))
    lines = ["| | |", "|---|---:|"] + [f"| {name} | {value:,} |" if isinstance(value, int) else
                                        f"| {name} | {value} |" for name, value in rows]
    lines += ["", "| split | studies | reports | examples |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {s['studies']} | {s['reports']} | {s['examples']} |" for name, s in report.split_sizes.items()]
    for path, reason in report.skipped_images[:20]:
        lines.append(f"\n- skipped `{path}`: {reason}")
    if report.is_smoke_sample:
        lines += ["", f"> **Smoke sample:** {SMOKE_SAMPLE_NOTE}."]
    return "\n".join(lines)


def leakage_summary(leakage: dict[str, Any]) -> str:
    lines = []
    for pair, shared in leakage["pairs"].items():
        counts = ", ".join(f"{len(values)} shared {column}s" for column, values in shared.items())
        lines.append(f"{pair}: {counts}")
    lines.append("no study, image or report sits in two splits" if leakage["ok"] else "LEAK: see the shared ids above")
    return "\n".join(lines)


def top_sentences_markdown(top: Sequence[tuple[str, int, float]]) -> str:
    lines = ["| # | sentence | reports | share |", "|---:|---|---:|---:|"]
    lines += [f"| {i} | {sentence} | {count} | {share:.1%} |" for i, (sentence, count, share) in enumerate(top, 1)]
    return "\n".join(lines)


def limit_rows(split: Any, limit: int | None) -> Any:
    """The first ``limit`` rows of a split (all when ``limit`` is None)."""
    return split if limit is None or len(split) <= limit else split.select(range(limit))


def stage_metrics(report: DataReport, leakage: dict[str, Any], lengths: dict[str, Any],
                  top: Sequence[tuple[str, int, float]], collection: dict[str, int]) -> dict[str, Any]:
    """What notebook 01 records for the pipeline."""
    return {**report.to_dict(), "leakage_ok": leakage["ok"], "leakage": leakage["pairs"], "lengths": lengths,
            "top_sentences": [{"sentence": s, "reports": c, "share": share} for s, c, share in top],
            "bundled_collection": collection}
