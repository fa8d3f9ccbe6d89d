"""The embedded ``smoke`` sample: real IU X-Ray reports paired with placeholder radiographs.

``n`` reports with FINDINGS and two images are drawn (deterministically for a seed) from the 3,955
report XMLs bundled in ``torchxrayvision``, mixing normal studies with ones that name cardiomegaly,
a nodule/mass/opacity or a pleural effusion. For each report two radiograph-like grey images
(frontal + lateral) are drawn with numpy: a dark background, a soft-tissue torso, darker lung fields
crossed by ribs, a bright spine, heart and diaphragm. The pictures follow their report: a larger heart
for cardiomegaly, a bright blob in the named lung and zone for a nodule/mass/opacity, a fluid level
blunting the costophrenic corner for an effusion. So a model that reads pixels can beat a constant
report, and the smoke run exercises the whole pipeline without shipping a binary file.

The files are written in the Open-i layout (``smoke_reports/<uid>.xml`` copied byte for byte,
``smoke_images/CXR<uid>_IM-....png``) so they go through the same loader as the real data.
Everything made here is labelled: :data:`SMOKE_SAMPLE_NOTE`, ``is_smoke_sample``.
"""

from __future__ import annotations

import json
import random
import re
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from medcap_helpers.reports import (
    Report,
    bundled_report_xml,
    bundled_reports,
    clean_text,
)

SMOKE_SAMPLE_NOTE = "placeholder images generated from report text; says nothing about model quality"
IMAGES_FOLDER = "smoke_images"
REPORTS_FOLDER = "smoke_reports"
MANIFEST_NAME = "smoke_sample.json"

# Share of the sample drawn for each finding; "normal" takes the rest.
CATEGORY_SHARES = {"cardiomegaly": 0.2, "opacity": 0.2, "effusion": 0.2}

_NEGATION = re.compile(r"\b(?:no|not|without|negative|free of|clear of|resolved|absence|normal)\b")
_PATTERNS = {
    "cardiomegaly": re.compile(
        r"cardiomegaly|heart (?:size )?(?:is |remains )?(?:\w+ )?enlarged|enlarged (?:heart|cardiac)"
        r"|cardiac silhouette (?:is |remains )?(?:\w+ )?enlarged"),
    "opacity": re.compile(r"\bnodul(?:e|es|ar)\b|\bmass(?:es)?\b|\bopacit(?:y|ies)\b"),
    "effusion": re.compile(r"\beffusions?\b"),
}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass
class SmokeLabels:
    """What a report's findings say, as far as the placeholder pictures draw it."""

    cardiomegaly: bool = False
    opacities: list[tuple[str, str]] = field(default_factory=list)
    """(side, zone) per named opacity: side right|left (the patient's), zone upper|middle|lower."""
    effusions: list[str] = field(default_factory=list)
    """Patient sides with a pleural effusion."""

    @property
    def is_normal(self) -> bool:
        return not (self.cardiomegaly or self.opacities or self.effusions)


@dataclass
class SmokeSample:
    """Where the smoke sample was written and what it holds."""

    reports_dir: Path
    images_dir: Path
    reports: list[Report]
    views: dict[str, str]
    """Open-i image id -> ``frontal`` / ``lateral``."""
    labels: dict[str, SmokeLabels]
    """Report uid -> what its pictures show."""
    seed: int
    image_size: int
    note: str = SMOKE_SAMPLE_NOTE
    is_smoke_sample: bool = True


def findings_labels(findings: str) -> SmokeLabels:
    """Affirmed cardiomegaly / opacity / effusion in a findings text (a sentence-level negation check).

    A term counts when no negation cue (``no``, ``without``, ``normal``...) precedes it in its sentence;
    the side is read from ``right``/``left``/``bilateral`` in that sentence.
    """
    labels = SmokeLabels()
    for sentence in _SENTENCE_END.split(clean_text(findings, lowercase=True)):
        for name, pattern in _PATTERNS.items():
            match = pattern.search(sentence)
            if not match or _NEGATION.search(sentence[: match.start()]):
                continue
            if name == "cardiomegaly":
                labels.cardiomegaly = True
            elif name == "opacity":
                zone = _zone(sentence)
                labels.opacities.extend((side, zone) for side in _sides(sentence, "right"))
            else:
                labels.effusions.extend(s for s in _sides(sentence, "right") if s not in labels.effusions)
    labels.opacities = sorted(set(labels.opacities))
    return labels


