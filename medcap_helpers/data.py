"""The data stage: IU X-Ray from any of its copies -> leak-free splits -> a ``datasets.DatasetDict``.

Sources (``config.data_source``):

* ``openi``  report XMLs (folder or ``NLMCXR_reports.tgz``) + ``images_dir`` of PNGs named
  ``CXR<uid>_IM-....png`` (Kaggle ``.dcm.png`` names are accepted too).
* ``r2gen``  ``annotation.json`` + ``images_dir`` (default ``<annotation dir>/images``) holding
  ``<study>/<n>.png``; ``split_mode="r2gen"`` keeps its train/val/test split.
* ``kaggle`` folder with ``indiana_reports.csv``, ``indiana_projections.csv`` and ``images_normalized/``.
* ``xrv_reports`` the 3,955 XMLs bundled with ``torchxrayvision``: text only (statistics, tokenizer).
* ``hub``    ``datasets.load_dataset(hub_dataset_id)`` with its columns mapped (see :func:`standardise_hub_dataset`).
* ``smoke``  real bundled reports + placeholder images drawn from them (:mod:`medcap_helpers.smoke_sample`),
  written to the run folder and read back by the ``openi`` loader.

Rows: ``image`` (``datasets.Image(mode="RGB")``: file paths, decoded lazily to 8-bit RGB), ``text``
(the cleaned target), ``study_id``, ``image_id``, ``view`` (frontal|lateral|unknown), ``report_uid``.

Splits group by report uid, so every image of a study (and of a report spanning two series) lands in
one split. Images whose pixels PIL's ``convert("RGB")`` would spoil (16-bit grey is clipped, alpha is
dropped) are converted once through :func:`medcap_helpers.images.load_image` into
``<run_dir>/converted_images/``, so lazily decoded rows always equal ``load_image``'s result.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import shutil
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from medcap_helpers.images import ImageLoadError, inspect_image, load_image
from medcap_helpers.reports import (
    UNKNOWN_VIEW,
    Report,
    bundled_reports,
    clean_text,
    image_id_from_filename,
    kaggle_image_id,
    load_reports,
    normalise_view,
    r2gen_image_id,
    r2gen_study_id,
    report_uid,
    study_id_from_image_id,
    target_text,
    xrv_reports_archive,
)
from medcap_helpers.runs import write_json
from medcap_helpers.smoke_sample import SMOKE_SAMPLE_NOTE, generate_smoke_sample

if TYPE_CHECKING:
    from datasets import DatasetDict

    from medcap_helpers.config import MedcapConfig

SPLITS = ("train", "validation", "test")
VALIDATION = "validation"
DATASET_FOLDER = "dataset"
REPORT_NAME = "data_report.json"
CONVERTED_FOLDER = "converted_images"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
COLUMNS = ("image", "text", "study_id", "image_id", "view", "report_uid")
_R2GEN_SPLITS = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}


class DataSourceError(ValueError):
    """The configured data cannot be used as asked; the message says which file/setting and what to do."""


@dataclass(frozen=True)
class Example:
    """One image with the text to write for it."""

    image_path: str
    text: str
    study_id: str
    image_id: str
    report_uid: str
    view: str = UNKNOWN_VIEW
    split: str | None = None
    """Set only by a source that carries its own split (R2Gen)."""


@dataclass
class DataReport:
    """What the data stage read, kept, dropped and why. Counts are of reports unless named images."""

    source: str
    is_smoke_sample: bool = False
    note: str = ""
    target: str = "findings"
    example_unit: str = "image"
    split_mode: str = "random"
    seed: int = 42
    max_image_pixels: int = 50_000_000
    reports_total: int = 0
    reports_malformed: list[tuple[str, str]] = field(default_factory=list)
    reports_with_target: int = 0
    reports_with_target_and_images: int = 0
    reports_without_images: int = 0
    """Reports with a target but no usable image (none on disk, or all unreadable)."""
    dropped_empty_target: int = 0
    images_total: int = 0
    """Image files found (for R2Gen: referenced files that exist)."""
    images_missing: int = 0
    """Images a report names that are not on disk."""
    images_without_report: int = 0
    images_converted: int = 0
    skipped_images: list[tuple[str, str]] = field(default_factory=list)
    """(path, reason) of every unreadable image."""
    examples: int = 0
    split_sizes: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataReport:
        known = {f.name for f in fields(cls)}
        report = cls(**{k: v for k, v in values.items() if k in known})
        report.reports_malformed = [tuple(x) for x in report.reports_malformed]  # type: ignore[misc]
        report.skipped_images = [tuple(x) for x in report.skipped_images]  # type: ignore[misc]
        return report


# --- loading ------------------------------------------------------------------------------------
def load_examples(config: MedcapConfig, progress: bool = True) -> tuple[list[Example], DataReport]:
    """Read the configured source into examples (one per usable image) and a :class:`DataReport`."""
    report = DataReport(source=config.data_source, target=config.target, example_unit=config.example_unit,
                        split_mode=config.split_mode, seed=config.seed, max_image_pixels=config.max_image_pixels)
    source = config.data_source
    if source == "smoke":
        sample = generate_smoke_sample(config.run_dir, n=config.smoke_num_reports, seed=config.seed,
                                       image_size=config.smoke_image_size)
        report.is_smoke_sample, report.note = True, SMOKE_SAMPLE_NOTE
        reports = load_reports(sample.reports_dir)
        examples = _openi_examples(reports.reports, sample.images_dir, config, report, sample.views, progress)
        report.reports_malformed = reports.malformed
    elif source == "openi":
        reports_path = _existing(config.data_path, "data_path", "the Open-i report XML folder or NLMCXR_reports.tgz")
        if not config.images_dir:
            raise DataSourceError("data_source='openi' needs images_dir: the folder of Open-i PNGs "
                                  "(NLMCXR_png, e.g. from `python -m medcap_helpers.download data/`).")
        images_dir = _existing(config.images_dir, "images_dir", "the folder of Open-i PNGs")
        reports = load_reports(reports_path, progress=progress)
        report.reports_malformed = reports.malformed
        examples = _openi_examples(reports.reports, images_dir, config, report, None, progress)
    elif source == "r2gen":
        examples = _r2gen_examples(config, report, progress)
    elif source == "kaggle":
        examples = _kaggle_examples(config, report, progress)
    elif source == "xrv_reports":
        raise DataSourceError("data_source='xrv_reports' holds report text only (the XMLs bundled with "
                              "torchxrayvision have no images): use it for statistics or tokenizer training "
                              "(bundled_report_texts()), and data_source='openi', 'r2gen', 'kaggle' or 'smoke' "
                              "to build an image dataset.")
    elif source == "hub":
        raise DataSourceError("data_source='hub' rows come from the hub, not from files: call build_dataset().")
    else:
        raise DataSourceError(f"Unknown data_source {source!r}.")
    report.examples = len(examples)
    return examples, report


def _openi_examples(reports: Sequence[Report], images_dir: Path, config: MedcapConfig, report: DataReport,
                    views: dict[str, str] | None, progress: bool) -> list[Example]:
    files: dict[str, Path] = {}
    for path in sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        try:
            files[image_id_from_filename(path.name)] = path
        except ValueError:
            report.images_without_report += 1  # not named in the Open-i or Kaggle scheme
    report.images_total = len(files) + report.images_without_report
    referenced: set[str] = set()
    candidates: list[tuple[Report, str, list[tuple[str, Path]]]] = []
    for rep in reports:
        referenced.update(rep.image_ids)
        text = target_text(rep, config.target, config.lowercase)
        present = [(image_id, files[image_id]) for image_id in rep.image_ids if image_id in files]
        report.images_missing += len(rep.image_ids) - len(present)
        candidates.append((rep, text, present))
    report.images_without_report += sum(1 for image_id in files if image_id not in referenced)
    views = views or {}
    return _verified_examples(
        ((rep.uid, text, [(str(path), image_id, study_id_from_image_id(image_id),
                           views.get(image_id, UNKNOWN_VIEW), None) for image_id, path in present])
         for rep, text, present in candidates),
        config, report, progress)


def _r2gen_examples(config: MedcapConfig, report: DataReport, progress: bool) -> list[Example]:
    annotation = _existing(config.data_path, "data_path", "R2Gen's iu_xray annotation.json")
    if config.target != "findings":
        raise DataSourceError(f"R2Gen's {annotation.name} holds the findings only; use target='findings', or "
                              "data_source='openi' for impressions.")
    try:
        splits = json.loads(annotation.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataSourceError(f"{annotation} is not valid JSON ({err}).") from None
    if not isinstance(splits, dict) or not set(splits) & set(_R2GEN_SPLITS):
        raise DataSourceError(f"{annotation} is not an R2Gen annotation file: expected keys train/val/test.")
    images_dir = Path(config.images_dir) if config.images_dir else annotation.parent / "images"
    if not images_dir.is_dir():
        raise DataSourceError(f"R2Gen images folder '{images_dir}' not found: set images_dir to the folder that "
                              "holds <study id>/0.png, <study id>/1.png.")
    keep_split = config.split_mode == "r2gen"
    groups = []
    for split_name, entries in splits.items():
        split = _R2GEN_SPLITS.get(split_name)
        if split is None:
            continue
        if not isinstance(entries, list):
            raise DataSourceError(f"{annotation}: '{split_name}' must be a list of entries, got "
                                  f"{type(entries).__name__}.")
        for number, entry in enumerate(entries):
            if not isinstance(entry, dict) or "id" not in entry or not isinstance(entry.get("image_path", []), list):
                raise DataSourceError(f"{annotation}: entry {number} of '{split_name}' is not an R2Gen entry "
                                      "({'id': ..., 'report': ..., 'image_path': [...]}); got "
                                      f"{str(entry)[:120]!r}.")
            report.reports_total += 1
            study = str(entry["id"])
            text = clean_text(str(entry.get("report") or ""), config.lowercase)
            images = []
            for relative in entry.get("image_path", []):
                path = images_dir / relative
                if not path.is_file():
                    report.images_missing += 1
                    continue
                report.images_total += 1
                images.append((str(path), r2gen_image_id(relative), r2gen_study_id(relative), UNKNOWN_VIEW,
                               split if keep_split else None))
            groups.append((_uid_or(study), text, images))
    return _verified_examples(groups, config, report, progress, count_reports=False)


def _kaggle_examples(config: MedcapConfig, report: DataReport, progress: bool) -> list[Example]:
    folder = _existing(config.data_path, "data_path", "the Kaggle folder with indiana_reports.csv")
    reports_csv = _existing(folder / "indiana_reports.csv", "data_path", "indiana_reports.csv")
    projections_csv = _existing(folder / "indiana_projections.csv", "data_path", "indiana_projections.csv")
    images_dir = Path(config.images_dir) if config.images_dir else folder / "images_normalized"
    if not images_dir.is_dir():
        raise DataSourceError(f"Kaggle images folder '{images_dir}' not found: set images_dir to the "
                              "images_normalized/ folder.")
    rows = _read_csv(reports_csv, ("uid", "findings", "impression"))
    projections = _read_csv(projections_csv, ("uid", "filename", "projection"))
    by_uid: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in projections:
        by_uid[row["uid"].strip()].append(row)
    on_disk = {p.name for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    report.images_total = len(on_disk)
    uids = {row["uid"].strip() for row in rows}
    with_report = {row["filename"].strip() for row in projections if row["uid"].strip() in uids}
    report.images_without_report = len(on_disk - with_report)
    report.images_missing = sum(1 for row in projections if row["filename"].strip() not in on_disk)
    groups = []
    for row in rows:
        uid = row["uid"].strip()
        rep = Report(uid=uid, findings=row.get("findings") or "", impression=row.get("impression") or "")
        text = target_text(rep, config.target, config.lowercase)
        images = []
        for proj in by_uid.get(uid, []):
            name = proj["filename"].strip()
            if name not in on_disk:
                continue
            try:
                image_id = kaggle_image_id(name)
            except ValueError:  # listed, but not named like the Kaggle copy: keep it as its own study
                image_id = study = Path(name).stem
            else:
                study = study_id_from_image_id(image_id)
            images.append((str(images_dir / name), image_id, study, normalise_view(proj.get("projection")), None))
        groups.append((uid, text, images))
    report.reports_total = len(rows)
    return _verified_examples(groups, config, report, progress, count_reports=False)


def _verified_examples(groups: Iterable[tuple[str, str, list[tuple[str, str, str, str, str | None]]]],
                       config: MedcapConfig, report: DataReport, progress: bool,
                       count_reports: bool = True) -> list[Example]:
    """Examples of every report with a target, after a header check of each image.

    ``groups``: (report uid, cleaned text, [(path, image id, study id, view, split)]).
    """
    groups = list(groups)
    if count_reports:
        report.reports_total = len(groups)
    converted_dir = Path(config.run_dir) / CONVERTED_FOLDER
    examples: list[Example] = []
    total_images = sum(len(images) for _, text, images in groups if text)
    with tqdm(total=total_images, desc="Checking images", unit="img", disable=not progress) as bar:
        for uid, text, images in groups:
            if not text:
                report.dropped_empty_target += 1
                continue
            report.reports_with_target += 1
            kept = 0
            for path, image_id, study, view, split in images:
                bar.update(1)
                try:
                    info = inspect_image(path, config.max_image_pixels)
                    if not info.converts_natively:
                        path = _converted_copy(path, image_id, converted_dir, config.max_image_pixels)
                        report.images_converted += 1
                except ImageLoadError as err:
                    report.skipped_images.append((path, str(err)))
                    continue
                # absolute: notebooks and the trainer may run from another working directory
                examples.append(Example(os.path.abspath(path), text, study, image_id, uid, view, split))
                kept += 1
            if kept:
                report.reports_with_target_and_images += 1
            else:
                report.reports_without_images += 1
    return examples


def _converted_copy(path: str, image_id: str, folder: Path, max_pixels: int) -> str:
    """8-bit RGB PNG of ``path`` made by :func:`load_image` (reused when already there)."""
    target = folder / (re.sub(r"[^A-Za-z0-9_.-]", "_", image_id) + ".png")
    if not target.is_file() or target.stat().st_mtime < os.stat(path).st_mtime:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        load_image(path, max_pixels).save(tmp, format="PNG")
        os.replace(tmp, target)
    return str(target)


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
        ids[name] = {column: set(_column(split, column)) for column in ("study_id", "image_id", "report_uid")
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


def _column(split: Any, column: str) -> list[Any]:
    if hasattr(split, "column_names"):  # a datasets.Dataset: read the column without decoding images
        return list(split.with_format(None).select_columns([column])[column])
    return [getattr(example, column) for example in split]


# --- datasets -----------------------------------------------------------------------------------
def build_dataset(config: MedcapConfig, progress: bool = True) -> tuple[DatasetDict, DataReport]:
    """Load, split (by report, or R2Gen's), trim to the configured sizes and build the ``DatasetDict``."""
    if config.data_source == "hub":
        dd, report = _build_hub_dataset(config)
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
    if config.example_unit == "study":
        examples = one_image_per_study(examples)
    if config.split_mode == "r2gen":
        splits = {split: [e for e in examples if e.split == split] for split in SPLITS}
    else:
        splits = split_by_study(examples, config.split_ratios, config.seed)
    splits = _trim(splits, config.max_train_examples, config.max_eval_examples)
    dd = _to_dataset_dict(splits)
    if report.is_smoke_sample:
        for split in dd.values():
            split.info.description = f"SMOKE SAMPLE: {SMOKE_SAMPLE_NOTE}"
    _record_splits(report, splits)
    return dd, report


def one_image_per_study(examples: Sequence[Example]) -> list[Example]:
    """One example per report (a study, in IU X-Ray's sense): its frontal image, else the first by id."""
    by_report: dict[str, list[Example]] = defaultdict(list)
    for example in examples:
        by_report[example.report_uid].append(example)
    return [min(group, key=lambda e: (e.view != "frontal", e.image_id)) for group in by_report.values()]


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

    return Features({"image": Image(mode="RGB"), **{c: Value("string") for c in COLUMNS[1:]}})


def _to_dataset_dict(splits: dict[str, Sequence[Example]]) -> DatasetDict:
    from datasets import Dataset, DatasetDict

    features = _features()
    return DatasetDict({
        split: Dataset.from_dict({
            "image": [e.image_path for e in items], "text": [e.text for e in items],
            "study_id": [e.study_id for e in items], "image_id": [e.image_id for e in items],
            "view": [e.view for e in items], "report_uid": [e.report_uid for e in items],
        }, features=features)
        for split, items in splits.items()
    })


# --- hub ----------------------------------------------------------------------------------------
_HUB_TEXT_COLUMNS = {
    "findings": ("findings", "finding", "report", "text", "caption"),
    "impression": ("impression", "impressions"),
}
_HUB_IMAGE_COLUMNS = ("image", "img", "images", "image_path", "path")
_HUB_STUDY_COLUMNS = ("study_id", "study", "uid", "id")
_HUB_SPLIT_NAMES = {"train": "train", "validation": "validation", "val": "validation", "valid": "validation",
                    "dev": "validation", "test": "test"}


def _build_hub_dataset(config: MedcapConfig) -> tuple[DatasetDict, DataReport]:
    from datasets import load_dataset

    try:
        raw = load_dataset(config.hub_dataset_id)
    except Exception as err:  # network, auth, missing repo: all reported the same way
        raise DataSourceError(f"Cannot load hub dataset {config.hub_dataset_id!r}: {err}. Check the id and the "
                              "connection (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE must be unset).") from None
    return standardise_hub_dataset(raw, config)


def standardise_hub_dataset(raw: Any, config: MedcapConfig) -> tuple[DatasetDict, DataReport]:
    """Map a hub dataset's columns to ours (best effort; IU X-Ray uploads differ) and split it.

    Picks the first present of: image ``image/img/images/image_path/path``; text per target
    (``findings/finding/report/text/caption``, ``impression/impressions``, both joined for ``both``);
    study ``study_id/study/uid/id`` (else one study per row: then no leakage guarantee is possible).
    Existing train/validation/test splits are kept; otherwise rows are split by study.
    """
    from datasets import Dataset, DatasetDict

    report = DataReport(source="hub", target=config.target, example_unit=config.example_unit,
                        split_mode=config.split_mode, seed=config.seed, max_image_pixels=config.max_image_pixels)
    parts = raw if isinstance(raw, dict) else {"train": raw}
    rows: list[dict[str, Any]] = []
    for split_name, part in parts.items():
        columns = part.column_names
        image_col = _pick(columns, _HUB_IMAGE_COLUMNS, "image", config.hub_dataset_id)
        targets = ("findings", "impression") if config.target == "both" else (config.target,)
        text_cols = [_pick(columns, _HUB_TEXT_COLUMNS[t], t, config.hub_dataset_id) for t in targets]
        study_col = next((c for c in _HUB_STUDY_COLUMNS if c in columns), None)
        plain = part.cast_column(image_col, _image_feature(decode=False)) if image_col in columns else part
        for index, row in enumerate(plain):
            report.reports_total += 1
            text = " ".join(t for t in (clean_text(row.get(c), config.lowercase) for c in text_cols) if t)
            if not text:
                report.dropped_empty_target += 1
                continue
            report.reports_with_target += 1
            study = str(row[study_col]) if study_col else f"{split_name}-{index}"
            image_id = str(row.get("image_id") or f"{study}/{index}")
            rows.append({"image": row[image_col], "text": text, "study_id": study, "image_id": image_id,
                         "view": normalise_view(row.get("view") or row.get("projection")),
                         "report_uid": study, "_split": _HUB_SPLIT_NAMES.get(split_name)})
    report.reports_with_target_and_images = report.reports_with_target
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


def _image_feature(decode: bool) -> Any:
    from datasets import Image

    return Image(decode=decode)


def _pick(columns: Sequence[str], candidates: Sequence[str], what: str, dataset_id: str | None) -> str:
    for name in candidates:
        if name in columns:
            return name
    raise DataSourceError(f"Hub dataset {dataset_id!r} has no {what} column (looked for {list(candidates)}; "
                          f"it has {list(columns)}). Use data_source='openi'/'r2gen'/'kaggle' with local files.")


# --- saving -------------------------------------------------------------------------------------
def save_dataset(dd: DatasetDict, report: DataReport, run_dir: str | Path) -> Path:
    """Write ``<run_dir>/dataset/`` (``save_to_disk`` + ``data_report.json``); replaces it atomically."""
    from datasets import DatasetDict

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / DATASET_FOLDER
    staging = run_dir / f".{DATASET_FOLDER}.tmp-{os.getpid()}"
    old = run_dir / f".{DATASET_FOLDER}.old-{os.getpid()}"
    for leftover in (staging, old):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        DatasetDict({name: split.with_format(None) for name, split in dd.items()}).save_to_disk(str(staging))
        write_json(staging / REPORT_NAME, report.to_dict())
        if target.exists():
            os.replace(target, old)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_saved_dataset(run_dir: str | Path) -> tuple[DatasetDict, DataReport]:
    """The ``DatasetDict`` and :class:`DataReport` written by :func:`save_dataset`."""
    from datasets import load_from_disk

    folder = Path(run_dir) / DATASET_FOLDER
    if not (folder / "dataset_dict.json").is_file() or not (folder / REPORT_NAME).is_file():
        raise FileNotFoundError(f"No saved dataset in '{folder}': run the data stage first "
                                "(notebook 01_data, or `medcap run` which starts with it).")
    dd = load_from_disk(str(folder))
    report = DataReport.from_dict(json.loads((folder / REPORT_NAME).read_text()))
    for name, split in dd.items():
        if len(split):
            first = split.with_format(None).cast_column("image", _image_feature(decode=False))[0]["image"]
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


def bundled_report_texts(target: str = "findings", lowercase: bool = False) -> list[str]:
    """Non-empty cleaned ``target`` texts of the 3,955 bundled reports (tokenizer training, statistics)."""
    texts = (target_text(r, target, lowercase) for r in bundled_reports().reports)
    return [t for t in texts if t]


def report_lengths(texts: Sequence[str], tokenizer: Any = None) -> tuple[list[int], list[int] | None]:
    """Per-text word counts and (with a tokenizer) token counts, for histograms."""
    texts = list(texts)
    tokens = [len(ids) for ids in _token_ids(tokenizer, texts)] if tokenizer is not None else None
    return [len(t.split()) for t in texts], tokens


def unique_report_texts(split: Any) -> list[str]:
    """One text per report of a split (a study's two images share one report)."""
    texts = dict(zip(_column(split, "report_uid"), _column(split, "text")))
    return list(texts.values())


def bundled_collection_stats(target: str = "findings") -> dict[str, int]:
    """How many of the 3,955 bundled Open-i reports can be training targets at all."""
    parsed = bundled_reports()
    with_target = [r for r in parsed.reports if target_text(r, target)]
    return {"reports": len(parsed.reports), "malformed": len(parsed.malformed),
            "with_target": len(with_target), "with_target_and_images": sum(bool(r.image_ids) for r in with_target),
            "image_ids": sum(len(r.image_ids) for r in parsed.reports),
            "without_images": sum(not r.image_ids for r in parsed.reports)}


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
            ("unreadable images skipped", len(report.skipped_images)), ("examples", report.examples)]
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


