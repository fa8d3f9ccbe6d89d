"""data_source="mimic_r2gen": R2Gen's MIMIC-CXR annotation.json, read from a synthetic tree in its layout.

``mimic_cxr/annotation.json`` lists one entry per image (``id`` is the DICOM id) with the study's report;
images are ``mimic_cxr/images/p<2 digits>/p<subject>/s<study>/<dicom id>.jpg``. Every synthetic JPEG is
a uniform grey level of its own, so a row that shows another row's image fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medcap_helpers.config import MedcapConfig
from medcap_helpers.data import build_dataset, leakage_check
from medcap_helpers.errors import ConfigError, DataSourceError

# split -> [(subject, study, report, [(dicom id, on disk)])]
STUDIES = {
    "train": [("10000032", "50414267", "No acute cardiopulmonary process. Heart size is normal.",
               [("02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", True),
                ("174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962", True)]),
              ("10000032", "53189527", "Mild pulmonary edema. Small bilateral pleural effusions.",
               [("2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab", True)]),
              ("10000764", "57375967", "Right lower lobe opacity concerning for pneumonia.",
               [("096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4", True),
                ("b79e55c3-735ce5ac-64412506-cdc9ea79-f1af521f", True),
                ("c8a8fbc6-8c9c3ee4-5d1d2a51-ffb1c6e4-3a1e5d6f", True)])],
    "val": [("11000011", "51029426", "Cardiomegaly without pulmonary edema.",
             [("8959e402-2175d68d-edba5a6c-520f6d4b-a0e2ad6b", True),
              ("9c42d877-dfcd9e4c-1f8b3d2e-5a6b7c8d-9e0f1a2b", True)])],
    "test": [("12000018", "52000001", "Left basilar atelectasis. No pneumothorax.",
              [("0c4eb1e1-b801903c-bcebe8a4-3da9cd3c-3b94a27c", False),
               ("1d5fc2f2-c912a14d-cdfcf9b5-4eba0de4-4ca5b38d", True)]),
             ("12000018", "52000002", "", [("2e6ad3a3-da23b25e-de0d0ac6-5fcb1ef5-5db6c49e", True)])],
}


def _write_tree(root: Path) -> dict[str, int]:
    """annotation.json and the JPEGs; returns each written image's grey level by DICOM id."""
    grey: dict[str, int] = {}
    annotation: dict[str, list[dict[str, object]]] = {}
    for split, studies in STUDIES.items():
        annotation[split] = []
        for subject, study, report, images in studies:
            for dicom, on_disk in images:
                relative = f"p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"
                annotation[split].append({"id": dicom, "study_id": int(study), "subject_id": int(subject),
                                          "report": report, "image_path": [relative], "split": split})
                if on_disk:
                    grey[dicom] = 20 + 25 * len(grey)
                    path = root / "images" / relative
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.new("L", (24, 20), grey[dicom]).save(path, format="JPEG", quality=95)
    (root / "annotation.json").write_text(json.dumps(annotation))
    return grey