def select_smoke_reports(n: int, seed: int = 42) -> list[Report]:
    """``n`` bundled reports with findings and exactly two images: a fixed mix of findings, by uid."""
    if n < 1:
        raise ValueError(f"The smoke sample needs at least one report, got n={n}.")
    candidates = [r for r in bundled_reports().reports if r.findings.strip() and len(r.image_ids) == 2]
    if n > len(candidates):
        raise ValueError(f"The smoke sample can hold at most {len(candidates)} reports, got n={n}.")
    labelled = [(r, findings_labels(r.findings)) for r in candidates]
    pools = {
        "cardiomegaly": [r for r, lab in labelled if lab.cardiomegaly],
        "opacity": [r for r, lab in labelled if lab.opacities],
        "effusion": [r for r, lab in labelled if lab.effusions],
        "normal": [r for r, lab in labelled if lab.is_normal and r.is_normal],
    }
    rng = random.Random(seed)
    chosen: dict[str, Report] = {}
    quotas = {name: round(n * share) for name, share in CATEGORY_SHARES.items()}
    quotas["normal"] = n - sum(quotas.values())
    for name in ("cardiomegaly", "opacity", "effusion", "normal"):
        pool = [r for r in pools[name] if r.uid not in chosen]
        for report in rng.sample(pool, min(quotas[name], len(pool))):
            chosen[report.uid] = report
    if len(chosen) < n:  # only when a pool ran dry: top up from all candidates
        rest = [r for r in candidates if r.uid not in chosen]
        for report in rng.sample(rest, n - len(chosen)):
            chosen[report.uid] = report
    return sorted(chosen.values(), key=lambda r: int(r.uid))


def render_radiograph(labels: SmokeLabels, view: str, size: int, seed: int) -> Image.Image:
    """A radiograph-like 8-bit grey picture of what ``labels`` describe (``view``: frontal|lateral)."""
    if view not in ("frontal", "lateral"):
        raise ValueError(f"view must be 'frontal' or 'lateral', got {view!r}.")
    rng = np.random.default_rng(seed)
    jitter = rng.uniform(-1, 1, size=4)
    shift_x, shift_y = 0.02 * jitter[0], 0.02 * jitter[1]
    scale = 1.0 + 0.03 * jitter[2]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    xs = (xs - 0.5 - shift_x) / scale + 0.5
    ys = (ys - 0.5 - shift_y) / scale + 0.5
    draw = _frontal if view == "frontal" else _lateral
    picture = draw(xs, ys, labels, rng)
    picture = picture + 0.03 * jitter[3] + rng.normal(0.0, 0.03, picture.shape)
    grey = Image.fromarray(np.clip(picture * 255.0, 0, 255).astype(np.uint8))
    return grey.filter(ImageFilter.GaussianBlur(radius=max(0.5, size / 256)))


def generate_smoke_sample(out_dir: str | Path, n: int = 64, seed: int = 42, image_size: int = 256) -> SmokeSample:
    """Write the smoke sample under ``out_dir`` (``smoke_reports/``, ``smoke_images/``, a manifest).

    Same ``n``/``seed``/``image_size`` -> byte-identical files. Files from an earlier sample in the
    same folders are removed first so the loader never sees a mix.
    """
    out_dir = Path(out_dir)
    reports_dir, images_dir = out_dir / REPORTS_FOLDER, out_dir / IMAGES_FOLDER
    for folder, pattern in ((reports_dir, "*.xml"), (images_dir, "*.png")):
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(pattern):
            stale.unlink()
    reports = select_smoke_reports(n, seed)
    xml = bundled_report_xml()
    views: dict[str, str] = {}
    labels: dict[str, SmokeLabels] = {}
    for report in reports:
        (reports_dir / f"{report.uid}.xml").write_bytes(xml[report.uid])
        labels[report.uid] = findings_labels(report.findings)
        for image_id, view in zip(sorted(report.image_ids), ("frontal", "lateral")):
            noise_seed = zlib.crc32(f"{image_id}/{view}".encode())
            picture = render_radiograph(labels[report.uid], view, image_size, noise_seed)
            picture.save(images_dir / f"{image_id}.png", format="PNG")
            views[image_id] = view
    sample = SmokeSample(reports_dir, images_dir, reports, views, labels, seed, image_size)
    manifest = {
        "note": SMOKE_SAMPLE_NOTE, "is_smoke_sample": True, "seed": seed, "num_reports": n,
        "image_size": image_size, "views": views, "labels": {uid: asdict(lab) for uid, lab in labels.items()},
    }
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return sample


# --- drawing ------------------------------------------------------------------------------------
BACKGROUND, SOFT_TISSUE, LUNG, RIB, BONE, HEART, FLUID, NODULE = 0.05, 0.45, 0.22, 0.08, 0.62, 0.82, 0.62, 0.5
NORMAL_HEART_HALF_WIDTH, ENLARGED_HEART_HALF_WIDTH = 0.12, 0.2
_ZONE_Y = {"upper": 0.3, "middle": 0.44, "lower": 0.58}


