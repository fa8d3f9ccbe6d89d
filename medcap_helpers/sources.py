"""Data sources: IU X-Ray from any of its copies, and MIMIC-CXR in R2Gen's layout, read into
:class:`Example` rows and a :class:`DataReport`.

Sources (``config.data_source``):

* ``openi``  report XMLs (folder or ``NLMCXR_reports.tgz``) + ``images_dir`` of PNGs named
  ``CXR<uid>_IM-....png`` (Kaggle ``.dcm.png`` names are accepted too).
* ``r2gen``  ``annotation.json`` + ``images_dir`` (default ``<annotation dir>/images``) holding
  ``<study>/<n>.png``; ``split_mode="r2gen"`` keeps its train/val/test split.
* ``mimic_r2gen`` R2Gen's MIMIC-CXR ``annotation.json`` (one entry per image, the study's report in each)
  + ``images_dir`` (default ``<annotation dir>/images``) holding ``p10/p10000032/s50414267/<dicom id>.jpg``;
  studies are keyed by ``study_id``, ``split_mode="r2gen"`` keeps the file's split. Read by the same code
  as ``r2gen`` (:data:`R2GEN_LAYOUTS`). Users bring the credentialed data (PhysioNet).
* ``kaggle`` folder with ``indiana_reports.csv``, ``indiana_projections.csv`` and ``images_normalized/``.
* ``xrv_reports`` the 3,955 XMLs bundled with ``torchxrayvision``: text only (statistics, tokenizer).
* ``hub``    ``datasets.load_dataset(hub_dataset_id)`` with its columns mapped (see :func:`hub_rows`).
* ``smoke``  real bundled reports + placeholder images drawn from them (:mod:`medcap_helpers.smoke_sample`),
  written to the run folder and read back by the ``openi`` loader.

Images whose pixels PIL's ``convert("RGB")`` would spoil (16-bit grey is clipped, alpha is dropped)
are converted once through :func:`medcap_helpers.images.load_image` into ``<run_dir>/converted_images/``,
so lazily decoded rows always equal ``load_image``'s result. Splitting and the dataset itself are
:mod:`medcap_helpers.data`'s job.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from medcap_helpers.atomic import atomic_file
from medcap_helpers.config import LOCAL_MODELS, MedcapConfig
from medcap_helpers.errors import DataSourceError, ImageLoadError
from medcap_helpers.images import inspect_image, load_image
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
)
from medcap_helpers.smoke_sample import SMOKE_SAMPLE_NOTE, generate_smoke_sample

CONVERTED_FOLDER = "converted_images"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
COLUMNS = ("image", "image_2", "text", "study_id", "image_id", "view", "report_uid")
"""``image_2`` is a study's second view (``views="both"``), else None; ``image_id``/``view`` are the first's."""
_R2GEN_SPLITS = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}


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
    image_path_2: str | None = None
    """The study's second view, when an example is a two-view study (``views="both"``)."""


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
    studies_outside_split: int = 0
    """Studies ``split_mode="r2gen"`` dropped because the R2Gen split does not list them."""
    examples_outside_split: int = 0
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
    elif source in R2GEN_LAYOUTS:
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


@dataclass(frozen=True)
class AnnotationLayout:
    """How one collection's R2Gen ``annotation.json`` names its reports, studies and images."""

    collection: str
    image_example: str
    """An image path as the annotation lists it (relative to the images folder), for messages."""
    other_source: str
    """The data source for the other collection's annotation, named when an image path does not fit."""
    image_pattern: re.Pattern[str]
    report_key: Callable[[dict[str, Any]], str]
    """The entries that share a report (IU X-Ray: one entry a study; MIMIC-CXR: one entry an image)."""
    image_ids: Callable[[dict[str, Any], str], tuple[str, str]]
    """(study id, image id) of an entry's image path."""


def _iu_image_ids(entry: dict[str, Any], relative: str) -> tuple[str, str]:
    try:
        return r2gen_study_id(relative), r2gen_image_id(relative)
    except ValueError as err:
        raise DataSourceError(f"R2Gen IU X-Ray annotation: {err}") from None


def _mimic_image_ids(entry: dict[str, Any], relative: str) -> tuple[str, str]:
    return str(entry["study_id"]), Path(relative).stem  # the image's DICOM id


R2GEN_LAYOUTS = {
    "r2gen": AnnotationLayout(
        collection="IU X-Ray", image_example="CXR368_IM-1832/0.png", other_source="mimic_r2gen",
        image_pattern=re.compile(r"[^/]+/[^/]+\.png"), report_key=lambda entry: str(entry["id"]),
        image_ids=_iu_image_ids),
    "mimic_r2gen": AnnotationLayout(
        collection="MIMIC-CXR", image_example="p10/p10000032/s50414267/<dicom_id>.jpg", other_source="r2gen",
        image_pattern=re.compile(r"p\d{2}/p\d+/s\d+/[^/]+\.jpg"), report_key=lambda entry: str(entry["study_id"]),
        image_ids=_mimic_image_ids),
}
"""``data_source`` -> the layout of its R2Gen annotation.json (R2Gen's ``iu_xray`` and ``mimic_cxr`` folders)."""


