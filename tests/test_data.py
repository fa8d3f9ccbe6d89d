"""The data stage end to end: every local source, splits without leaks, the smoke sample, saving."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from medcap_helpers.config import MedcapConfig
from medcap_helpers.data import (
    SPLITS,
    assign_splits,
    build_dataset,
    leakage_check,
    length_stats,
    load_saved_dataset,
    one_image_per_study,
    save_dataset,
    split_by_study,
    split_sentences,
    standardise_hub_dataset,
    top_sentences,
)
from medcap_helpers.errors import DataSourceError
from medcap_helpers.images import load_image
from medcap_helpers.reports import (
    bundled_reports,
    kaggle_image_id,
    load_reports,
    study_id_from_image_id,
    target_text,
    xrv_reports_archive,
)
from medcap_helpers.smoke_sample import (
    SMOKE_SAMPLE_NOTE,
    findings_labels,
    generate_smoke_sample,
)
from medcap_helpers.sources import (
    COLUMNS,
    DataReport,
    Example,
    bundled_report_texts,
    load_examples,
)
from tests.fixtures import IMAGE_SIZE, SyntheticIU


@pytest.fixture(scope="module")
def bundled() -> None:
    try:
        xrv_reports_archive()
    except FileNotFoundError as err:
        pytest.skip(str(err))


def _config(tmp_path: Path, **overrides: object) -> MedcapConfig:
    values: dict[str, object] = {"run_dir": str(tmp_path / "run"), "smoke_num_reports": 12, "smoke_image_size": 64}
    values.update(overrides)
    return MedcapConfig.from_profile("smoke", **values)


@pytest.fixture(scope="module")
def smoke_build(tmp_path_factory: pytest.TempPathFactory, bundled: None) -> tuple[object, DataReport, Path]:
    run_dir = tmp_path_factory.mktemp("smoke")
    config = MedcapConfig.from_profile("smoke", run_dir=str(run_dir), smoke_num_reports=12, smoke_image_size=64)
    dd, report = build_dataset(config, progress=False)
    return dd, report, run_dir


def _openi_folder(iu_sample: Path, tmp_path: Path) -> Path:
    """The sample's Kaggle images, linked under their Open-i names (as in NLMCXR_png)."""
    folder = tmp_path / "NLMCXR_png"
    folder.mkdir()
    for image in sorted((iu_sample / "kaggle_normalized").glob("*.dcm.png")):
        (folder / f"{kaggle_image_id(image.name)}.png").symlink_to(image)
    return folder


# --- smoke ----------------------------------------------------------------------------------------
def test_smoke_dataset_is_labelled_split_and_decodes_to_rgb(smoke_build: tuple[object, DataReport, Path]) -> None:
    dd, report, run_dir = smoke_build
    assert report.is_smoke_sample and report.note == SMOKE_SAMPLE_NOTE and report.source == "smoke"
    assert all(SMOKE_SAMPLE_NOTE in split.info.description for split in dd.values())
    assert report.reports_total == report.reports_with_target_and_images == 12
    assert report.images_total == 24 and report.skipped_images == []
    assert list(dd) == list(SPLITS)
    assert {split: sizes["studies"] for split, sizes in report.split_sizes.items()} == {
        "train": 8, "validation": 1, "test": 3}
    # training: both images of each study; validation and test: one row per study (scores are per study)
    assert {split: sizes["examples"] for split, sizes in report.split_sizes.items()} == {
        "train": 16, "validation": 1, "test": 3}
    assert report.examples == sum(len(dd[s]) for s in SPLITS) == 20
    assert leakage_check(dd)["ok"]
    row = dd["train"][0]
    assert set(row) == set(COLUMNS)
    assert isinstance(row["image"], Image.Image) and row["image"].mode == "RGB" and row["image"].size == (64, 64)
    assert row["view"] in ("frontal", "lateral") and row["text"] and "XXXX" not in row["text"]
    assert Path(dd["train"].with_format(None).cast_column("image", _undecoded())[0]["image"]["path"]).is_relative_to(
        run_dir / "smoke_images")


def _undecoded() -> object:
    from datasets import Image as ImageFeature

    return ImageFeature(decode=False)


