"""Rule-based findings labeler for the 14 CheXpert observations, and its agreement with IU X-Ray's MeSH terms.

**Labeler** (:func:`label_report`). The text is lower-cased and split into sentences (and at ";"). Each
class has its own mention phrases (regexes written for this project after studying the CheXpert
labeler's mention lists and NegEx/ConText triggers); each mention gets a status:

1. *uncertain* if "cannot exclude", "not ruled out", "... cannot be excluded" governs it;
2. else *negative* if a negation governs it: a trigger before it ("no", "without", "negative for", "free
   of", "resolution of", "unlikely") reaching forward through lists ("no focal consolidation, effusion or
   pneumothorax") up to 12 words and until a terminator ("but", "however", "although", "which", "with",
   "there is", ";", the sentence end), or one right after it ("is not seen", "has resolved", "within
   normal limits"); pseudo-negations ("no change in the nodule") do not count, and some phrases are
   negative statements themselves ("heart size is normal", "normal mediastinum", "clear lungs");
3. else *uncertain* if a hedge governs it ("may", "possible", "question of", "suspicious for",
   "concerning for", "suggests", "could", "differential", "?");
4. else *positive*. ConText's "probable existence" (likely, probable, borderline, "X versus Y", "most
   suggestive of") counts as present, not as a hedge.

Mentions governed by a hypothetical context ("recommend CT to evaluate for nodule", "if", "history of")
are dropped. A class is positive if any mention is, else uncertain if any is, else negative if any is,
else not mentioned (CheXpert's aggregation). **No Finding** is positive when no class other than Support
Devices is positive or uncertain, otherwise negative (CheXpert leaves it blank; a value is handier).

**Uncertain handling** (``UNCERTAIN_AS_POSITIVE = False``): :func:`positive_classes` counts only
positive. IU's indexers rarely tag what a report only hedges: on the even-uid half they tagged 11 of the
139 class labels the labeler calls uncertain ("may represent atelectasis", "concerning for pneumonia"),
but 94 of the 103 positives that rest only on "likely"/"probable"/"borderline"/"versus" (hence those
count as present). Micro/macro-F1 on the even half: 0.976/0.962 uncertain-as-negative, 0.961/0.923
uncertain-as-positive (``benchmarks/results/findings_agreement.json`` records both).

**MeSH reference** (:data:`MESH_TO_CLASS`, :func:`mesh_labels`): each major term's heading (text before
the first "/", or a "heading/first qualifier" key where one is listed) maps to classes; the table's
comments give each choice. Validation applies the CheXpert No Finding convention to the reference too
(``chexpert_no_finding=True``): No Finding when the terms name no class other than Support Devices. The
indexers' literal "normal" also excludes findings outside the 14 classes (degenerative spine, tortuous
aorta, hyperinflation: 478 of the 1,912 even-half reports carry only such terms), so against it No Finding
F1 is 0.745 on the even half, a difference of definitions rather than of reading. Reports tagged only
"No Indexing" have no human labels and are left out, as are reports without findings or impression.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

from medcap_helpers.reports import Report, clean_text

CLASSES: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)
POSITIVE, NEGATIVE, UNCERTAIN, ABSENT = "positive", "negative", "uncertain", "not mentioned"
NO_FINDING, SUPPORT_DEVICES = "No Finding", "Support Devices"
UNCERTAIN_AS_POSITIVE = False
"""Default of :func:`positive_classes` (chosen on the even-uid half, see the module docstring)."""

# --- phrase lists -------------------------------------------------------------------------------
# Mentions per class (regexes on lower-cased text). A mention is then negated/hedged by its context.
_W = r"(?:[\w-]+ ){0,%d}"  # up to N filler words
_MENTIONS: dict[str, list[str]] = {
    "Enlarged Cardiomediastinum": [  # "enlarged cardiomediastinal silhouette" is Cardiomegaly: IU indexes it so
        r"\b(?:widen\w*|enlarge\w*|prominen\w*|wide) (?:of )?(?:the )?(?:superior |upper )?mediastin\w*",
        r"\bmediastin\w* (?:contours? |silhouette |shadow |width )?(?:is |are |appears? |remains? )?"
        + _W % 2 + r"(?:widen\w*|\benlarge\w*|prominen\w*|wide)",
        r"paratracheal (?:stripe )?(?:prominence|widening|fullness)",
        r"prominen\w* (?:of )?(?:the )?(?:right )?paratracheal",
    ],
    "Cardiomegaly": [
        r"cardiomegal\w*", r"cardiac (?:silhouette )?enlargement",
        r"\benlarge\w* " + _W % 2 + r"(?:heart|cardiac|cardiomediastinal)",
        r"\b(?:heart|cardiac|cardiomediastinal) " + _W % 4 + r"\b(?:enlarged|enlargement|large|increased|prominent)",
        r"\b(?:heart|cardiac)[\w ]{0,30}borderline|borderline (?:\w+ )?(?:heart|cardiac)",
        r"increase\w* (?:in )?(?:the )?(?:heart|cardiac) size",
    ],
    "Lung Opacity": [
        r"opaci\w*", r"infiltrat\w*", r"air ?space (?:disease|process)", r"densit(?:y|ies)", r"hazy", r"haziness",
        r"ground[- ]glass",
    ],
    "Lung Lesion": [
        r"nodul(?:e|es|ar|arity)?\b(?! (?:opaci|densit|infiltrat))",  # IU indexes "nodular opacity" as Opacity
        r"\bmass(?:es)?\b", r"\bcavit\w*", r"granulom\w*",
        r"(?:cavitary|lung|pulmonary|parenchymal|mass|nodular|spiculated|lobe|apical|hilar) lesions?",
        r"tumou?r", r"neoplas\w*", r"carcinoma", r"metasta\w*", r"malignan\w*",
    ],
    "Edema": [
        r"edema", r"(?:vascular|pulmonary|venous|vessel) congestion", r"\bcongestion", r"heart failure",
        r"\bchf\b", r"kerley", r"cephaliz\w*", r"fluid overload", r"venous hypertension", r"engorge\w*",
        r"vascular (?:prominence|engorgement|congestive)",
        r"prominen\w* (?:of )?(?:the )?(?:central )?(?:pulmonary )?vascul\w*",
        r"(?:increased|prominent) (?:central )?(?:lung |pulmonary )?vascul\w*",
        r"(?:vascularity|vasculature) (?:is |are )?(?:\w+ )?(?:increased|prominent|engorged)",
    ],
    "Consolidation": [r"consolidat\w*"],
    "Pneumonia": [  # not "old granulomatous/tuberculous infection"
        r"pneumonia\w*", r"pneumonitis", r"(?<!granulomatous )(?<!tuberculous )(?<!tuberculosis )infectio\w*",
    ],
    "Atelectasis": [r"atelecta\w*", r"(?<!no )collapse"],
    "Pneumothorax": [r"pneumothora\w*"],
    "Pleural Effusion": [r"(?<!pericardial )effusions?", r"pleural fluid", r"hydrothorax", r"hemothorax"],
    "Pleural Other": [
        r"(?:pleura\w*|fissur\w*|apical|biapical)[\w/ -]{0,25}thickening",
        r"thickening[\w/ ]{0,15}(?:pleura|fissure)",
        r"pleural abnormalit\w*", r"pleural (?:scar\w*|fibrosis|plaques?|calcifi\w*)",
        r"fibrothorax", r"apical (?:pleural )?cap",
    ],
    "Fracture": [r"fractur\w*", r"\bfx\b"],
    "Support Devices": [
        r"cathete\w*", r"\bpicc\b", r"(?:central|venous|port|dialysis|jugular|subclavian|\bij) (?:\w+ )?line",
        r"pace(?:maker|r)", r"\bicd\b", r"defibrillator", r"\baicd\b", r"(?:pacing|pacer|icd) (?:leads?|wires?)",
        r"(?:sternal|sternotomy|surgical|cerclage) wires?", r"\bclips?\b", r"staples?",  # not bare "sternotomy"
        r"sutures?", r"\bstents?", r"\btubes?\b", r"tracheostomy", r"hardware", r"prosthe\w*", r"\bdevices?\b",
        r"arthroplasty", r"\bports?\b", r"port-?a-?cath", r"\bcoils?\b", r"\bleads?\b", r"\bplates?\b",
        r"\bscrews?\b", r"valve replacement", r"implant\w*", r"generator", r"stimulator", r"\bshunt",
        r"\btubing\b", r"\btips\b", r"fixation", r"\bivc filter",
        r"\btip (?:is |are )?(?:\w+ )?(?:at|in|over|projects?|projecting|overl\w+)",  # de-identified "port ... tip"
    ],
}
# Phrases that are themselves a negative statement about a class (mentions starting inside them are skipped).
_NEGATIVE_PHRASES: dict[str, list[str]] = {
    "Cardiomegaly": [
        r"(?:heart|cardiac)(?: silhouette| shadow| contours?)? (?:size )?(?:and [\w ]+ )?"
        r"(?:is |are |appears? |remains? )?(?:\w+ )?(?:normal|within normal limits|unremarkable)",
        r"normal(?:-sized)? (?:\w+ )?(?:heart|cardiac)",
        r"(?:heart|cardiac)[\w ]{0,30}(?:upper limits? of normal|top normal|upper normal|high normal)",
    ],
    "Enlarged Cardiomediastinum": [
        r"mediastin\w*(?: silhouettes?| contours?)? (?:\w+ ){0,4}(?:normal|within normal limits|unremarkable)",
        r"normal (?:\w+ )?mediastin\w*",
    ],
    "Lung Opacity": [r"lungs? (?:are |is |appear |remain )?(?:\w+ )?clear", r"clear lungs?"],
    "Fracture": [  # a broken device is not a fracture
        r"(?:screw|catheter|lead|wire|pacemaker)\w* (?:is |are )?fractur\w*",
        r"fractur\w* (?:of )?(?:the )?(?:\w+ ){0,3}(?:screw|catheter|lead|wire)",
    ],
}

# --- negation and uncertainty triggers ----------------------------------------------------------
_NEG_PRE = (
    r"\bno\b|\bnot\b|\bwithout\b|negative for|free of|clear of|absence of|\bnor\b|resolution of|resolved|"
    r"rather than|removal of|removed|clearing of|\bnone\b|ruled? out|exclude[sd]?\b|unlikely|less likely"
)
_NEG_POST = (
    r"(?:is |are |has |have |may |might |appears? |remains? )?(?:been )?(?:not (?:be )?(?:\w+ )?"
    r"(?:seen|identified|present|visualized|evident|appreciated|noted|demonstrated)|absent|resolved|cleared|"
    r"no longer \w+|removed|normal|"
    r"within (?:the )?(?:normal limits|limits of normal)|unremarkable|(?:less |un)likely)"
)
# Hedges. "Probable existence" (likely, probable, borderline, "X versus Y", "most suggestive of") is not a
# hedge here: as in ConText it counts as present, and IU's indexers tag it (even half: 94 of 103 labels
# resting on it indexed, against 11 of 139 for "may", "possible", "question", "differential"...).
_UNC_STRONG = r"cannot (?:be )?(?:excluded?|ruled? out)|can not|not (?:be )?(?:entirely )?(?:excluded|ruled out)"
_UNC_PRE = (
    r"\bmay\b|\bmight\b|possib\w*|question\w*|suspicio\w*|suspect\w*|concern\w*|(?<!most )suggest\w*|"
    r"\bcould\b|differential|consider\w*|equivocal|worrisome|uncertain|" + _UNC_STRONG
)
_UNC_POST = (
    r"(?:is |are )?(?:not (?:excluded|ruled out)|cannot be (?:excluded|ruled out)|possible|suspected|"
    r"questioned|considered|a consideration|not entirely excluded)|\?"
)
_PSEUDO_NEG = (  # "no change in the nodule" asserts the nodule
    r"\bno (?:significant |interval |substantial )?(?:change|increase|decrease|worsening)|"
    r"\bnot (?:only|changed|significantly changed)"
)
_HYPOTHETICAL = (
    r"evaluat\w*|rule[- ]?out|recommend\w*|\bif\b|to identify|\bassess\w*|correlat\w*|follow[- ]?up|"
    r"\bcould obscure|history of|\bhx\b|\bcheck\b"
)
_TERMINATORS = (
    r"\bbut\b|\bhowever\b|\balthough\b|\bthough\b|\bexcept\b|\bwhich\b|(?<!compatible )(?<!consistent )\bwith\b|"
    r"\bwhereas\b|\bwhile\b|"
    r"\byet\b|;|\bthere (?:is|are)\b|\bother than\b|\baside from\b|\bapart from\b"
)
_NEG_PRE_RE = re.compile(_NEG_PRE)
_NEG_POST_RE = re.compile(r"^[\s,]*(?:" + _NEG_POST + r")"
                          r"|^ (?:[\w-]+ ){0,3}(?:has |have )(?:since )?(?:been )?(?:resolved|removed|cleared)")
_UNC_PRE_RE = re.compile(_UNC_PRE)
_UNC_STRONG_RE = re.compile(_UNC_STRONG)
_UNC_STRONG_POST_RE = re.compile(r"^[\s,]*(?:[\w-]+ ){0,2}(?:is |are )?(?:" + _UNC_STRONG + ")")
_UNC_POST_RE = re.compile(r"^[\s,]*(?:[\w-]+ ){0,2}(?:" + _UNC_POST + r")")
_TERM_RE = re.compile(_TERMINATORS)
_HYPOTHETICAL_RE = re.compile(_HYPOTHETICAL)
_PSEUDO_NEG_RE = re.compile(_PSEUDO_NEG)
_MENTION_RE = {c: re.compile("|".join(f"(?:{p})" for p in ps)) for c, ps in _MENTIONS.items()}
_NEG_PHRASE_RE = {c: re.compile("|".join(f"(?:{p})" for p in ps)) for c, ps in _NEGATIVE_PHRASES.items() if ps}
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|\s*;\s*|\n+")
_SCOPE_WORDS = 12


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_SPLIT.split(text.lower()) if s.strip()]


def _governed(trigger: re.Pattern[str], sentence: str, start: int, end: int) -> bool:
    """True when a pre-trigger in ``sentence[:end]`` reaches the mention at ``start`` (no terminator between)."""
    for match in trigger.finditer(sentence, 0, end):
        gap = sentence[match.end():start]
        if match.start() >= start or (not _TERM_RE.search(gap) and len(gap.split()) <= _SCOPE_WORDS):
            return True
    return False


def _mention_status(sentence: str, start: int, end: int) -> str:
    """"cannot exclude X" -> uncertain; else a negation wins ("no opacity to suggest pneumonia"); else a hedge.
    Pseudo-negations ("no change in the nodule") are masked first."""
    if _UNC_STRONG_POST_RE.search(sentence[end:]) or _governed(_UNC_STRONG_RE, sentence, start, end):
        return UNCERTAIN
    masked = _PSEUDO_NEG_RE.sub(lambda m: "_" * len(m.group()), sentence)
    if _NEG_POST_RE.search(masked[end:]) or _governed(_NEG_PRE_RE, masked, start, end):
        return NEGATIVE
    if _UNC_POST_RE.search(sentence[end:]) or _governed(_UNC_PRE_RE, sentence, start, end):
        return UNCERTAIN
    return POSITIVE


def label_mentions(text: str) -> dict[str, list[tuple[str, str]]]:
    """Every class's mentions as ``(status, sentence)``; the evidence behind :func:`label_report`."""
    found: dict[str, list[tuple[str, str]]] = {c: [] for c in CLASSES}
    for sentence in _sentences(text):
        for cls, pattern in _MENTION_RE.items():
            fixed = [m.span() for m in _NEG_PHRASE_RE[cls].finditer(sentence)] if cls in _NEG_PHRASE_RE else []
            found[cls] += [(NEGATIVE, sentence)] * len(fixed)
            for m in pattern.finditer(sentence):
                if any(s <= m.start() < e for s, e in fixed):
                    continue
                if not _governed(_HYPOTHETICAL_RE, sentence, m.start(), m.end()):
                    found[cls].append((_mention_status(sentence, m.start(), m.end()), sentence))
    return found