def tokenizer_training_texts(config: MedcapConfig, dataset: Any) -> list[str] | None:
    """Texts to train the tiny model's tokenizer on: the bundled reports minus validation/test reports.

    Held-out reports are left out so not even the vocabulary sees them. None for real BLIP, whose
    tokenizer comes with the model.
    """
    from medcap_helpers.config import TINY_MODEL

    if config.model_name != TINY_MODEL:
        return None
    held_out = {uid for name in ("validation", "test") if name in dataset for uid in _column(dataset[name], "report_uid")}
    texts = (target_text(r, config.target, config.lowercase) for r in bundled_reports().reports if r.uid not in held_out)
    return [t for t in texts if t]


def limit_rows(split: Any, limit: int | None) -> Any:
    """The first ``limit`` rows of a split (all when ``limit`` is None)."""
    return split if limit is None or len(split) <= limit else split.select(range(limit))


def stage_metrics(report: DataReport, leakage: dict[str, Any], lengths: dict[str, Any],
                  top: Sequence[tuple[str, int, float]], collection: dict[str, int]) -> dict[str, Any]:
    """What notebook 01 records for the pipeline."""
    return {**report.to_dict(), "leakage_ok": leakage["ok"], "leakage": leakage["pairs"], "lengths": lengths,
            "top_sentences": [{"sentence": s, "reports": c, "share": share} for s, c, share in top],
            "bundled_collection": collection}


# --- helpers ------------------------------------------------------------------------------------
def _existing(value: str | Path | None, setting: str, what: str) -> Path:
    if not value:
        raise DataSourceError(f"{setting} is not set: give {what}.")
    path = Path(value).expanduser()
    if not path.exists():
        raise DataSourceError(f"{setting}='{value}' does not exist: give {what}.")
    return path


def _uid_or(identifier: str) -> str:
    try:
        return report_uid(identifier)
    except ValueError:
        return identifier


def _read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise DataSourceError(f"{path} lacks column(s) {missing}; it has {reader.fieldnames}. Is this the "
                                      "Kaggle IU X-Ray CSV?")
            return list(reader)
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataSourceError(f"{path} is not a readable UTF-8 CSV file ({type(err).__name__}: {err}).") from None


__all__ = [
    "COLUMNS", "DataReport", "DataSourceError", "Example", "SPLITS", "assign_splits", "build_dataset",
    "bundled_report_texts", "leakage_check", "length_stats", "load_examples",
    "load_saved_dataset", "one_image_per_study", "save_dataset", "split_by_study", "split_sentences",
    "standardise_hub_dataset", "top_sentences", "xrv_reports_archive",
]