def test_smoke_sample_is_deterministic_and_mixed(tmp_path: Path, bundled: None) -> None:
    first = generate_smoke_sample(tmp_path / "a", n=20, seed=3, image_size=64)
    second = generate_smoke_sample(tmp_path / "b", n=20, seed=3, image_size=64)
    other = generate_smoke_sample(tmp_path / "c", n=20, seed=4, image_size=64)
    names = sorted(p.name for p in first.images_dir.glob("*.png"))
    assert len(names) == 40 and names == sorted(p.name for p in second.images_dir.glob("*.png"))
    for name in names:
        assert (first.images_dir / name).read_bytes() == (second.images_dir / name).read_bytes()
    assert [r.uid for r in first.reports] != [r.uid for r in other.reports]
    labels = list(first.labels.values())
    assert sum(lab.cardiomegaly for lab in labels) >= 4
    assert sum(bool(lab.opacities) for lab in labels) >= 4
    assert sum(bool(lab.effusions) for lab in labels) >= 4
    assert sum(lab.is_normal for lab in labels) >= 4
    manifest = json.loads((tmp_path / "a" / "smoke_sample.json").read_text())
    assert manifest["is_smoke_sample"] is True and manifest["note"] == SMOKE_SAMPLE_NOTE
    for report in first.reports:  # the XMLs are the bundled ones, byte for byte, and name these images
        assert {f"{i}.png" for i in report.image_ids} <= set(names)
    regenerated = generate_smoke_sample(tmp_path / "a", n=6, seed=3, image_size=64)
    assert len(list(regenerated.images_dir.glob("*.png"))) == 12  # an earlier, larger sample is cleared


def test_smoke_pictures_follow_their_reports(tmp_path: Path, bundled: None) -> None:
    sample = generate_smoke_sample(tmp_path, n=40, seed=0, image_size=128)
    frontal = {image_id.split("_")[0][3:]: image_id for image_id, view in sample.views.items() if view == "frontal"}

    def bright_heart_pixels(uid: str) -> int:
        pixels = np.asarray(Image.open(sample.images_dir / f"{frontal[uid]}.png"), dtype=np.float32) / 255
        heart_band = pixels[int(0.5 * 128):int(0.7 * 128), int(0.25 * 128):int(0.85 * 128)]
        return int((heart_band > 0.74).sum())

    enlarged = [bright_heart_pixels(u) for u, lab in sample.labels.items() if lab.cardiomegaly and not lab.opacities]
    normal = [bright_heart_pixels(u) for u, lab in sample.labels.items() if lab.is_normal]
    assert len(enlarged) >= 3 and len(normal) >= 3
    assert min(enlarged) > max(normal)
    assert np.mean(enlarged) > 1.4 * np.mean(normal)
    for uid, lab in sample.labels.items():
        report = next(r for r in sample.reports if r.uid == uid)
        if lab.cardiomegaly:
            assert "cardiomegaly" in report.findings.lower() or "enlarged" in report.findings.lower()
        if lab.is_normal:
            assert report.is_normal


def test_findings_labels_respect_negation_and_side() -> None:
    assert findings_labels("No cardiomegaly. No pleural effusion. Lungs are clear.").is_normal
    labels = findings_labels("Stable cardiomegaly. Small left pleural effusion. Nodule in the right upper lobe.")
    assert labels.cardiomegaly and labels.effusions == ["left"] and labels.opacities == [("right", "upper")]
    assert findings_labels("Bilateral pleural effusions.").effusions == ["right", "left"]


# --- openi / kaggle / r2gen on the real sample ----------------------------------------------------
def test_openi_loader_on_the_real_sample(iu_sample: Path, tmp_path: Path) -> None:
    images_dir = _openi_folder(iu_sample, tmp_path)
    config = _config(tmp_path, data_source="openi", data_path=str(iu_sample / "reports"), images_dir=str(images_dir))
    examples, report = load_examples(config, progress=False)
    referenced = sum(len(r.image_ids) for r in load_reports(iu_sample / "reports").reports)
    assert report.reports_total == 12
    assert report.dropped_empty_target == 2            # reports 3 and 1002 have no findings
    assert report.reports_with_target == 10
    assert report.reports_with_target_and_images == 7
    assert report.reports_without_images == 3          # 368, 383, 2843: their images are only in r2gen_layout
    assert report.images_total == 13 and report.images_without_report == 0
    assert report.images_missing == referenced - 13
    assert report.examples == len(examples) == 9
    by_image = {e.image_id: e for e in examples}
    assert sorted(e.image_id for e in examples if e.report_uid == "1000") == [
        "CXR1000_IM-0003-1001", "CXR1000_IM-0003-2001", "CXR1000_IM-0003-3001"]
    assert by_image["CXR1000_IM-0003-1001"].study_id == "CXR1000_IM-0003"
    assert by_image["CXR1000_IM-0003-1001"].text.startswith("There is increased opacity within the right upper lobe")
    assert by_image["CXR1000_IM-0003-1001"].view == "unknown"
    assert "CXR3_IM-1384-1001" not in by_image      # empty findings: dropped

    impression, report_i = load_examples(config.replace(target="impression", lowercase=True), progress=False)
    assert report_i.dropped_empty_target == 0 and len(impression) == 13
    assert all(e.text == e.text.lower() for e in impression)