def label_report(text: str) -> dict[str, str]:
    """The label (positive / negative / uncertain / not mentioned) of every class in ``CLASSES``."""
    labels: dict[str, str] = {}
    for cls, mentions in label_mentions(text).items():
        statuses = {s for s, _ in mentions}
        labels[cls] = next((s for s in (POSITIVE, UNCERTAIN, NEGATIVE) if s in statuses), ABSENT)
    abnormal = any(labels[c] in (POSITIVE, UNCERTAIN) for c in CLASSES if c not in (NO_FINDING, SUPPORT_DEVICES))
    labels[NO_FINDING] = NEGATIVE if abnormal else POSITIVE
    return labels


def positive_classes(text: str, uncertain_as_positive: bool = UNCERTAIN_AS_POSITIVE) -> frozenset[str]:
    """Classes named as present (uncertain ones too when ``uncertain_as_positive``)."""
    return _positive_classes(str(text), bool(uncertain_as_positive))


@lru_cache(maxsize=65536)
def _positive_classes(text: str, uncertain_as_positive: bool) -> frozenset[str]:
    """Cached: the same reference reports are labelled for every system, epoch and bootstrap."""
    wanted = (POSITIVE, UNCERTAIN) if uncertain_as_positive else (POSITIVE,)
    return frozenset(c for c, label in label_report(text).items() if label in wanted)


