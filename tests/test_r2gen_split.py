"""The standard R2Gen split, shipped as study ids, applied to any source by study id."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from medcap_helpers import data
from medcap_helpers.config import MedcapConfig
from medcap_helpers.reports import (
    bundled_reports,
    clean_text,
    study_id_from_image_id,
    xrv_reports_archive,
)
from medcap_helpers.sources import DataReport, Example, load_examples

NAMES = {"train": "train", "val": "validation", "test": "test"}


def test_the_packaged_split_has_the_published_sizes_and_no_study_twice() -> None:
    split = data.r2gen_split()
    assert Counter(split.values()) == {"train": 2069, "validation": 296, "test": 590}
    packaged = json.loads((Path(data.__file__).parent / data.R2GEN_SPLIT_FILE).read_text())
    assert sum(len(packaged[s]) for s in data.SPLITS) == len(split)  # no id listed in two splits
    assert "report" not in json.dumps(packaged)[:2000].lower().replace("r2gen", "")  # ids only, no text


def test_the_packaged_split_is_r2gens_own(iu_sample: Path) -> None:
    annotation = json.loads((iu_sample / "r2gen_annotation.json").read_text())
    expected = {entry["id"]: NAMES[name] for name, entries in annotation.items() for entry in entries}
    assert data.r2gen_split() == expected


def test_the_bundled_collection_yields_exactly_the_r2gen_studies() -> None:
    try:
        xrv_reports_archive()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    studies = {study_id_from_image_id(image_id) for report in bundled_reports().reports
               if clean_text(report.findings) for image_id in report.image_ids}
    split = data.r2gen_split()
    counts = Counter(split[s] for s in studies if s in split)
    assert counts == {"train": 2069, "validation": 296, "test": 590}


def test_studies_outside_the_split_are_dropped_and_counted() -> None:
    split = data.r2gen_split()
    inside = [s for s in sorted(split) if split[s] == "test"][:2]
    examples = [Example(f"/x/{s}-1001.png", "text", s, f"{s}-1001", s[3:].split("_")[0]) for s in inside]
    examples.append(Example("/x/CXR999999_IM-1-1001.png", "text", "CXR999999_IM-1", "CXR999999_IM-1-1001", "999999"))
    report = DataReport(source="openi", split_mode="r2gen")
    splits = data.r2gen_splits(examples, report)
    assert [e.study_id for e in splits["test"]] == inside and not splits["train"] and not splits["validation"]
    assert report.studies_outside_split == 1 and report.examples_outside_split == 1
    assert "studies outside the R2Gen split (dropped) | 1" in data.data_report_markdown(report)


def test_an_open_i_layout_lands_where_r2gen_puts_each_study(iu_sample: Path, tmp_path: Path) -> None:
    config = MedcapConfig.from_profile("smoke", run_dir=str(tmp_path), data_source="openi",
                                       data_path=str(iu_sample / "reports"),
                                       images_dir=str(iu_sample / "kaggle_normalized"), split_mode="r2gen")
    dd, report = data.build_dataset(config, progress=False)
    annotation = json.loads((iu_sample / "r2gen_annotation.json").read_text())
    expected = {entry["id"]: NAMES[name] for name, entries in annotation.items() for entry in entries}
    placed = {study: name for name in data.SPLITS for study in dd[name]["study_id"]}
    assert placed and all(expected[study] == name for study, name in placed.items())
    examples, _ = load_examples(config.replace(split_mode="random"), progress=False)
    every_study = {e.study_id for e in examples}
    assert set(placed) == every_study & set(expected)
    assert report.studies_outside_split == len(every_study - set(expected))
    assert report.examples == sum(len(dd[s]) for s in data.SPLITS) == len(examples) - report.examples_outside_split