def test_kaggle_csv_layout(iu_sample: Path, tmp_path: Path) -> None:
    folder = tmp_path / "kaggle"
    folder.mkdir()
    reports = load_reports(iu_sample / "reports").reports
    with open(folder / "indiana_reports.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["uid", "MeSH", "Problems", "image", "indication", "comparison", "findings", "impression"])
        for r in reports:
            writer.writerow([r.uid, ";".join(r.mesh_major), "", "Xray Chest PA and Lateral", r.indication,
                             r.comparison, r.findings, r.impression])
    with open(folder / "indiana_projections.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["uid", "filename", "projection"])
        for image in sorted((iu_sample / "kaggle_normalized").glob("*.dcm.png")):
            uid = image.name.split("_")[0]
            # the sample has no projections file: call the first image of a study frontal, for this test
            projection = "Frontal" if image.name.endswith("1001.dcm.png") else "Lateral"
            writer.writerow([uid, image.name, projection])
        writer.writerow(["99999", "99999_IM-9999-1001.dcm.png", "Frontal"])  # listed, not on disk
    config = _config(tmp_path, data_source="kaggle", data_path=str(folder),
                     images_dir=str(iu_sample / "kaggle_normalized"))
    dd, report = build_dataset(config, progress=False)
    assert report.reports_total == 12 and report.dropped_empty_target == 2
    assert report.images_total == 13 and report.images_missing == 1
    assert report.examples == sum(map(len, dd.values())) == 7  # 9 images; one row per study outside train
    assert leakage_check(dd)["ok"]
    examples = {e.image_id: e for e in load_examples(config, progress=False)[0]}
    assert examples["CXR1000_IM-0003-1001"].view == "frontal"
    assert examples["CXR1000_IM-0003-2001"].view == "lateral"
    assert examples["CXR1000_IM-0003-2001"].study_id == "CXR1000_IM-0003"
    rows_1000 = {(split, image_id) for split in dd for image_id in dd[split]["image_id"]
                 if image_id.startswith("CXR1000_")}
    (split_1000,) = {split for split, _ in rows_1000}  # a study stays in one split
    all_three = {f"CXR1000_IM-0003-{n}" for n in ("1001", "2001", "3001")}
    assert {image_id for _, image_id in rows_1000} == (  # outside train, one row per study: its frontal image
        all_three if split_1000 == "train" else {"CXR1000_IM-0003-1001"})

    studies, _ = build_dataset(config.replace(example_unit="study"), progress=False)
    study_rows = [row for split in studies.values() for row in split.with_format(None).remove_columns("image")]
    assert len(study_rows) == 7 and len({r["report_uid"] for r in study_rows}) == 7
    assert {r["image_id"] for r in study_rows if r["report_uid"] == "1000"} == {"CXR1000_IM-0003-1001"}
    image = studies["train"][0]["image"]
    assert image.mode == "RGB" and min(image.size) >= 2048   # real 8-bit grey radiograph, decoded lazily


def test_r2gen_split_file_and_layout(iu_sample: Path, tmp_path: Path) -> None:
    annotation = json.loads((iu_sample / "r2gen_annotation.json").read_text())
    assert {split: len(entries) for split, entries in annotation.items()} == {"train": 2069, "val": 296, "test": 590}
    split_of_study = {e["id"]: split for split, entries in annotation.items() for e in entries}
    config = _config(tmp_path, data_source="r2gen", data_path=str(iu_sample / "r2gen_annotation.json"),
                     images_dir=str(iu_sample / "r2gen_layout"), split_mode="r2gen")
    dd, report = build_dataset(config, progress=False)
    assert report.reports_total == 2955 and report.images_total == 5 and report.images_missing == 5905
    assert report.examples == 3 and report.reports_with_target_and_images == 3  # 5 images, 3 test studies
    assert leakage_check(dd)["ok"]
    names = {"train": "train", "validation": "val", "test": "test"}
    for split in SPLITS:
        for study in dd[split]["study_id"]:
            assert split_of_study[study] == names[split]
    rows = {row["image_id"]: row for split in dd.values() for row in split.with_format(None).remove_columns("image")}
    assert set(rows) == {"CXR2843_IM-1254-1001/1", "CXR368_IM-1832/0", "CXR383_IM-1932/0"}  # test: a row per study
    assert rows["CXR2843_IM-1254-1001/1"]["study_id"] == "CXR2843_IM-1254-1001"
    assert rows["CXR2843_IM-1254-1001/1"]["report_uid"] == "2843"
    assert rows["CXR368_IM-1832/0"]["text"].startswith("Cardiomediastinal silhouette and pulmonary vasculature")
    with pytest.raises(DataSourceError, match="findings only"):
        load_examples(config.replace(target="impression"), progress=False)
    with pytest.raises(DataSourceError, match="R2Gen images folder"):
        load_examples(config.replace(images_dir=None), progress=False)  # <annotation dir>/images is absent


# --- openi / kaggle / r2gen on the synthetic sample (tests/fixtures.py: runs on any clone) ---------
def _rows_without_images(dd: object) -> dict[str, dict]:
    return {row["image_id"]: {**row, "split": name} for name, split in dd.items()  # type: ignore[attr-defined]
            for row in split.with_format(None).remove_columns("image")}


def _assert_rows_per_split(dd: object, images_per_study: dict[str, int]) -> None:
    """Training rows: every image of the split's studies; validation and test: one row per study (scores are
    per study). Every study with an image is in exactly one split."""
    seen: dict[str, str] = {}
    for name, split in dd.items():  # type: ignore[attr-defined]
        studies = list(split["study_id"])
        for study in set(studies):
            assert study not in seen, f"{study} in {seen.get(study)} and {name}"
            seen[study] = name
        expected = sum(images_per_study[s] for s in set(studies)) if name == "train" else len(set(studies))
        assert len(studies) == expected, (name, studies)
    assert set(seen) == set(images_per_study)


def _assert_each_row_has_its_own_image(dd: object, grey: dict[str, int]) -> None:
    """Every synthetic image has a grey level of its own: a row showing another row's image fails."""
    seen = 0
    for split in dd.values():  # type: ignore[attr-defined]
        for row in split:
            image = row["image"]
            assert image.mode == "RGB" and image.size == IMAGE_SIZE, row["image_id"]
            assert np.unique(np.asarray(image)).tolist() == [grey[row["image_id"]]], row["image_id"]
            seen += 1
    assert seen > 0


def test_openi_loader_on_the_synthetic_sample(synthetic_iu: SyntheticIU, tmp_path: Path) -> None:
    config = _config(tmp_path, data_source="openi", data_path=str(synthetic_iu.reports_dir),
                     images_dir=str(synthetic_iu.openi_images))
    examples, report = load_examples(config, progress=False)
    assert report.reports_total == 6 and report.reports_malformed == []
    assert report.dropped_empty_target == 1              # report 3 has no FINDINGS section
    assert report.reports_with_target == 5
    assert report.reports_with_target_and_images == 4    # 1, 2, 4, 6
    assert report.reports_without_images == 1            # 5: none of its images is on disk
    assert report.images_total == 11 and report.images_without_report == 1   # CXR99
    assert report.images_missing == 3                    # one of 4's, both of 5's
    assert report.examples == len(examples) == 8 and report.skipped_images == []
    by_image = {e.image_id: e for e in examples}
    assert sorted(by_image) == ["CXR1_IM-0001-1001", "CXR1_IM-0001-2001", "CXR2_IM-0002-1001", "CXR2_IM-0002-2001",
                                "CXR2_IM-0002-3001", "CXR4_IM-0004-1001", "CXR6_IM-0006-1001", "CXR6_IM-0006-2001"]
    assert by_image["CXR2_IM-0002-3001"].study_id == "CXR2_IM-0002" and by_image["CXR2_IM-0002-3001"].report_uid == "2"
    assert by_image["CXR2_IM-0002-3001"].text == "Opacity in the right upper lobe. No pleural effusion."  # XXXX gone
    assert all(e.view == "unknown" for e in examples)    # Open-i does not record the view
    assert all(Path(e.image_path).is_absolute() and Path(e.image_path).parent == synthetic_iu.openi_images
               for e in examples)
    # Open-i's NLMCXR_reports.tgz gives the same examples as the folder of XMLs.
    from_tgz, tgz_report = load_examples(config.replace(data_path=str(synthetic_iu.reports_tgz)), progress=False)
    assert from_tgz == examples and tgz_report.to_dict() == report.to_dict()

    impression, report_i = load_examples(config.replace(target="impression", lowercase=True), progress=False)
    assert report_i.dropped_empty_target == 0 and len(impression) == 10
    assert {e.text for e in impression if e.report_uid == "3"} == {"no acute cardiopulmonary disease."}

    dd, _ = build_dataset(config, progress=False)
    assert leakage_check(dd)["ok"]
    _assert_rows_per_split(dd, {"CXR1_IM-0001": 2, "CXR2_IM-0002": 3, "CXR4_IM-0004": 1, "CXR6_IM-0006": 2})
    _assert_each_row_has_its_own_image(dd, synthetic_iu.grey)


def test_kaggle_csv_layout_on_the_synthetic_sample(synthetic_iu: SyntheticIU, tmp_path: Path) -> None:
    config = _config(tmp_path, data_source="kaggle", data_path=str(synthetic_iu.kaggle_dir))  # images_normalized/
    dd, report = build_dataset(config, progress=False)
    assert report.reports_total == 6 and report.dropped_empty_target == 1
    assert report.images_total == 11 and report.images_missing == 3 and report.images_without_report == 1
    assert report.reports_with_target_and_images == 4 and report.reports_without_images == 1
    assert report.examples == sum(s["examples"] for s in report.split_sizes.values()) == sum(map(len, dd.values()))
    assert leakage_check(dd)["ok"]
    _assert_rows_per_split(dd, {"CXR1_IM-0001": 2, "CXR2_IM-0002": 3, "CXR4_IM-0004": 1, "CXR6_IM-0006": 2})
    rows = _rows_without_images(dd)
    for row in rows.values():
        assert row["view"] == ("frontal" if row["image_id"].endswith("1001") else "lateral"), row
        assert row["study_id"] == row["image_id"].rsplit("-", 1)[0]
        assert row["report_uid"] == row["image_id"].split("_")[0].removeprefix("CXR")
    assert {row["text"] for row in rows.values() if row["report_uid"] == "4"} <= {"Mild cardiomegaly."}
    assert all(row["view"] == "frontal" for row in rows.values() if row["split"] != "train")  # a study's frontal
    _assert_each_row_has_its_own_image(dd, synthetic_iu.grey)

    studies, _ = build_dataset(config.replace(example_unit="study"), progress=False)
    study_rows = _rows_without_images(studies)
    assert sorted(row["report_uid"] for row in study_rows.values()) == ["1", "2", "4", "6"]
    assert all(row["view"] == "frontal" for row in study_rows.values())   # the frontal image of each report
    with pytest.raises(DataSourceError, match="Kaggle images folder"):
        load_examples(config.replace(images_dir=str(tmp_path / "absent")), progress=False)


def test_r2gen_split_file_and_layout_on_the_synthetic_sample(synthetic_iu: SyntheticIU, tmp_path: Path) -> None:
    config = _config(tmp_path, data_source="r2gen", data_path=str(synthetic_iu.r2gen_annotation),
                     split_mode="r2gen")  # images_dir: <annotation dir>/images
    dd, report = build_dataset(config, progress=False)
    assert report.reports_total == 6 and report.dropped_empty_target == 1      # CXR8's report is empty
    assert report.images_total == 9 and report.images_missing == 2              # CXR7_IM-0007/1, CXR6_IM-0006-1001/0
    assert report.reports_with_target_and_images == 5 and report.studies_outside_split == 0
    assert leakage_check(dd)["ok"]
    rows = _rows_without_images(dd)
    assert {image_id: row["split"] for image_id, row in rows.items()} == {    # R2Gen's own split is kept;
        "CXR1_IM-0001/0": "train", "CXR1_IM-0001/1": "train", "CXR2_IM-0002/0": "train", "CXR2_IM-0002/1": "train",
        "CXR7_IM-0007/0": "train", "CXR4_IM-0004/0": "validation",             # one row per study outside train
        "CXR6_IM-0006-1001/1": "test"}
    assert report.examples == len(rows) == 7
    assert rows["CXR6_IM-0006-1001/1"]["study_id"] == "CXR6_IM-0006-1001"
    assert rows["CXR6_IM-0006-1001/1"]["report_uid"] == "6"
    assert rows["CXR2_IM-0002/0"]["text"] == "Opacity in the right upper lobe. No pleural effusion."
    _assert_each_row_has_its_own_image(dd, synthetic_iu.grey)

    regrouped, _ = load_examples(config.replace(split_mode="random"), progress=False)
    assert len(regrouped) == 8 and all(e.split is None for e in regrouped)   # random mode ignores R2Gen's split
    with pytest.raises(DataSourceError, match="findings only"):
        load_examples(config.replace(target="impression"), progress=False)
    with pytest.raises(DataSourceError, match="R2Gen images folder"):
        load_examples(config.replace(images_dir=str(tmp_path / "absent")), progress=False)


def test_empty_targets_are_dropped_and_counted_on_the_synthetic_sample(synthetic_iu: SyntheticIU,
                                                                       tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    reports.mkdir()
    for uid in ("3", "4"):
        (reports / f"{uid}.xml").write_bytes((synthetic_iu.reports_dir / f"{uid}.xml").read_bytes())
    config = _config(tmp_path, data_source="openi", data_path=str(reports), images_dir=str(synthetic_iu.openi_images))
    examples, report = load_examples(config, progress=False)
    assert report.dropped_empty_target == 1 and [e.image_id for e in examples] == ["CXR4_IM-0004-1001"]
    assert report.images_without_report == 11 - 3   # 3 (dropped) still owns its 2 images; 4 has 1 on disk
    with pytest.raises(DataSourceError, match="No usable examples"):
        build_dataset(config.replace(data_path=str(reports / "3.xml")), progress=False)


# --- bad data ------------------------------------------------------------------------------------
def test_unreadable_images_are_skipped_and_listed_16bit_converted(tmp_path: Path, bundled: None) -> None:
    sample = generate_smoke_sample(tmp_path / "sample", n=6, seed=1, image_size=64)
    images = sorted(sample.images_dir.glob("*.png"))
    zero, truncated, text, wide = images[0], images[1], images[2], images[3]
    zero.write_bytes(b"")
    truncated.write_bytes(truncated.read_bytes()[:300])
    text.write_text("not a picture")
    grey = np.asarray(Image.open(wide), dtype=np.uint16) * 16          # a 12-bit radiograph in 16 bits
    Image.fromarray(grey).save(wide)
    (sample.images_dir / "CXR999999_IM-9999-1001.png").write_bytes(images[5].read_bytes())  # no report
    config = _config(tmp_path, data_source="openi", data_path=str(sample.reports_dir),
                     images_dir=str(sample.images_dir))
    dd, report = build_dataset(config, progress=False)
    skipped = dict(report.skipped_images)
    assert set(skipped) == {str(zero), str(truncated), str(text)}
    assert "empty" in skipped[str(zero)] and "truncated" in skipped[str(truncated)]
    assert "not an image" in skipped[str(text)]
    assert report.images_without_report == 1 and report.images_converted == 1
    assert report.examples == sum(map(len, dd.values())) == 8  # 9 usable images, one row per study outside train
    rows = [row for split in dd.values() for row in split]
    converted = next(r for r in rows if r["image_id"] == wide.stem)
    assert converted["image"].mode == "RGB"
    assert np.array_equal(np.asarray(converted["image"]), np.asarray(load_image(wide)))
    assert np.asarray(converted["image"]).max() > 200   # not clipped to white, not left dark


def test_dataset_rows_decode_like_load_image(tmp_path: Path) -> None:
    from datasets import Dataset, Features
    from datasets import Image as ImageFeature

    paths = []
    grey = np.random.default_rng(0).integers(0, 255, (20, 30), dtype=np.uint8)
    for name, image, kwargs in (("l.png", Image.fromarray(grey), {}),
                                ("p.png", Image.fromarray(grey).convert("P"), {}),
                                ("cmyk.jpg", Image.new("CMYK", (8, 8), (10, 200, 30, 5)), {}),
                                ("rgb.png", Image.fromarray(np.stack([grey] * 3, axis=-1)), {})):
        image.save(tmp_path / name, **kwargs)
        paths.append(str(tmp_path / name))
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(grey).save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    paths.append(str(tmp_path / "rotated.jpg"))
    dataset = Dataset.from_dict({"image": paths}, features=Features({"image": ImageFeature(mode="RGB")}))
    for path, row in zip(paths, dataset):
        assert np.array_equal(np.asarray(row["image"]), np.asarray(load_image(path))), path


def test_empty_targets_are_dropped_and_counted(iu_sample: Path, tmp_path: Path) -> None:
    images_dir = _openi_folder(iu_sample, tmp_path)
    reports = tmp_path / "reports"
    reports.mkdir()
    for uid in ("3", "1002", "42"):
        (reports / f"{uid}.xml").write_bytes((iu_sample / "reports" / f"{uid}.xml").read_bytes())
    config = _config(tmp_path, data_source="openi", data_path=str(reports), images_dir=str(images_dir))
    examples, report = load_examples(config, progress=False)
    assert report.dropped_empty_target == 2 and [e.report_uid for e in examples] == ["42"]
    assert report.images_without_report == 13 - 5   # 3, 1002 (dropped) still own their 4 images; 42 has 1
    with pytest.raises(DataSourceError, match="No usable examples"):
        build_dataset(config.replace(data_path=str(reports / "3.xml")), progress=False)


def test_clear_errors_for_unusable_settings(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="text only"):
        build_dataset(_config(tmp_path, data_source="xrv_reports"), progress=False)
    with pytest.raises(DataSourceError, match="needs images_dir"):
        load_examples(_config(tmp_path, data_source="openi", data_path=str(tmp_path)), progress=False)
    with pytest.raises(DataSourceError, match="data_path='.*nowhere' does not exist"):
        load_examples(_config(tmp_path, data_source="openi", data_path=str(tmp_path / "nowhere"),
                              images_dir=str(tmp_path)), progress=False)
    with pytest.raises(DataSourceError, match="indiana_reports.csv"):
        load_examples(_config(tmp_path, data_source="kaggle", data_path=str(tmp_path)), progress=False)
    with pytest.raises(FileNotFoundError, match="No saved dataset .*run the data stage first"):
        load_saved_dataset(tmp_path / "empty_run")


# --- splits ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundled_examples(bundled: None) -> list[Example]:
    """One example per image id of every bundled report with findings (fake paths: no pixels needed)."""
    return [Example(f"/nowhere/{image_id}.png", target_text(r), study_id_from_image_id(image_id), image_id, r.uid)
            for r in bundled_reports().reports if target_text(r) for image_id in r.image_ids]


def test_no_study_or_image_in_two_splits_over_many_seeds(bundled_examples: list[Example]) -> None:
    reports = len({e.report_uid for e in bundled_examples})
    assert reports == 3337 and len(bundled_examples) == len({e.image_id for e in bundled_examples}) == 6473
    for seed in range(20):
        splits = split_by_study(bundled_examples, (0.7, 0.1, 0.2), seed)
        check = leakage_check(splits)
        assert check["ok"], (seed, check)
        assert sorted(e.image_id for s in splits.values() for e in s) == sorted(e.image_id for e in bundled_examples)
        report_counts = [len({e.report_uid for e in splits[s]}) for s in SPLITS]
        assert report_counts == [2336, 334, 667]  # 7:1:2 of 3,337 reports, by largest remainder
        assert 0.66 < len(splits["train"]) / len(bundled_examples) < 0.74


def test_splits_are_deterministic_for_a_seed(bundled_examples: list[Example]) -> None:
    first = split_by_study(bundled_examples, seed=42)
    again = split_by_study(list(reversed(bundled_examples)), seed=42)
    other = split_by_study(bundled_examples, seed=43)
    assert {s: [e.image_id for e in first[s]] for s in SPLITS} == {s: [e.image_id for e in again[s]] for s in SPLITS}
    assert {e.report_uid for e in first["test"]} != {e.report_uid for e in other["test"]}


def test_leakage_check_finds_a_planted_leak(bundled_examples: list[Example]) -> None:
    splits = split_by_study(bundled_examples[:300], seed=0)
    leaked = splits["train"][0]
    splits["test"].append(leaked)
    check = leakage_check(splits)
    assert not check["ok"]
    assert check["pairs"]["train/test"]["study_id"] == [leaked.study_id]
    assert check["pairs"]["train/test"]["image_id"] == [leaked.image_id]
    assert check["pairs"]["train/validation"] == {"study_id": [], "image_id": [], "report_uid": []}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 3)), min_size=1, max_size=80),
       st.integers(0, 10**6))