# --- MeSH reference -----------------------------------------------------------------------------
# Heading (text before the first "/", lower-cased) -> classes; a "heading/first qualifier" key, where
# listed, wins over its heading. Counts: reports among the 3,955 carrying the heading.
MESH_TO_CLASS: dict[str, tuple[str, ...]] = {
    "normal": (NO_FINDING,),                                   # 1391: the indexers' normal study
    "mediastinum": ("Enlarged Cardiomediastinum",),           # 27: ".../prominent", ".../enlarged"
    # Cardiomegaly (375), and "Cardiac Shadow" (58), which is ".../enlarged" in 52.
    "cardiomegaly": ("Cardiomegaly",), "cardiac shadow": ("Cardiomegaly",),
    # Lung Opacity, CheXpert's parent of any parenchymal opacity: Opacity 455, Airspace Disease 125,
    # Density 118, Infiltrate 65 (their qualifiers are lung sites in most).
    "opacity": ("Lung Opacity",), "airspace disease": ("Lung Opacity",), "density": ("Lung Opacity",),
    "infiltrate": ("Lung Opacity",),
    # Lung Lesion: Nodule 111, Mass 17, Cavitation 6, and granulomas (Calcified Granuloma 274, Granuloma 52,
    # Granulomatous Disease 112): a granuloma is a focal nodular lung lesion, and IU's commonest.
    "nodule": ("Lung Lesion",), "mass": ("Lung Lesion",), "cavitation": ("Lung Lesion",),
    "calcified granuloma": ("Lung Lesion",), "granuloma": ("Lung Lesion",), "granulomatous disease": ("Lung Lesion",),
    # Edema: Pulmonary Edema 46, and as CheXpert does, vascular congestion (76) and heart failure (11).
    "pulmonary edema": ("Edema",), "pulmonary congestion": ("Edema",), "heart failure": ("Edema",),
    "consolidation": ("Consolidation",),                       # 30
    "pneumonia": ("Pneumonia",),                               # 42
    "pulmonary atelectasis": ("Atelectasis",),                 # 332
    "pneumothorax": ("Pneumothorax",),                         # 23
    "hydropneumothorax": ("Pneumothorax", "Pleural Effusion"),
    "hemopneumothorax": ("Pneumothorax", "Pleural Effusion"),
    "pleural effusion": ("Pleural Effusion",), "hemothorax": ("Pleural Effusion",),  # 161
    # Pleural Other: pleural thickening. "Thickening" is ".../pleura/..." in 47 of its 56 reports, otherwise
    # bronchial or ventricular (no class), hence the qualified key.
    "thickening/pleura": ("Pleural Other",), "pleura": ("Pleural Other",),
    "fractures, bone": ("Fracture",),                          # 84: ribs, vertebrae, clavicle...
    # Support Devices: Catheters, Indwelling 125; Implanted Medical Device 110 (pacemakers, valves, ports);
    # Surgical Instruments 106 (surgical clips, sternotomy wires); Tube, Inserted 31; Medical Device 24;
    # Stents 19; Sutures 7.
    "catheters, indwelling": (SUPPORT_DEVICES,), "implanted medical device": (SUPPORT_DEVICES,),
    "surgical instruments": (SUPPORT_DEVICES,), "tube, inserted": (SUPPORT_DEVICES,),
    "medical device": (SUPPORT_DEVICES,), "stents": (SUPPORT_DEVICES,), "sutures": (SUPPORT_DEVICES,),
}
"""Unmapped on purpose (no CheXpert class): Lung (hypoinflation 284, hyperdistention 208), Calcinosis (305:
aorta, hilar/mediastinal nodes), Cicatrix (scarring, 196), Markings, Aorta, Atherosclerosis, Spine and
vertebrae, Scoliosis, Deformity, Diaphragm, Emphysema/COPD, Costophrenic Angle (blunting: effusion or
thickening, undecided), Hernia, Lucency, Foreign Bodies (mostly nipple piercings), Spinal Fusion,
Breast Implants, Technical Quality of Image Unsatisfactory, No Indexing, and rarer ones."""
NO_INDEXING = "no indexing"


