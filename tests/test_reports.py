"""Report parsing, text cleaning and id mapping, on the real Open-i XMLs."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import pytest

from medcap_helpers.reports import (
    ParsedReports,
    Report,
    ReportParseError,
    bundled_reports,
    clean_text,
    image_id_from_filename,
    iter_reports,
    kaggle_image_id,
    load_reports,
    normalise_view,
    openi_image_id,
    parse_report_xml,
    r2gen_image_id,
    r2gen_study_id,
    read_report,
    report_uid,
    study_id_from_image_id,
    target_text,
    xrv_reports_archive,
)

# Measured once on torchxrayvision's NLMCXR_reports.tgz (the full Open-i report set).
BUNDLED_REPORTS = 3955
BUNDLED_WITH_FINDINGS = 3425
BUNDLED_WITH_FINDINGS_AND_IMAGES = 3337
BUNDLED_IMAGE_IDS = 7470
BUNDLED_WITHOUT_IMAGES = 104


@pytest.fixture(scope="module")
def bundled() -> ParsedReports:
    try:
        xrv_reports_archive()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return bundled_reports()


def test_bundled_archive_counts(bundled: ParsedReports) -> None:
    reports = bundled.reports
    with_findings = [r for r in reports if target_text(r, "findings")]
    with_findings_and_images = [r for r in with_findings if r.image_ids]
    print(f"\nbundled reports: {len(reports)}, with findings: {len(with_findings)}, "
          f"with findings and >=1 image: {len(with_findings_and_images)}, "
          f"image ids: {sum(len(r.image_ids) for r in reports)}")
    assert bundled.malformed == []
    assert len(reports) == BUNDLED_REPORTS
    assert len({r.uid for r in reports}) == BUNDLED_REPORTS
    assert len(with_findings) == BUNDLED_WITH_FINDINGS
    assert len(with_findings_and_images) == BUNDLED_WITH_FINDINGS_AND_IMAGES
    assert sum(len(r.image_ids) for r in reports) == BUNDLED_IMAGE_IDS
    assert sum(1 for r in reports if not r.image_ids) == BUNDLED_WITHOUT_IMAGES
    assert [int(r.uid) for r in reports] == sorted(int(r.uid) for r in reports)


def test_every_bundled_image_id_maps_back_to_its_report(bundled: ParsedReports) -> None:
    for report in bundled.reports:
        for image_id in report.image_ids:
            assert report_uid(image_id) == report.uid
            assert study_id_from_image_id(image_id).startswith(f"CXR{report.uid}_")


def test_known_report_fields(iu_sample: Path) -> None:
    report = read_report(iu_sample / "reports" / "1000.xml")
    assert report.uid == "1000"
    assert report.findings.startswith("There is XXXX increased opacity within the right upper lobe")
    assert report.findings.endswith("No acute bone abnormality.")
    assert report.impression.startswith("1. Increased opacity in the right upper lobe")
    assert report.indication == "XXXX-year-old male, XXXX."
    assert report.comparison == "XXXX PA and lateral chest radiographs"
    assert report.image_ids == ["CXR1000_IM-0003-1001", "CXR1000_IM-0003-2001", "CXR1000_IM-0003-3001"]
    assert "Opacity/lung/upper lobe/right" in report.mesh_major
    assert "Pulmonary Atelectasis/upper lobe/right" in report.mesh_major
    assert "mass lesion" in report.mesh_automatic
    assert not report.is_normal


def test_report_without_findings(iu_sample: Path) -> None:
    report = read_report(iu_sample / "reports" / "1002.xml")
    assert report.findings == ""
    assert target_text(report, "findings") == ""
    assert target_text(report, "impression") == "Status post left mastectomy. Heart size normal. Lungs are clear."
    assert target_text(report, "both") == target_text(report, "impression")


def test_target_both_joins_findings_and_impression(iu_sample: Path) -> None:
    report = read_report(iu_sample / "reports" / "368.xml")
    both = target_text(report, "both")
    assert both == target_text(report, "findings") + " " + target_text(report, "impression")
    assert target_text(report, "both", lowercase=True) == both.lower()
    with pytest.raises(ValueError, match="target"):
        target_text(report, "summary")


def test_malformed_xml_names_the_file() -> None:
    with pytest.raises(ReportParseError, match="broken.xml"):
        parse_report_xml(b"<eCitation><uId id='CXR1'/>", "broken.xml")
    with pytest.raises(ReportParseError, match="notes.xml"):
        parse_report_xml(b"<eCitation></eCitation>", "notes.xml")  # valid XML, no uid anywhere


def test_iter_reports_skips_and_lists_malformed_files(iu_sample: Path, tmp_path: Path) -> None:
    folder = tmp_path / "reports"
    folder.mkdir()
    for name in ("1000.xml", "42.xml"):
        (folder / name).write_bytes((iu_sample / "reports" / name).read_bytes())
    (folder / "7.xml").write_text("<eCitation><AbstractText Label='FINDINGS'>cut off")
    malformed: list[tuple[str, str]] = []
    uids = sorted(r.uid for r in iter_reports(folder, malformed))
    assert uids == ["1000", "42"]
    assert len(malformed) == 1 and malformed[0][0].endswith("7.xml") and "not valid XML" in malformed[0][1]
    parsed = load_reports(folder)
    assert [r.uid for r in parsed.reports] == ["42", "1000"]  # numeric order
    assert [Path(name).name for name, _ in parsed.malformed] == ["7.xml"]


def test_reports_from_tgz_and_single_file(iu_sample: Path, tmp_path: Path) -> None:
    archive = tmp_path / "reports.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        for xml in sorted((iu_sample / "reports").glob("*.xml")):
            tar.add(xml, arcname=f"ecgen-radiology/{xml.name}")
        bad = b"<not xml"
        info = tarfile.TarInfo("ecgen-radiology/999.xml")
        info.size = len(bad)
        tar.addfile(info, io.BytesIO(bad))
    parsed = load_reports(archive)
    assert len(parsed.reports) == 12
    assert len(parsed.malformed) == 1 and "999.xml" in parsed.malformed[0][0]
    single = list(iter_reports(iu_sample / "reports" / "42.xml"))
    assert [r.uid for r in single] == ["42"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(iter_reports(tmp_path / "absent"))


@pytest.mark.parametrize("raw, cleaned", [
    ("There is XXXX increased opacity.  The heart is normal.", "There is increased opacity. The heart is normal."),
    ("XXXX opacity in the left midlung.", "Opacity in the left midlung."),
    ("Normal heart. XXXX. Clear lungs.", "Normal heart. Clear lungs."),
    ("XXXX-year-old male, XXXX.", "Year-old male."),
    ("PA and lateral chest x-XXXX XXXX.", "PA and lateral chest x."),
    ("No acute cardiopulmonary abnormalities. .", "No acute cardiopulmonary abnormalities."),
    ("Effusion.. Heart (XXXX) normal.", "Effusion. Heart normal."),
    ("Calcified aortic XXXX, stable.", "Calcified aortic, stable."),
    ("XXXX XXXX are grossly intact.", "Are grossly intact."),
    ("", ""),
])
def test_clean_text(raw: str, cleaned: str) -> None:
    assert clean_text(raw) == cleaned
    assert clean_text(raw, lowercase=True) == cleaned.lower()


def test_clean_text_on_real_reports_leaves_no_tokens_or_stray_punctuation(bundled: ParsedReports) -> None:
    for report in bundled.reports:
        for text in (report.findings, report.impression):
            cleaned = clean_text(text)
            assert "XXXX" not in cleaned
            assert "  " not in cleaned and " ." not in cleaned and " ," not in cleaned and ".." not in cleaned
            assert not cleaned.startswith((".", ",", " "))


def test_openi_kaggle_and_r2gen_names() -> None:
    assert openi_image_id("CXR54_IM-2145-1001.png") == "CXR54_IM-2145-1001"
    assert openi_image_id(Path("x/y/CXR1_1_IM-0001-3001.png")) == "CXR1_1_IM-0001-3001"
    assert report_uid("CXR54_IM-2145-1001") == "54"
    assert report_uid("CXR1_1_IM-0001-3001") == "1"
    assert study_id_from_image_id("CXR54_IM-2145-1001") == "CXR54_IM-2145"
    assert study_id_from_image_id("CXR2843_IM-1254-1001-0001") == "CXR2843_IM-1254-1001"
    assert kaggle_image_id("1000_IM-0003-1001.dcm.png") == "CXR1000_IM-0003-1001"
    assert image_id_from_filename("1000_IM-0003-1001.dcm.png") == "CXR1000_IM-0003-1001"
    assert image_id_from_filename("CXR1000_IM-0003-1001.png") == "CXR1000_IM-0003-1001"
    assert r2gen_study_id("CXR368_IM-1832/0.png") == "CXR368_IM-1832"
    assert r2gen_study_id("images/CXR2843_IM-1254-1001/1.png") == "CXR2843_IM-1254-1001"
    assert r2gen_image_id("CXR368_IM-1832/1.png") == "CXR368_IM-1832/1"
    assert normalise_view("Frontal") == "frontal" and normalise_view(" Lateral") == "lateral"
    assert normalise_view(None) == "unknown" and normalise_view("AP") == "unknown"
    for bad, call in (("photo.png", openi_image_id), ("CXR368_IM-1832.png", openi_image_id),
                      ("CXR54.dcm.png", kaggle_image_id),
                      ("54_IM-1.png", report_uid), ("CXR368_IM-1832", study_id_from_image_id),
                      ("0.png", r2gen_study_id)):
        with pytest.raises(ValueError, match="not"):
            call(bad)


def test_image_report_map_of_the_real_sample(iu_sample: Path) -> None:
    """Every row of image_report_map.csv is reproduced from the file name alone, in both layouts."""
    rows = list(csv.DictReader(open(iu_sample / "image_report_map.csv", newline="")))
    layouts = {row["image_path"].split("/")[0] for row in rows}
    assert layouts == {"kaggle_normalized", "r2gen_layout"}
    for row in rows:
        path = Path(row["image_path"])
        report = read_report(iu_sample / "reports" / f"{row['report_uid']}.xml")
        if path.parts[0] == "kaggle_normalized":
            image_id = kaggle_image_id(path.name)
            assert image_id == row["openi_image_or_study_id"]
            assert image_id in report.image_ids
        else:
            study = r2gen_study_id(path)
            assert study == row["openi_image_or_study_id"]
            assert study in {study_id_from_image_id(i) for i in report.image_ids}
            image_id = study
        assert report_uid(image_id) == row["report_uid"]
        assert report.findings == " ".join(row["findings"].split())
        assert report.impression == " ".join(row["impression"].split())
    known = {r["image_path"]: r["report_uid"] for r in rows}
    assert known["kaggle_normalized/1000_IM-0003-1001.dcm.png"] == "1000"
    assert known["r2gen_layout/CXR2843_IM-1254-1001/1.png"] == "2843"
    assert known["r2gen_layout/CXR368_IM-1832/0.png"] == "368"


def test_r2gen_annotation_agrees_with_the_report_xmls(iu_sample: Path, bundled: ParsedReports) -> None:
    """All 2,955 R2Gen study ids are a study of their report, and R2Gen's text is its findings."""
    by_uid = {r.uid: r for r in bundled.reports}
    annotation = json.loads((iu_sample / "r2gen_annotation.json").read_text())
    entries = [e for split in annotation.values() for e in split]
    assert len(entries) == 2955
    for entry in entries:
        report = by_uid[report_uid(entry["id"])]
        assert entry["id"] in {study_id_from_image_id(i) for i in report.image_ids}
        assert " ".join(entry["report"].split()) == report.findings


def test_report_dataclass_defaults() -> None:
    report = Report(uid="1", mesh_major=["normal"])
    assert report.is_normal and report.image_ids == [] and target_text(report) == ""