def test_split_property_groups_never_straddle(pairs: list[tuple[int, int]], seed: int) -> None:
    examples = [Example(f"{uid}-{k}.png", "t", f"CXR{uid}_IM-1", f"CXR{uid}_IM-1-{k}", str(uid))
                for uid, k in sorted(set(pairs))]
    splits = split_by_study(examples, (0.7, 0.1, 0.2), seed)
    assert leakage_check(splits)["ok"]
    assert sum(len(s) for s in splits.values()) == len(examples)
    groups = len({e.report_uid for e in examples})
    if groups >= 3:
        assert all(splits[s] for s in SPLITS)
    assert assign_splits([e.report_uid for e in examples], seed=seed) == assign_splits(
        [e.report_uid for e in reversed(examples)], seed=seed)


def test_one_image_per_study_prefers_the_frontal_view() -> None:
    examples = [Example("a", "t", "S1", "CXR1_IM-1-1001", "1", "lateral"),
                Example("b", "t", "S1", "CXR1_IM-1-2001", "1", "frontal"),
                Example("c", "t", "S2", "CXR2_IM-2-2001", "2"), Example("d", "t", "S2", "CXR2_IM-2-1001", "2")]
    assert [e.image_path for e in one_image_per_study(examples)] == ["b", "d"]