def mesh_heading(term: str) -> str:
    """``"Pleural Effusion/left"`` -> ``"pleural effusion"``."""
    return " ".join(term.split("/", 1)[0].lower().split())


def mesh_classes(term: str) -> tuple[str, ...]:
    """Classes of one major term: its "heading/first qualifier" key if mapped, else its heading's."""
    parts = [" ".join(p.lower().split()) for p in term.split("/")]
    return MESH_TO_CLASS.get("/".join(parts[:2]), MESH_TO_CLASS.get(parts[0], ()))


def mesh_labels(mesh_major: Sequence[str], chexpert_no_finding: bool = False) -> frozenset[str]:
    """Classes the MeSH major terms name; with ``chexpert_no_finding``, No Finding also when no class but
    Support Devices is named (the labeler's convention)."""
    found = {c for term in mesh_major for c in mesh_classes(term)}
    if chexpert_no_finding and not found - {SUPPORT_DEVICES, NO_FINDING}:
        found.add(NO_FINDING)
    return frozenset(found)


# --- agreement ----------------------------------------------------------------------------------
def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def agreement(predicted: Sequence[frozenset[str]], reference: Sequence[frozenset[str]],
              min_support: int = 25) -> dict[str, Any]:
    """Per-class support/tp/fp/fn/precision/recall/F1, and micro/macro P/R/F1 over the classes with
    ``support >= min_support`` (listed under ``included``)."""
    if len(predicted) != len(reference):
        raise ValueError(f"{len(predicted)} predictions but {len(reference)} references.")
    per_class: dict[str, dict[str, Any]] = {}
    for cls in CLASSES:
        tp = sum(cls in p and cls in r for p, r in zip(predicted, reference))
        fp = sum(cls in p and cls not in r for p, r in zip(predicted, reference))
        fn = sum(cls not in p and cls in r for p, r in zip(predicted, reference))
        precision, recall, f1 = _prf(tp, fp, fn)
        per_class[cls] = {"support": tp + fn, "tp": tp, "fp": fp, "fn": fn, "precision": precision,
                          "recall": recall, "f1": f1, "included": tp + fn >= min_support}
    included = [c for c in CLASSES if per_class[c]["included"]]
    micro = _prf(*(sum(per_class[c][k] for c in included) for k in ("tp", "fp", "fn")))
    macro = [sum(per_class[c][k] for c in included) / len(included) if included else 0.0
             for k in ("precision", "recall", "f1")]
    return {"n_reports": len(predicted), "min_support": min_support, "included": included,
            "classes": per_class, "micro": dict(zip(("precision", "recall", "f1"), micro)),
            "macro": dict(zip(("precision", "recall", "f1"), macro))}