def _r2gen_examples(config: MedcapConfig, report: DataReport, progress: bool) -> list[Example]:
    """Examples of an R2Gen ``annotation.json`` (``data_source`` "r2gen" or "mimic_r2gen"), with its split."""
    layout = R2GEN_LAYOUTS[config.data_source]
    annotation = _annotation_file(config, layout)
    if config.target != "findings":
        other = ", or data_source='openi' for impressions" if layout.collection == "IU X-Ray" else ""
        raise DataSourceError(f"R2Gen's {annotation.name} holds the findings only; use target='findings'{other}.")
    try:
        splits = json.loads(annotation.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataSourceError(f"{annotation} is not valid JSON ({err}).") from None
    if not isinstance(splits, dict) or not set(splits) & set(_R2GEN_SPLITS):
        raise DataSourceError(f"{annotation} is not an R2Gen annotation file: expected keys train/val/test.")
    images_dir = Path(config.images_dir) if config.images_dir else annotation.parent / "images"
    if not images_dir.is_dir():
        raise DataSourceError(f"R2Gen images folder '{images_dir}' not found: set images_dir to the folder of "
                              f"{layout.collection} images that holds {layout.image_example} (R2Gen's images/ "
                              f"beside {annotation.name}).")
    keep_split = config.split_mode == "r2gen"
    reports: dict[str, tuple[str, str, list[tuple[str, str, str, str, str | None]]]] = {}
    for split_name, entries in splits.items():
        split = _R2GEN_SPLITS.get(split_name)
        if split is None:
            continue
        if not isinstance(entries, list):
            raise DataSourceError(f"{annotation}: '{split_name}' must be a list of entries, got "
                                  f"{type(entries).__name__}.")
        for number, entry in enumerate(entries):
            _check_entry(entry, number, split_name, annotation, layout)
            key = layout.report_key(entry)
            if key not in reports:  # MIMIC-CXR lists a study's report once per image
                reports[key] = (_uid_or(key), clean_text(str(entry.get("report") or ""), config.lowercase), [])
            for relative in entry.get("image_path", []):
                if not layout.image_pattern.fullmatch(Path(relative).as_posix()):
                    raise DataSourceError(
                        f"{annotation}: '{relative}' is not an R2Gen {layout.collection} image path like "
                        f"{layout.image_example}: is this the other collection's annotation (data_source="
                        f"{layout.other_source!r})?")
                path = images_dir / relative
                if not path.is_file():
                    report.images_missing += 1
                    continue
                report.images_total += 1
                study, image_id = layout.image_ids(entry, relative)
                reports[key][2].append((str(path), image_id, study, UNKNOWN_VIEW, split if keep_split else None))
    report.reports_total = len(reports)
    return _verified_examples(reports.values(), config, report, progress, count_reports=False)


def _annotation_file(config: MedcapConfig, layout: AnnotationLayout) -> Path:
    annotation = _existing(config.data_path, "data_path", f"R2Gen's {layout.collection} annotation.json")
    if annotation.is_dir():
        inside = annotation / "annotation.json"
        raise DataSourceError(f"data_path='{config.data_path}' is a folder: give R2Gen's {layout.collection} "
                              f"annotation.json file itself{f' ({inside})' if inside.is_file() else ''}.")
    return annotation


def _check_entry(entry: Any, number: int, split_name: str, annotation: Path, layout: AnnotationLayout) -> None:
    required = ("id", "study_id") if layout.collection == "MIMIC-CXR" else ("id",)
    if (not isinstance(entry, dict) or any(key not in entry for key in required)
            or not isinstance(entry.get("image_path", []), list)):
        fields_shown = ", ".join(f"'{key}': ..." for key in required)
        raise DataSourceError(f"{annotation}: entry {number} of '{split_name}' is not an R2Gen {layout.collection} "
                              f"entry ({{{fields_shown}, 'report': ..., 'image_path': [...]}}); got "
                              f"{str(entry)[:120]!r}. Is this the other collection's annotation (data_source="
                              f"{layout.other_source!r})?")


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
        with atomic_file(target) as tmp:
            load_image(path, max_pixels).save(tmp, format="PNG")
    return str(target)


_HUB_TEXT_COLUMNS = {
    "findings": ("findings", "finding", "report", "text", "caption"),
    "impression": ("impression", "impressions"),
}
_HUB_IMAGE_COLUMNS = ("image", "img", "images", "image_path", "path")
_HUB_STUDY_COLUMNS = ("study_id", "study", "uid", "id")
_HUB_SPLIT_NAMES = {"train": "train", "validation": "validation", "val": "validation", "valid": "validation",
                    "dev": "validation", "test": "test"}


def hub_rows(raw: Any, config: MedcapConfig, report: DataReport) -> list[dict[str, Any]]:
    """A hub dataset's rows in our columns (best effort; IU X-Ray uploads differ), plus ``_split``.

    Picks the first present of: image ``image/img/images/image_path/path``; text per target
    (``findings/finding/report/text/caption``, ``impression/impressions``, both joined for ``both``);
    study ``study_id/study/uid/id`` (else one study per row: then no leakage guarantee is possible).
    ``_split`` is the row's hub split when its name is a known one, else None.
    """
    from datasets import Image

    parts = raw if isinstance(raw, dict) else {"train": raw}
    rows: list[dict[str, Any]] = []
    for split_name, part in parts.items():
        columns = part.column_names
        image_col = _pick(columns, _HUB_IMAGE_COLUMNS, "image", config.hub_dataset_id)
        targets = ("findings", "impression") if config.target == "both" else (config.target,)
        text_cols = [_pick(columns, _HUB_TEXT_COLUMNS[t], t, config.hub_dataset_id) for t in targets]
        study_col = next((c for c in _HUB_STUDY_COLUMNS if c in columns), None)
        plain = part.cast_column(image_col, Image(decode=False)) if image_col in columns else part
        for index, row in enumerate(plain):
            report.reports_total += 1
            text = " ".join(t for t in (clean_text(row.get(c), config.lowercase) for c in text_cols) if t)
            if not text:
                report.dropped_empty_target += 1
                continue
            report.reports_with_target += 1
            study = str(row[study_col]) if study_col else f"{split_name}-{index}"
            image_id = str(row.get("image_id") or f"{study}/{index}")
            rows.append({"image": row[image_col], "image_2": None, "text": text, "study_id": study, "image_id": image_id,
                         "view": normalise_view(row.get("view") or row.get("projection")),
                         "report_uid": study, "_split": _HUB_SPLIT_NAMES.get(split_name)})
    report.reports_with_target_and_images = report.reports_with_target
    return rows


def load_hub_dataset(dataset_id: str | None) -> Any:
    """``datasets.load_dataset(dataset_id)`` with an error that says what to check."""
    from datasets import load_dataset

    try:
        return load_dataset(dataset_id)
    except Exception as err:  # network, auth, missing repo: all reported the same way
        raise DataSourceError(f"Cannot load hub dataset {dataset_id!r}: {err}. Check the id and the "
                              "connection (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE must be unset).") from None


def _pick(columns: Sequence[str], candidates: Sequence[str], what: str, dataset_id: str | None) -> str:
    for name in candidates:
        if name in columns:
            return name
    raise DataSourceError(f"Hub dataset {dataset_id!r} has no {what} column (looked for {list(candidates)}; "
                          f"it has {list(columns)}). Use data_source='openi'/'r2gen'/'kaggle' with local files.")


# --- the bundled report XMLs (text only) -------------------------------------------------------------
def bundled_report_texts(target: str = "findings", lowercase: bool = False) -> list[str]:
    """Non-empty cleaned ``target`` texts of the 3,955 bundled reports (tokenizer training, statistics)."""
    texts = (target_text(r, target, lowercase) for r in bundled_reports().reports)
    return [t for t in texts if t]


def bundled_collection_stats(target: str = "findings") -> dict[str, int]:
    """How many of the 3,955 bundled Open-i reports can be training targets at all."""
    parsed = bundled_reports()
    with_target = [r for r in parsed.reports if target_text(r, target)]
    return {"reports": len(parsed.reports), "malformed": len(parsed.malformed),
            "with_target": len(with_target), "with_target_and_images": sum(bool(r.image_ids) for r in with_target),
            "image_ids": sum(len(r.image_ids) for r in parsed.reports),
            "without_images": sum(not r.image_ids for r in parsed.reports)}


def tokenizer_training_texts(config: MedcapConfig, dataset: Any) -> list[str] | None:
    """Texts to train the tiny model's tokenizer on: the bundled reports minus validation/test reports.

    Held-out reports are left out so not even the vocabulary sees them. None for real BLIP, whose
    tokenizer comes with the model.
    """
    if config.model_name not in LOCAL_MODELS:
        return None
    held_out = {uid for name in ("validation", "test") if name in dataset for uid in column_values(dataset[name], "report_uid")}
    texts = (target_text(r, config.target, config.lowercase) for r in bundled_reports().reports if r.uid not in held_out)
    return [t for t in texts if t]


def column_values(split: Any, column: str) -> list[Any]:
    """One column of a ``datasets.Dataset`` (read without decoding images) or of a list of :class:`Example`."""
    if hasattr(split, "column_names"):
        return list(split.with_format(None).select_columns([column])[column])
    return [getattr(example, column) for example in split]


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