# --- sizes, saving, hub -----------------------------------------------------------------------------
def test_example_limits_slice_deterministically(tmp_path: Path, bundled: None) -> None:
    full, _ = build_dataset(_config(tmp_path), progress=False)
    limited, report = build_dataset(_config(tmp_path, max_train_examples=5, max_eval_examples=2), progress=False)
    assert len(full["validation"]) == 1  # one study, one row
    assert {s: len(limited[s]) for s in SPLITS} == {"train": 5, "validation": 1, "test": 2}
    assert report.examples == 8 and report.split_sizes["train"]["examples"] == 5
    for split in SPLITS:
        assert list(limited[split]["image_id"]) == list(full[split]["image_id"])[: len(limited[split])]


def test_save_and_load_round_trip(smoke_build: tuple[object, DataReport, Path]) -> None:
    dd, report, run_dir = smoke_build
    folder = save_dataset(dd, report, run_dir)
    assert folder == run_dir / "dataset" and (folder / "data_report.json").is_file()
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".dataset")]
    loaded, loaded_report = load_saved_dataset(run_dir)
    assert loaded_report == report and loaded_report.is_smoke_sample
    assert SMOKE_SAMPLE_NOTE in loaded["train"].info.description
    for split in SPLITS:
        assert list(loaded[split]["image_id"]) == list(dd[split]["image_id"])  # type: ignore[index]
    image = loaded["test"][0]["image"]
    assert image.mode == "RGB" and image.size == (64, 64)
    save_dataset(dd, report, run_dir)  # replacing an existing save works
    assert load_saved_dataset(run_dir)[1].examples == report.examples


