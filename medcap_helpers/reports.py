"""IU X-Ray (Open-i) radiology reports: XML parsing, text cleaning and the id schemes of its copies.

One report XML (``<uid>.xml``) holds the FINDINGS / IMPRESSION / INDICATION / COMPARISON sections,
MeSH terms, and one ``<parentImage id="CXR<uid>_IM-<series>-<image>">`` per radiograph.

Three copies of the collection name their images differently; all map to the Open-i image id:

======================  =====================================  ================================
copy                    file                                   Open-i id
======================  =====================================  ================================
Open-i ``NLMCXR_png``   ``CXR54_IM-2145-1001.png``             image ``CXR54_IM-2145-1001``
Kaggle (raddar)         ``1000_IM-0003-1001.dcm.png``          image ``CXR1000_IM-0003-1001``
R2Gen ``iu_xray``       ``CXR368_IM-1832/0.png``               study ``CXR368_IM-1832``
======================  =====================================  ================================

A *study id* is an image id minus its last ``-xxxx`` part. Some image ids have four parts
(``CXR2843_IM-1254-1001-0001``), so some study ids have three (``CXR2843_IM-1254-1001``, which is
how R2Gen names that folder). A few reports hold images of two series (two study ids); splits
therefore group by report uid, which never separates the images of one study.
"""

from __future__ import annotations

import importlib.util
import re
import tarfile
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from tqdm.auto import tqdm

from medcap_helpers.errors import ReportParseError

TARGETS = ("findings", "impression", "both")
UNKNOWN_VIEW = "unknown"


@dataclass
class Report:
    """One Open-i report. Text fields are raw (``XXXX`` tokens kept); see :func:`clean_text`."""

    uid: str
    findings: str = ""
    impression: str = ""
    indication: str = ""
    comparison: str = ""
    mesh_major: list[str] = field(default_factory=list)
    mesh_automatic: list[str] = field(default_factory=list)
    image_ids: list[str] = field(default_factory=list)

    @property
    def is_normal(self) -> bool:
        """True when the MeSH major terms are just ``normal`` (the annotators' normal study)."""
        return [m.strip().lower() for m in self.mesh_major] == ["normal"]


@dataclass
class ParsedReports:
    """Reports read from a folder or archive, and the files that could not be parsed."""

    reports: list[Report]
    malformed: list[tuple[str, str]] = field(default_factory=list)
    """(file name, reason) of every file skipped."""


# --- parsing ------------------------------------------------------------------------------------
def parse_report_xml(data: bytes | str, source_name: str = "<report>") -> Report:
    """Parse one Open-i report XML; raise :class:`ReportParseError` naming ``source_name``."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as err:
        raise ReportParseError(f"{source_name}: not valid XML ({err}).") from None
    except (LookupError, UnicodeError, ValueError) as err:  # unknown encoding, unencodable text
        raise ReportParseError(f"{source_name}: not valid XML ({type(err).__name__}: {err}).") from None
    sections = {
        (node.get("Label") or "").strip().upper(): " ".join((node.text or "").split())
        for node in root.iter("AbstractText")
    }
    uid = _first_attr(root, ("IUXRId", "pmcId"), "id") or _uid_from_name(source_name)
    if not uid:
        raise ReportParseError(f"{source_name}: no <IUXRId id=...> and the file name is not '<uid>.xml'; "
                               "is this an Open-i (NLMCXR) report?")
    image_ids = [node.get("id", "").strip() for node in root.iter("parentImage")]
    return Report(
        uid=uid.strip(),
        findings=sections.get("FINDINGS", ""),
        impression=sections.get("IMPRESSION", ""),
        indication=sections.get("INDICATION", ""),
        comparison=sections.get("COMPARISON", ""),
        mesh_major=[(n.text or "").strip() for n in root.iter("major") if (n.text or "").strip()],
        mesh_automatic=[(n.text or "").strip() for n in root.iter("automatic") if (n.text or "").strip()],
        image_ids=[i for i in image_ids if i],
    )


def read_report(path: str | Path) -> Report:
    """Parse a single report XML file."""
    path = Path(path)
    return parse_report_xml(path.read_bytes(), str(path))


def iter_reports(path: str | Path, malformed: list[tuple[str, str]] | None = None,
                 progress: bool = False) -> Iterator[Report]:
    """Yield the reports in a folder (searched recursively), a ``.tgz``/``.tar`` archive or one XML file.

    Files that fail to parse are skipped; when ``malformed`` is given, ``(name, reason)`` is appended
    for each of them.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Report source '{path}' does not exist: give a folder of Open-i report "
                                "XMLs, NLMCXR_reports.tgz, or one .xml file.")
    for name, data in tqdm(_iter_xml_blobs(path), desc="Reading reports", unit="report", disable=not progress):
        try:
            yield parse_report_xml(data, name)
        except ReportParseError as err:
            if malformed is not None:
                malformed.append((name, str(err)))


