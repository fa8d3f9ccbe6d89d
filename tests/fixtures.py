"""A synthetic IU X-Ray in the Open-i, Kaggle and R2Gen layouts that ``medcap_helpers.sources`` reads.

The real sample (``../shared/iu_xray_sample``) ships with the project's CI only; loader tests that need
no real radiograph run on this one, on any clone. Every image is a tiny 8-bit grey PNG of one grey
level of its own (:attr:`SyntheticIU.grey`), so a test can check that each row got *its* image.

Layout under ``root`` (each in the place the loaders look by default):

* ``reports/<uid>.xml`` and ``NLMCXR_reports.tgz``: Open-i report XMLs (``IUXRId``, ``AbstractText``
  FINDINGS/IMPRESSION, one ``parentImage`` per image);
* ``NLMCXR_png/CXR<uid>_IM-<series>-<n>.png``: Open-i image names;
* ``kaggle/indiana_reports.csv``, ``kaggle/indiana_projections.csv``,
  ``kaggle/images_normalized/<uid>_IM-<series>-<n>.dcm.png``: the Kaggle copy;
* ``r2gen/annotation.json`` and ``r2gen/images/<study id>/<n>.png``: R2Gen's ``iu_xray`` folder.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

IMAGE_SIZE = (24, 20)  # width, height: not square, so a transposed decode would show


@dataclass(frozen=True)
class SyntheticReport:
    uid: str
    findings: str | None  # None: the XML has no FINDINGS section
    impression: str
    image_ids: tuple[str, ...]  # what the XML names
    on_disk: tuple[str, ...]  # which of those have a PNG in the Open-i and Kaggle folders


REPORTS = (
    SyntheticReport("1", "The heart is normal in size. The lungs are clear.", "Normal chest.",
                    ("CXR1_IM-0001-1001", "CXR1_IM-0001-2001"), ("CXR1_IM-0001-1001", "CXR1_IM-0001-2001")),
    SyntheticReport("2", "XXXX opacity in the right upper lobe. No pleural effusion.", "Right upper lobe pneumonia.",
                    ("CXR2_IM-0002-1001", "CXR2_IM-0002-2001", "CXR2_IM-0002-3001"),
                    ("CXR2_IM-0002-1001", "CXR2_IM-0002-2001", "CXR2_IM-0002-3001")),
    SyntheticReport("3", None, "No acute cardiopulmonary disease.",
                    ("CXR3_IM-0003-1001", "CXR3_IM-0003-2001"), ("CXR3_IM-0003-1001", "CXR3_IM-0003-2001")),
    SyntheticReport("4", "Mild cardiomegaly.", "Cardiomegaly.",
                    ("CXR4_IM-0004-1001", "CXR4_IM-0004-2001"), ("CXR4_IM-0004-1001",)),
    SyntheticReport("5", "Low lung volumes.", "No acute findings.",
                    ("CXR5_IM-0005-1001", "CXR5_IM-0005-2001"), ()),
    SyntheticReport("6", "Small left pleural effusion.", "Left effusion.",
                    ("CXR6_IM-0006-1001", "CXR6_IM-0006-2001"), ("CXR6_IM-0006-1001", "CXR6_IM-0006-2001")),
)
UNREPORTED_IMAGE = "CXR99_IM-0099-1001"
"""On disk in the Open-i and Kaggle folders, named by no report."""

# R2Gen: split -> [(study id, report, image paths in the annotation, which of them are on disk)]
R2GEN = {
    "train": [("CXR1_IM-0001", "The heart is normal in size. The lungs are clear.",
               ("CXR1_IM-0001/0.png", "CXR1_IM-0001/1.png"), ("CXR1_IM-0001/0.png", "CXR1_IM-0001/1.png")),
              ("CXR2_IM-0002", "Opacity in the right upper lobe. No pleural effusion.",
               ("CXR2_IM-0002/0.png", "CXR2_IM-0002/1.png"), ("CXR2_IM-0002/0.png", "CXR2_IM-0002/1.png")),
              ("CXR7_IM-0007", "Degenerative changes of the spine.",
               ("CXR7_IM-0007/0.png", "CXR7_IM-0007/1.png"), ("CXR7_IM-0007/0.png",))],
    "val": [("CXR4_IM-0004", "Mild cardiomegaly.",
             ("CXR4_IM-0004/0.png", "CXR4_IM-0004/1.png"), ("CXR4_IM-0004/0.png", "CXR4_IM-0004/1.png"))],
    "test": [("CXR6_IM-0006-1001", "Small left pleural effusion.",  # a study id with an image suffix, as in R2Gen
              ("CXR6_IM-0006-1001/0.png", "CXR6_IM-0006-1001/1.png"), ("CXR6_IM-0006-1001/1.png",)),
             ("CXR8_IM-0008", "", ("CXR8_IM-0008/0.png",), ("CXR8_IM-0008/0.png",))],  # empty report
}


@dataclass
class SyntheticIU:
    root: Path
    grey: dict[str, int] = field(default_factory=dict)
    """Grey level of every image written: Open-i image id, or R2Gen ``<study>/<n>``, -> 0..255."""

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def reports_tgz(self) -> Path:
        return self.root / "NLMCXR_reports.tgz"

    @property
    def openi_images(self) -> Path:
        return self.root / "NLMCXR_png"

    @property
    def kaggle_dir(self) -> Path:
        return self.root / "kaggle"

    @property
    def r2gen_annotation(self) -> Path:
        return self.root / "r2gen" / "annotation.json"


def report_xml(report: SyntheticReport) -> str:
    """An Open-i report XML with the elements :func:`medcap_helpers.reports.parse_report_xml` reads."""
    findings = (f'<AbstractText Label="FINDINGS">{report.findings}</AbstractText>'
                if report.findings is not None else "")
    parents = "".join(f'<parentImage id="{i}"><figureId>F{n}</figureId></parentImage>'
                      for n, i in enumerate(report.image_ids, 1))
    return ('<?xml version="1.0" encoding="utf-8"?>\n<eCitation><meta type="rr"/>'
            f'<uId id="CXR{report.uid}"/><IUXRId id="{report.uid}"/><MedlineCitation><Article><Abstract>'
            '<AbstractText Label="COMPARISON">None.</AbstractText>'
            '<AbstractText Label="INDICATION">XXXX-year-old with cough.</AbstractText>'
            f'{findings}<AbstractText Label="IMPRESSION">{report.impression}</AbstractText>'
            f'</Abstract></Article></MedlineCitation><MeSH><major>normal</major></MeSH>{parents}</eCitation>')


def kaggle_name(image_id: str) -> str:
    """``CXR1_IM-0001-1001`` -> the Kaggle copy's ``1_IM-0001-1001.dcm.png``."""
    return image_id.removeprefix("CXR") + ".dcm.png"