def test_hub_columns_are_mapped(smoke_build: tuple[object, DataReport, Path], tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    dd, _, run_dir = smoke_build
    paths = sorted(str(p) for p in (run_dir / "smoke_images").glob("*.png"))[:6]
    raw = DatasetDict({
        "train": Dataset.from_dict({"image": paths[:4], "findings": ["Heart normal.", "XXXX. Lungs clear.", "", "Ok."],
                                    "uid": ["1", "1", "2", "3"]}),
        "test": Dataset.from_dict({"image": paths[4:], "findings": ["Effusion.", "Effusion."], "uid": ["4", "4"]}),
    })
    config = _config(tmp_path, data_source="hub", hub_dataset_id="someone/iu_xray")
    hub, report = standardise_hub_dataset(raw, config)
    assert report.dropped_empty_target == 1 and report.examples == 5
    assert list(hub["train"]["text"]) == ["Heart normal.", "Lungs clear.", "Ok."]
    assert len(hub["validation"]) == 0 and list(hub["test"]["study_id"]) == ["4", "4"]
    assert hub["test"][0]["image"].mode == "RGB" and leakage_check(hub)["ok"]
    with pytest.raises(DataSourceError, match="no impression column"):
        standardise_hub_dataset(raw, config.replace(target="impression"))


# --- statistics --------------------------------------------------------------------------------------
def test_length_stats_words_and_tokens() -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    texts = ["The heart is normal.", "No effusion.", "Lungs are clear and expanded."]
    words = sorted({w for t in texts for w in t.replace(".", " .").split()})
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    raw = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = Whitespace()
    stats = length_stats(texts, raw)
    assert stats["texts"] == 3
    assert stats["words"]["max"] == 5 and stats["words"]["min"] == 2 and stats["words"]["median"] == 4
    assert stats["tokens"]["max"] == 6 and stats["tokens"]["min"] == 3   # words + the full stop
    wrapped = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    assert length_stats(texts, wrapped)["tokens"] == stats["tokens"]
    assert length_stats([])["words"]["mean"] == 0.0


def test_top_sentences_counts_reports_not_repeats() -> None:
    texts = ["No pneumothorax. Heart normal. No pneumothorax.", "no pneumothorax", "Heart normal. Effusion.",
             "1. Effusion. 2. Heart normal."]
    top = top_sentences(texts, n=2)
    assert top == [("heart normal", 3, 0.75), ("effusion", 2, 0.5)]  # ties: alphabetical
    counts = {s: c for s, c, _ in top_sentences(texts, n=10)}
    assert counts == {"heart normal": 3, "no pneumothorax": 2, "effusion": 2}
    assert split_sentences("1. Effusion. 2. Heart normal!") == ["effusion", "heart normal"]


def test_bundled_report_texts(bundled: None) -> None:
    findings = bundled_report_texts("findings")
    assert len(findings) == 3425 and all(t and "XXXX" not in t for t in findings)
    assert len(bundled_report_texts("impression", lowercase=True)) == 3921


def test_relative_run_dir_gives_absolute_image_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     bundled: None) -> None:
    monkeypatch.chdir(tmp_path)
    examples, _ = load_examples(MedcapConfig.from_profile("smoke", run_dir="runs/rel", smoke_num_reports=6,
                                                          smoke_image_size=32), progress=False)
    assert examples and all(Path(e.image_path).is_absolute() for e in examples)
    assert all(Path(e.image_path).is_relative_to(tmp_path / "runs" / "rel" / "smoke_images") for e in examples)