def load_reports(path: str | Path, progress: bool = False) -> ParsedReports:
    """All reports under ``path`` (see :func:`iter_reports`), sorted by numeric uid."""
    malformed: list[tuple[str, str]] = []
    reports = list(iter_reports(path, malformed, progress=progress))
    reports.sort(key=lambda r: _uid_sort_key(r.uid))
    return ParsedReports(reports, malformed)


def _iter_xml_blobs(path: Path) -> Iterator[tuple[str, bytes]]:
    if path.is_dir():
        for file in sorted(path.rglob("*.xml")):
            yield str(file), file.read_bytes()
    elif path.suffix.lower() == ".xml":
        yield str(path), path.read_bytes()
    elif tarfile.is_tarfile(path):
        read = 0
        try:
            with tarfile.open(path) as archive:
                for member in archive:
                    if member.isfile() and member.name.lower().endswith(".xml"):
                        handle = archive.extractfile(member)
                        if handle is not None:
                            data = handle.read()
                            read += 1
                            yield f"{path}:{member.name}", data
        except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
            raise ReportParseError(f"{path}: the archive is damaged or cut short after {read} report(s) "
                                   f"({type(err).__name__}: {err}); download it again "
                                   "(python -m medcap_helpers.download data/).") from None
    else:
        raise ValueError(f"'{path}' is neither a folder, a .xml file nor a tar archive of report XMLs.")


def _first_attr(root: ET.Element, tags: tuple[str, ...], attr: str) -> str | None:
    for tag in tags:
        node = root.find(f".//{tag}")
        if node is not None and node.get(attr):
            return node.get(attr)
    return None


def _uid_from_name(name: str) -> str | None:
    stem = Path(name.split(":")[-1]).stem
    return stem if stem.isdigit() else None


def _uid_sort_key(uid: str) -> tuple[int, str]:
    return (int(uid), uid) if uid.isdigit() else (1 << 62, uid)


def xrv_reports_archive() -> Path:
    """The 3,955 Open-i report XMLs bundled in the ``torchxrayvision`` package (never imported: it needs
    torchvision; only its data file is read)."""
    spec = importlib.util.find_spec("torchxrayvision")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        archive = Path(location) / "data" / "NLMCXR_reports.tgz"
        if archive.is_file():
            return archive
    raise FileNotFoundError(
        "The IU X-Ray report XMLs bundled with torchxrayvision were not found: run "
        "`pip install torchxrayvision` (it ships torchxrayvision/data/NLMCXR_reports.tgz), or download "
        "NLMCXR_reports.tgz with `python -m medcap_helpers.download data/` and use data_source='openi'.")


@lru_cache(maxsize=1)
def bundled_reports() -> ParsedReports:
    """All reports of :func:`xrv_reports_archive`, parsed once per process (do not mutate the result)."""
    return load_reports(xrv_reports_archive())


@lru_cache(maxsize=1)
def bundled_report_xml() -> dict[str, bytes]:
    """Raw XML bytes of every bundled report, by uid (read once per process)."""
    blobs: dict[str, bytes] = {}
    for name, data in _iter_xml_blobs(xrv_reports_archive()):
        uid = _uid_from_name(name)
        if uid:
            blobs[uid] = data
    return blobs


# --- text ---------------------------------------------------------------------------------------
# De-identification tokens, with a hyphen/slash that glued them to a word ("XXXX-year-old", "x-XXXX").
_DEID_TOKEN = re.compile(r"[-/]?X{3,}(?:'[st]?)?[-/]?")
_MARK = "\x00"
_CAPITALISE_AFTER_REMOVAL = re.compile(rf"(^\s*|[.!?]\s+)(?:{_MARK}[\s,;:]*)+([a-z])")


def clean_text(text: str | None, lowercase: bool = False) -> str:
    """Collapse whitespace, remove ``XXXX`` de-identification tokens and the punctuation they strand.

    A sentence that started with a removed token is re-capitalised; a sentence that was only tokens
    disappears. ``lowercase=True`` lower-cases the result.
    """
    if not text:
        return ""
    out = _DEID_TOKEN.sub(f" {_MARK} ", text)
    out = re.sub(r"\s+", " ", out)
    out = _CAPITALISE_AFTER_REMOVAL.sub(lambda m: m.group(1) + m.group(2).upper(), out)
    out = out.replace(_MARK, " ")
    out = re.sub(r"\s+", " ", out)
    while True:  # "()" left by "(XXXX)", nested ones too; a space, so the words around stay apart
        out, found = re.subn(r"\(\s*\)", " ", out)
        if not found:
            break
    out = re.sub(r"\(\s+", "(", out)
    out = re.sub(r"\s+([.,;:!?)])", r"\1", out)           # " ." -> "."
    out = re.sub(r"[,;:]+(?=[.,;:!?])", "", out)          # ", ." -> "."
    out = re.sub(r"\.(?:\s*\.)+", ".", out)               # ". ." / ".." -> "."
    out = re.sub(r"([.!?])\s*[,;:]+", r"\1", out)         # ". ," -> "."
    out = re.sub(r"^[\s.,;:!?]+", "", out)
    out = re.sub(r"\s+", " ", out).strip()
    return out.lower() if lowercase else out