def clinical_efficacy(predictions: Sequence[str], references: Sequence[str],
                      uncertain_as_positive: bool = UNCERTAIN_AS_POSITIVE) -> dict[str, Any]:
    """Clinical efficacy (CE) of generated reports: the labels of each prediction against its reference's.

    A class counts for a report when the labeler names it as present (:func:`positive_classes`; uncertain
    mentions count as absent unless ``uncertain_as_positive``). Per class: support (reference positives),
    tp/fp/fn, precision, recall, F1. **Micro** P/R/F1 sum tp/fp/fn over all 14 classes (No Finding
    included, as CheXpert-based CE metrics do), so a finding the references never name still costs its
    false positives; **macro** averages the classes with at least one reference positive (``included``).
    Adds ``micro_f1``/``macro_f1`` and the summed ``tp``/``fp``/``fn``. Empty predictions name nothing
    but No Finding.
    """
    predictions, references = list(predictions), list(references)
    predicted = [positive_classes(t, uncertain_as_positive) for t in predictions]
    reference = [positive_classes(t, uncertain_as_positive) for t in references]
    result = agreement(predicted, reference, min_support=1)
    totals = {k: sum(result["classes"][c][k] for c in CLASSES) for k in ("tp", "fp", "fn")}
    result["micro"] = dict(zip(("precision", "recall", "f1"), _prf(totals["tp"], totals["fp"], totals["fn"])))
    result.update(totals, micro_over="all classes", macro_over="classes with a reference positive",
                  uncertain_as_positive=uncertain_as_positive)
    result["micro_f1"], result["macro_f1"] = result["micro"]["f1"], result["macro"]["f1"]
    return result