def _grey_png(path: Path, level: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", IMAGE_SIZE, level).save(path, format="PNG")


def write_synthetic_iu(root: Path) -> SyntheticIU:
    """Write the synthetic IU X-Ray under ``root`` (see the module docstring) and return where things are."""
    sample = SyntheticIU(Path(root))
    levels = iter(range(20, 256, 9))

    def image(path: Path, key: str) -> None:
        if key not in sample.grey:
            sample.grey[key] = next(levels)
        _grey_png(path, sample.grey[key])

    for report in REPORTS:
        (sample.reports_dir / f"{report.uid}.xml").parent.mkdir(parents=True, exist_ok=True)
        (sample.reports_dir / f"{report.uid}.xml").write_text(report_xml(report), encoding="utf-8")
    with tarfile.open(sample.reports_tgz, "w:gz") as archive:  # the layout of Open-i's NLMCXR_reports.tgz
        for report in REPORTS:
            data = report_xml(report).encode()
            info = tarfile.TarInfo(f"ecgen-radiology/{report.uid}.xml")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))

    on_disk = [i for r in REPORTS for i in r.on_disk] + [UNREPORTED_IMAGE]
    for image_id in on_disk:
        image(sample.openi_images / f"{image_id}.png", image_id)
        image(sample.kaggle_dir / "images_normalized" / kaggle_name(image_id), image_id)

    with open(sample.kaggle_dir / "indiana_reports.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["uid", "MeSH", "Problems", "image", "indication", "comparison", "findings", "impression"])
        for r in REPORTS:
            writer.writerow([r.uid, "normal", "normal", "Xray Chest PA and Lateral", "Cough.", "None.",
                             r.findings or "", r.impression])
    with open(sample.kaggle_dir / "indiana_projections.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["uid", "filename", "projection"])
        for r in REPORTS:  # every image a report names, on disk or not (as in the Kaggle copy)
            for image_id in r.image_ids:
                writer.writerow([r.uid, kaggle_name(image_id), "Frontal" if image_id.endswith("1001") else "Lateral"])

    annotation: dict[str, list[dict[str, object]]] = {}
    for split, studies in R2GEN.items():
        annotation[split] = []
        for study, text, paths, present in studies:
            annotation[split].append({"id": study, "report": text, "image_path": list(paths), "split": split})
            for relative in present:
                image(sample.r2gen_annotation.parent / "images" / relative, relative.removesuffix(".png"))
    sample.r2gen_annotation.write_text(json.dumps(annotation))
    return sample