def target_text(report: Report, target: str = "findings", lowercase: bool = False) -> str:
    """The cleaned text a model learns to write: ``findings``, ``impression`` or ``both`` (joined)."""
    if target not in TARGETS:
        raise ValueError(f"target={target!r} is not one of {TARGETS}.")
    findings = clean_text(report.findings, lowercase)
    impression = clean_text(report.impression, lowercase)
    if target == "findings":
        return findings
    if target == "impression":
        return impression
    return " ".join(part for part in (findings, impression) if part)


# --- ids ----------------------------------------------------------------------------------------
_IMAGE_ID = re.compile(r"^CXR\d+(?:_\d+)?_IM-\d+(?:-\d+)*$")
_UID = re.compile(r"^CXR(\d+)_")
_KAGGLE_NAME = re.compile(r"^(\d+(?:_\d+)?_IM-\d+(?:-\d+)+)\.dcm\.png$", re.IGNORECASE)


def is_image_id(value: str) -> bool:
    """True for an Open-i image or study id such as ``CXR54_IM-2145-1001`` (or ``CXR368_IM-1832``)."""
    return bool(_IMAGE_ID.match(value))


def openi_image_id(filename: str | Path) -> str:
    """``CXR54_IM-2145-1001.png`` (any folder) -> ``CXR54_IM-2145-1001``."""
    stem = Path(filename).name
    stem = stem[: -len(".png")] if stem.lower().endswith(".png") else Path(stem).stem
    if not is_image_id(stem) or stem.count("-") < 2:
        raise ValueError(f"'{filename}' is not an Open-i image name like 'CXR54_IM-2145-1001.png'.")
    return stem


def kaggle_image_id(filename: str | Path) -> str:
    """Kaggle ``1000_IM-0003-1001.dcm.png`` -> Open-i image id ``CXR1000_IM-0003-1001``."""
    match = _KAGGLE_NAME.match(Path(filename).name)
    if not match:
        raise ValueError(f"'{filename}' is not a Kaggle IU X-Ray name like '1000_IM-0003-1001.dcm.png'.")
    return "CXR" + match.group(1)


def image_id_from_filename(filename: str | Path) -> str:
    """Open-i image id from an Open-i or a Kaggle file name (whichever scheme it follows)."""
    name = Path(filename).name
    if _KAGGLE_NAME.match(name):
        return kaggle_image_id(name)
    return openi_image_id(name)


def report_uid(image_or_study_id: str) -> str:
    """``CXR54_IM-2145-1001`` (or its study id, or ``CXR1_1_IM-0001-3001``) -> report uid ``54``."""
    match = _UID.match(image_or_study_id)
    if not match:
        raise ValueError(f"'{image_or_study_id}' is not an Open-i id like 'CXR54_IM-2145-1001'.")
    return match.group(1)


def study_id_from_image_id(image_id: str) -> str:
    """``CXR54_IM-2145-1001`` -> ``CXR54_IM-2145``; ``CXR2843_IM-1254-1001-0001`` -> ``CXR2843_IM-1254-1001``."""
    if not is_image_id(image_id) or image_id.count("-") < 2:
        raise ValueError(f"'{image_id}' is not an Open-i image id (expected 'CXR<uid>_IM-<series>-<image>', "
                         "e.g. 'CXR54_IM-2145-1001').")
    return image_id.rsplit("-", 1)[0]


def r2gen_study_id(image_path: str | Path) -> str:
    """R2Gen ``CXR368_IM-1832/0.png`` -> study id ``CXR368_IM-1832`` (its folder name, kept as is)."""
    parts = Path(image_path).parts
    if len(parts) < 2 or not is_image_id(parts[-2]):
        raise ValueError(f"'{image_path}' is not an R2Gen image path like 'CXR368_IM-1832/0.png'.")
    return parts[-2]


def r2gen_image_id(image_path: str | Path) -> str:
    """R2Gen ``CXR368_IM-1832/0.png`` -> ``CXR368_IM-1832/0`` (R2Gen does not record the original id)."""
    return f"{r2gen_study_id(image_path)}/{Path(image_path).stem}"


def normalise_view(projection: str | None) -> str:
    """Kaggle's ``Frontal``/``Lateral`` -> ``frontal``/``lateral``; anything else -> ``unknown``.

    Open-i originals and R2Gen do not record the view, so their images are ``unknown``.
    """
    value = (projection or "").strip().lower()
    return value if value in ("frontal", "lateral") else UNKNOWN_VIEW


__all__ = [
    "ParsedReports", "Report", "ReportParseError", "TARGETS", "UNKNOWN_VIEW", "bundled_report_xml",
    "bundled_reports", "clean_text",
    "image_id_from_filename", "is_image_id", "iter_reports", "kaggle_image_id", "load_reports",
    "normalise_view", "openi_image_id", "parse_report_xml", "r2gen_image_id", "r2gen_study_id",
    "read_report", "report_uid", "study_id_from_image_id", "target_text", "xrv_reports_archive",
]