def example_counts(predictions: Sequence[str], references: Sequence[str],
                   uncertain_as_positive: bool = UNCERTAIN_AS_POSITIVE) -> list[tuple[int, int, int]]:
    """Per example, (tp, fp, fn) summed over the 14 classes: summed over any set of examples they give that
    set's micro P/R/F1 (how a bootstrap over studies recomputes micro-F1 without relabelling)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references.")
    counts = []
    for prediction, reference in zip(predictions, references):
        p = positive_classes(prediction, uncertain_as_positive)
        r = positive_classes(reference, uncertain_as_positive)
        counts.append((len(p & r), len(p - r), len(r - p)))
    return counts


def micro_f1(tp: float, fp: float, fn: float) -> float:
    """F1 from summed counts: ``2 tp / (2 tp + fp + fn)``, 0 when there is nothing to count."""
    return _prf(tp, fp, fn)[2]


def prevalence(texts: Iterable[str], uncertain_as_positive: bool = UNCERTAIN_AS_POSITIVE) -> dict[str, Any]:
    """How many texts name each class as present (``positive``, ``share``), and how many texts there are."""
    labelled = [positive_classes(t, uncertain_as_positive) for t in texts]
    n = len(labelled)
    classes = {c: {"positive": sum(c in labels for labels in labelled)} for c in CLASSES}
    for row in classes.values():
        row["share"] = row["positive"] / n if n else 0.0
    return {"n_reports": n, "classes": classes,
            "abnormal_share": sum(bool(labels - {NO_FINDING, SUPPORT_DEVICES}) for labels in labelled) / n if n else 0.0}


def prevalence_markdown(result: dict[str, Any]) -> str:
    """The per-class prevalence table (classes named by no report are left out)."""
    rows = [f"| class | reports naming it (of {result['n_reports']}) | share |", "|---|---:|---:|"]
    rows += [f"| {cls} | {row['positive']} | {row['share']:.1%} |" for cls, row in result["classes"].items()
             if row["positive"]]
    rows.append(f"| *any abnormal finding* | | {result['abnormal_share']:.1%} |")
    return "\n".join(rows)


def agreement_summary(result: dict[str, Any]) -> dict[str, Any]:
    """:func:`validate_against_mesh`'s result without the confusion examples: what a stage records."""
    keep = ("n_reports", "half", "min_support", "included", "micro", "macro", "uncertain_as_positive",
            "chexpert_no_finding")
    summary = {k: result[k] for k in keep if k in result}
    summary["classes"] = {c: {k: row[k] for k in ("support", "precision", "recall", "f1", "included")}
                          for c, row in result["classes"].items()}
    return summary