@pytest.fixture
def mimic(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    root = tmp_path / "mimic_cxr"
    return root, _write_tree(root)


def _config(tmp_path: Path, annotation: Path, **overrides: object) -> MedcapConfig:
    values: dict[str, object] = {"run_dir": str(tmp_path / "run"), "data_source": "mimic_r2gen",
                                 "data_path": str(annotation), "split_mode": "r2gen"}
    values.update(overrides)
    return MedcapConfig.from_profile("smoke", **values)


def test_rows_studies_and_split_come_from_the_annotation(mimic: tuple[Path, dict[str, int]], tmp_path: Path) -> None:
    root, grey = mimic
    dd, report = build_dataset(_config(tmp_path, root / "annotation.json"), progress=False)
    assert report.reports_total == 6 and report.dropped_empty_target == 1  # studies, the empty report dropped
    assert report.images_missing == 1 and report.images_total == 10
    assert report.reports_with_target_and_images == 5
    assert {split: len(dd[split]) for split in dd} == {"train": 6, "validation": 1, "test": 1}  # train: every image
    assert sorted(set(dd["train"]["study_id"])) == ["50414267", "53189527", "57375967"]
    assert dd["validation"]["study_id"] == ["51029426"] and dd["test"]["study_id"] == ["52000001"]
    assert dd["test"]["image_id"] == ["1d5fc2f2-c912a14d-cdfcf9b5-4eba0de4-4ca5b38d"]  # the one on disk
    assert leakage_check(dd)["ok"]
    for split in dd.values():
        for row in split:
            assert row["report_uid"] == row["study_id"]
            assert abs(int(np.asarray(row["image"]).mean()) - grey[row["image_id"]]) <= 2, row["image_id"]
    texts = dict(zip(dd["train"]["study_id"], dd["train"]["text"], strict=True))
    assert texts["53189527"] == "Mild pulmonary edema. Small bilateral pleural effusions."


def test_both_views_pairs_a_studys_first_two_images(mimic: tuple[Path, dict[str, int]], tmp_path: Path) -> None:
    root, grey = mimic
    dd, _ = build_dataset(_config(tmp_path, root / "annotation.json", views="both"), progress=False)
    train = {row["study_id"]: row for row in dd["train"]}
    assert set(train) == {"50414267", "53189527", "57375967"}  # one row a study
    three = train["57375967"]  # its third image is left out
    assert three["image_id"] == "096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4"
    assert abs(int(np.asarray(three["image_2"]).mean()) - grey["b79e55c3-735ce5ac-64412506-cdc9ea79-f1af521f"]) <= 2
    assert train["53189527"]["image_2"] is None


def test_random_split_keeps_every_study_apart(mimic: tuple[Path, dict[str, int]], tmp_path: Path) -> None:
    root, _ = mimic
    dd, report = build_dataset(_config(tmp_path, root / "annotation.json", split_mode="random",
                                       split_ratios=(0.6, 0.2, 0.2)), progress=False)
    assert leakage_check(dd)["ok"]
    assert sum(s["studies"] for s in report.split_sizes.values()) == 5


def test_clear_errors(mimic: tuple[Path, dict[str, int]], synthetic_iu, tmp_path: Path) -> None:
    root, _ = mimic
    annotation = root / "annotation.json"
    with pytest.raises(ConfigError, match="needs data_path"):
        MedcapConfig.from_profile("smoke", data_source="mimic_r2gen")
    with pytest.raises(DataSourceError, match=r"is a folder: give R2Gen's MIMIC-CXR annotation.json file itself \("):
        build_dataset(_config(tmp_path, root), progress=False)
    with pytest.raises(DataSourceError, match="findings only"):
        build_dataset(_config(tmp_path, annotation, target="impression"), progress=False)
    with pytest.raises(DataSourceError, match="R2Gen images folder .* p10/p10000032/s50414267/<dicom_id>.jpg"):
        build_dataset(_config(tmp_path, annotation, images_dir=str(tmp_path / "nowhere")), progress=False)
    with pytest.raises(DataSourceError, match="not an R2Gen MIMIC-CXR entry .*data_source='r2gen'"):
        build_dataset(_config(tmp_path, synthetic_iu.r2gen_annotation), progress=False)
    iu_paths = json.loads(annotation.read_text())
    iu_paths["val"][0]["image_path"] = ["CXR1_IM-0001/0.png"]
    (root / "iu_paths.json").write_text(json.dumps(iu_paths))
    with pytest.raises(DataSourceError, match="'CXR1_IM-0001/0.png' is not an R2Gen MIMIC-CXR image path like "
                                              "p10/p10000032/s50414267/<dicom_id>.jpg"):
        build_dataset(_config(tmp_path, root / "iu_paths.json"), progress=False)
    with pytest.raises(DataSourceError, match="not an R2Gen IU X-Ray image path .*data_source='mimic_r2gen'"):
        build_dataset(_config(tmp_path, annotation, data_source="r2gen", images_dir=str(root / "images")),
                      progress=False)
    broken = json.loads(annotation.read_text())
    del broken["train"][0]["study_id"]
    (root / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(DataSourceError, match="entry 0 of 'train' is not an R2Gen MIMIC-CXR entry"):
        build_dataset(_config(tmp_path, root / "broken.json"), progress=False)