def _ellipse(xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    return ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0


def _blob(xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, radius: float) -> np.ndarray:
    return np.exp(-(((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * radius**2)))


def _frontal(xs: np.ndarray, ys: np.ndarray, labels: SmokeLabels, rng: np.random.Generator) -> np.ndarray:
    img = np.full(xs.shape, BACKGROUND, dtype=np.float32)
    torso = _ellipse(xs, ys, 0.5, 0.58, 0.44, 0.52)
    img[torso] = SOFT_TISSUE
    # Radiological convention: the patient's right lung is on the viewer's left.
    lung_x = {"right": 0.31, "left": 0.69}
    lungs = {side: _ellipse(xs, ys, cx, 0.46, 0.15, 0.28) for side, cx in lung_x.items()}
    for mask in lungs.values():
        img[mask] = LUNG
    ribs = np.zeros_like(img, dtype=bool)
    for k in range(9):
        curve = 0.22 + 0.058 * k + 0.12 * (xs - 0.5) ** 2
        ribs |= np.abs(ys - curve) < 0.009
    img[ribs & (lungs["right"] | lungs["left"])] += RIB
    img[(np.abs(xs - 0.5) < 0.045) & (ys > 0.06)] = BONE                     # spine / mediastinum
    for cx in lung_x.values():                                               # diaphragm domes
        img[(ys > 0.66 + 1.6 * (xs - cx) ** 2) & (np.abs(xs - cx) < 0.19) & torso] = BONE * 0.95
    img[(ys > 0.76) & torso] = BONE * 0.95
    for side in labels.effusions:                                            # fluid level rising to the chest wall
        lateral = np.clip(np.abs(xs - 0.5) - 0.2, 0, None)
        img[lungs[side] & (ys > 0.63 - 1.2 * lateral)] = FLUID
    half_width = ENLARGED_HEART_HALF_WIDTH if labels.cardiomegaly else NORMAL_HEART_HALF_WIDTH
    img[_ellipse(xs, ys, 0.54, 0.6, half_width, 0.12)] = HEART
    for side, zone in labels.opacities:
        cx = lung_x[side] + rng.uniform(-0.04, 0.04)
        cy = _ZONE_Y[zone] + rng.uniform(-0.03, 0.03)
        img += NODULE * _blob(xs, ys, cx, cy, rng.uniform(0.025, 0.04)) * lungs[side]
    return img


def _lateral(xs: np.ndarray, ys: np.ndarray, labels: SmokeLabels, rng: np.random.Generator) -> np.ndarray:
    img = np.full(xs.shape, BACKGROUND, dtype=np.float32)
    body = _ellipse(xs, ys, 0.5, 0.58, 0.4, 0.52)
    img[body] = SOFT_TISSUE
    lung = _ellipse(xs, ys, 0.5, 0.46, 0.3, 0.29)
    img[lung] = LUNG
    for k in range(8):                                                       # vertebrae with disc gaps
        top = 0.12 + 0.1 * k
        img[(xs > 0.78) & (xs < 0.88) & (ys > top) & (ys < top + 0.085)] = BONE
    img[body & (ys > 0.74 + 0.3 * (xs - 0.45) ** 2)] = BONE * 0.95           # diaphragm
    if labels.effusions:                                                     # posterior costophrenic sulcus
        img[lung & (xs > 0.55) & (ys > 0.64 - 0.8 * np.clip(xs - 0.65, 0, None))] = FLUID
    half_width = ENLARGED_HEART_HALF_WIDTH if labels.cardiomegaly else NORMAL_HEART_HALF_WIDTH
    img[_ellipse(xs, ys, 0.26 + half_width, 0.6, half_width, 0.13)] = HEART
    for _, zone in labels.opacities:
        cx, cy = 0.5 + rng.uniform(-0.08, 0.08), _ZONE_Y[zone] + rng.uniform(-0.03, 0.03)
        img += NODULE * _blob(xs, ys, cx, cy, rng.uniform(0.025, 0.04)) * lung
    return img


def _sides(sentence: str, default: str) -> list[str]:
    if re.search(r"\b(?:bilateral(?:ly)?|both|bibasilar|biapical)\b", sentence):
        return ["right", "left"]
    sides = [side for side in ("right", "left") if re.search(rf"\b{side}\b", sentence)]
    return sides or [default]


def _zone(sentence: str) -> str:
    if re.search(r"\b(?:upper|apex|apical|apices|biapical)\b", sentence):
        return "upper"
    if re.search(r"\b(?:lower|base|bases|basilar|basal|bibasilar|costophrenic|lingula)\b", sentence):
        return "lower"
    return "middle"


__all__ = ["SMOKE_SAMPLE_NOTE", "SmokeLabels", "SmokeSample", "findings_labels", "generate_smoke_sample",
           "render_radiograph", "select_smoke_reports"]