def names_abnormal(text: str, uncertain_as_positive: bool = UNCERTAIN_AS_POSITIVE) -> bool:
    """Whether ``text`` names an abnormal finding as present: a class other than No Finding and Support
    Devices (a device is not a finding, as in CheXpert's No Finding)."""
    return bool(positive_classes(text, uncertain_as_positive) - {NO_FINDING, SUPPORT_DEVICES})


def abnormal_share(texts: Iterable[str]) -> float:
    """Share of texts naming any abnormal finding (:func:`names_abnormal`)."""
    texts = list(texts)
    return sum(names_abnormal(t) for t in texts) / len(texts) if texts else 0.0


def distinct_share(texts: Iterable[str]) -> float:
    """Share of distinct texts (whitespace- and case-normalised); low values signal collapse."""
    texts = [" ".join(t.lower().split()) for t in texts]
    return len(set(texts)) / len(texts) if texts else 0.0


# --- validation against IU X-Ray's MeSH terms ---------------------------------------------------
def report_text(report: Report) -> str:
    """Cleaned findings + impression, joined as separate sentences."""
    parts = [clean_text(report.findings), clean_text(report.impression)]
    return " ".join(p if p.endswith((".", "!", "?")) else p + "." for p in parts if p)


def _half(reports: Iterable[Report], half: str) -> list[Report]:
    if half not in ("odd", "even", "all"):
        raise ValueError(f"half={half!r} is not 'odd', 'even' or 'all'.")
    keep = [r for r in reports if report_text(r) and [mesh_heading(m) for m in r.mesh_major] != [NO_INDEXING]]
    return keep if half == "all" else [r for r in keep if r.uid.isdigit() and int(r.uid) % 2 == (half == "odd")]


def validate_against_mesh(reports: Sequence[Report], half: str = "odd",
                          uncertain_as_positive: bool = UNCERTAIN_AS_POSITIVE, min_support: int = 25,
                          examples: int = 2, chexpert_no_finding: bool = True) -> dict[str, Any]:
    """Agreement of the labeler with the MeSH reference on one uid half ("odd", "even" or "all"; reports
    with findings or impression text and not only "No Indexing"), with counts of and examples of the
    false positives/negatives of every class under ``confusions``."""
    chosen = _half(reports, half)
    texts = [report_text(r) for r in chosen]
    predicted = [positive_classes(t, uncertain_as_positive) for t in texts]
    reference = [mesh_labels(r.mesh_major, chexpert_no_finding) for r in chosen]
    result = agreement(predicted, reference, min_support)
    result.update(half=half, uncertain_as_positive=uncertain_as_positive, chexpert_no_finding=chexpert_no_finding)
    confusions: dict[str, dict[str, Any]] = {}
    for cls in CLASSES:
        fps = [i for i, (p, r) in enumerate(zip(predicted, reference)) if cls in p and cls not in r]
        fns = [i for i, (p, r) in enumerate(zip(predicted, reference)) if cls not in p and cls in r]
        confusions[cls] = {
            "fp": len(fps), "fn": len(fns),
            "fp_examples": [{"uid": chosen[i].uid, "mesh": chosen[i].mesh_major,
                             "sentences": sorted({s for st, s in label_mentions(texts[i])[cls]
                                                  if st in (POSITIVE, UNCERTAIN)})} for i in fps[:examples]],
            "fn_examples": [{"uid": chosen[i].uid, "mesh": chosen[i].mesh_major, "text": texts[i][:300]}
                            for i in fns[:examples]]}
    result["confusions"] = confusions
    return result


def agreement_markdown(result: dict[str, Any]) -> str:
    """The agreement table as Markdown: per class, then micro/macro over the included classes."""
    rows = ["| class | support | precision | recall | F1 | in average |", "|---|---:|---:|---:|---:|:---:|"]
    for cls, row in result["classes"].items():
        rows.append(f"| {cls} | {row['support']} | {row['precision']:.3f} | {row['recall']:.3f} | "
                    f"{row['f1']:.3f} | {'yes' if row['included'] else 'no'} |")
    for name in ("micro", "macro"):
        avg = result[name]
        rows.append(f"| **{name}** ({len(result['included'])} classes) | | {avg['precision']:.3f} | "
                    f"{avg['recall']:.3f} | **{avg['f1']:.3f}** | |")
    return "\n".join(rows)


__all__ = [
    "ABSENT", "CLASSES", "MESH_TO_CLASS", "NEGATIVE", "POSITIVE", "UNCERTAIN", "abnormal_share", "agreement",
    "agreement_markdown", "agreement_summary", "clinical_efficacy", "distinct_share", "example_counts",
    "label_mentions", "label_report", "mesh_classes", "mesh_heading", "mesh_labels", "micro_f1", "names_abnormal",
    "positive_classes", "prevalence", "prevalence_markdown", "report_text", "validate_against_mesh",
]
