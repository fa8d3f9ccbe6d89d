"""Caption metrics for generated radiology reports: BLEU-1..4, ROUGE-L, CIDEr, METEOR, bootstrap CIs.

One text normalisation (:func:`normalize_report`, R2Gen's IU X-Ray cleaning) is applied to
predictions and references alike; the already-tokenized strings go straight to pycocoevalcap's
scorers, as R2Gen's ``modules/metrics.py`` does (no Java PTB tokenizer, so normalisation is pure
Python and deterministic). METEOR is the only Java-backed scorer and is skipped, with a one-time
warning, when ``java`` is not on the PATH.

What the numbers are (pycocoevalcap 1.2):

* ``BLEU-1``..``BLEU-4``: corpus-level BLEU (clipped n-gram counts summed over the whole set,
  brevity penalty against the *closest* reference length), not a mean of sentence BLEUs.
* ``ROUGE-L``: mean over examples of the LCS F-measure with beta = 1.2 (best reference wins).
* ``CIDEr``: pycocoevalcap's ``Cider``, which is CIDEr-D: TF-IDF weighted 1-4-gram vectors, IDF
  ``log(N) - log(max(1, df))`` with ``N`` = number of examples and ``df`` = number of examples whose
  references contain the n-gram; the hypothesis TF-IDF is clipped by the reference's; a Gaussian
  length penalty ``exp(-delta**2 / (2 * 6**2))`` (pycocoevalcap measures ``delta`` in *bigram*
  counts); cosine similarities averaged over n = 1..4 and over references, times 10; the corpus
  score is the mean of the per-example scores. No stemming.
  **Document frequencies come from the whole evaluated reference set in one call**: CIDEr of a
  batch is not CIDEr of the set, and averaging per-batch CIDEr is wrong (a single example always
  scores 0 because every n-gram has ``df = N = 1``). Always score the full set at once.
* ``METEOR``: METEOR 1.5 (``-l en -norm``) corpus score as reported by the jar.
* ``CE micro-F1`` / ``CE macro-F1`` (clinical efficacy, :func:`clinical_efficacy_scores`): the CheXpert
  labels of each generated report (:mod:`medcap_helpers.findings`, positive = named as present) against
  its reference's; micro sums tp/fp/fn over all 14 classes, macro averages the classes the references
  name. Its 95% interval resamples studies and recomputes micro-F1 from the resample's summed counts
  (:func:`bootstrap_micro_f1_ci`): micro-F1 is not a mean of per-example scores.

Comparing two systems scored on the same studies: :func:`paired_difference_ci` resamples the studies once
per bootstrap sample and scores both systems on it, giving the interval of their *difference*; overlapping
per-system intervals are the wrong test (they ignore that both systems find the same studies hard).
"""

from __future__ import annotations

import re
import shutil
import threading
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medcap_helpers import findings
from medcap_helpers.config import MedcapConfig

METRIC_MODULE_PATH = Path(__file__).resolve().parent / "metrics_module" / "caption_metrics.py"
BOOTSTRAP_METRICS = ("CIDEr", "ROUGE-L")
"""Metrics that are a mean of per-example scores, so studies can be resampled without rescoring."""
CE_MICRO_F1, CE_MACRO_F1 = "CE micro-F1", "CE macro-F1"
"""Clinical-efficacy columns (see :func:`clinical_efficacy_scores`)."""
CE_CLASSES = "CE per class"
"""Row key of the per-class CE precision/recall/F1/support (a dict, not a table column)."""

# R2Gen's sentence cleaner, character class kept verbatim. Note ``:-\[`` is a *range* (':' to '['),
# so it also strips ``< = > @`` (and A-Z, irrelevant after lower-casing) and keeps the hyphen.
_R2GEN_STRIP = re.compile(r"[.,?;*!%^&_+():-\[\]{}]")
_WHITESPACE = re.compile(r"\s+")

References = Sequence[str] | Sequence[Sequence[str]]


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------
def normalize_report(text: str) -> str:
    """R2Gen's IU X-Ray report cleaning: lower-case, punctuation stripped, sentences joined by " . ".

    Follows ``Tokenizer.clean_report_iu_xray`` of R2Gen (Chen et al., EMNLP 2020,
    https://github.com/cuhksz-nlp/R2Gen, ``modules/tokenizers.py``): ``..`` -> ``.``; list
    numbering ``1. ``..``5. `` removed; lower-cased; split into sentences on ``". "``; per sentence
    ``" / \\ '`` deleted and the characters ``. , ? ; * ! % ^ & _ + ( ) { } [ ]`` and ``:`` to ``[``
    (``: ; < = > ? @ [``) deleted; sentences joined by ``" . "`` with a final ``" ."``. So
    ``"1.5 cm"`` becomes ``"15 cm"``, ``"and/or"`` becomes ``"andor"``, hyphens and the ``xxxx``
    de-identification tokens stay, as in R2Gen.

    Three deliberate differences, none of which changes a token R2Gen's tokenizer would produce
    from its IU annotations: runs of whitespace (newlines included) become one space before the
    sentence split; empty sentences are dropped (R2Gen's ``!= []`` filter never fires, leaving
    ``". ."`` runs); a report with no words left gives ``""`` rather than ``" ."``, so an empty
    prediction scores 0.
    """
    if not isinstance(text, str):
        raise TypeError(f"normalize_report expects a string, got {type(text).__name__}.")
    text = _WHITESPACE.sub(" ", text)
    text = text.replace("..", ".").replace("..", ".").replace("..", ".").replace("1. ", "")
    for number in "2345":
        text = text.replace(f". {number}. ", ". ")
    for number in "2345":
        text = text.replace(f" {number}. ", ". ")
    sentences = [_clean_sentence(s) for s in text.strip().lower().split(". ")]
    sentences = [s for s in sentences if s]
    return " . ".join(sentences) + " ." if sentences else ""


def _clean_sentence(sentence: str) -> str:
    sentence = sentence.replace('"', "").replace("/", "").replace("\\", "").replace("'", "").strip().lower()
    return " ".join(_R2GEN_STRIP.sub("", sentence).split())


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------
def prepare_inputs(predictions: Sequence[str], references: References
                   ) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """Validate and normalise; return pycocoevalcap's ``(gts, res)`` dicts ``{i: [text, ...]}``."""
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be lists (one entry per example), not a string.")
    predictions, references = list(predictions), list(references)
    if not predictions:
        raise ValueError("No predictions to score: predictions is empty.")
    if len(predictions) != len(references):
        raise ValueError(f"predictions and references differ in length: {len(predictions)} predictions, "
                         f"{len(references)} references (one reference entry per prediction).")
    gts: dict[int, list[str]] = {}
    res: dict[int, list[str]] = {}
    for i, (prediction, refs) in enumerate(zip(predictions, references)):
        if prediction is None:
            prediction = ""
        if not isinstance(prediction, str):
            raise TypeError(f"Prediction {i} is a {type(prediction).__name__}, expected a string.")
        ref_list = [refs] if isinstance(refs, str) else list(refs)
        if not ref_list or not all(isinstance(r, str) for r in ref_list):
            raise ValueError(f"Example {i} needs at least one reference string, got {refs!r}.")
        normalized_refs = [normalize_report(r) for r in ref_list]
        if not any(normalized_refs):
            raise ValueError(f"Reference of example {i} is empty after normalisation: {refs!r}.")
        gts[i] = normalized_refs
        res[i] = [normalize_report(prediction)]
    return gts, res


def caption_scores(predictions: Sequence[str], references: References,
                   meteor: bool | None = None) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L, CIDEr(-D) and METEOR of ``predictions`` against ``references``.

    ``references`` holds one string or one list of strings per prediction. All examples are
    scored in one call, so CIDEr's document frequencies come from the whole reference set.
    ``meteor``: None computes METEOR when ``java`` is on the PATH; True asks for it (a missing Java
    gives a one-time warning and no ``"METEOR"`` key); False skips it. Empty predictions are
    allowed (they score 0); an empty list or mismatched lengths raise :class:`ValueError`.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = prepare_inputs(predictions, references)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"BLEU-{n}": float(bleu[n - 1]) for n in range(1, 5)}
    scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if meteor is not False and java_available(warn=True):
        try:
            scores["METEOR"] = meteor_score(gts, res)
        except Exception as err:  # a broken Java install: fail loudly only when METEOR was asked for
            if meteor:
                raise RuntimeError(f"METEOR failed (java at {shutil.which('java')}): {err}") from err
            warnings.warn(f"METEOR skipped: the METEOR jar failed ({err}).", RuntimeWarning, stacklevel=2)
    return scores


_java_warned = False


def java_available(warn: bool = False) -> bool:
    """Whether ``java`` is on the PATH (METEOR needs it); warn once per process when it is not."""
    global _java_warned
    if shutil.which("java"):
        return True
    if warn and not _java_warned:
        _java_warned = True
        warnings.warn("METEOR skipped: pycocoevalcap's METEOR needs Java and no 'java' is on the PATH "
                      "(install a JRE, e.g. 'apt-get install default-jre-headless'). Other metrics are "
                      "unaffected.", RuntimeWarning, stacklevel=3)
    return False


_meteor_lock = threading.Lock()
_meteor_scorer: Any = None


def meteor_score(gts: Mapping[Any, list[str]], res: Mapping[Any, list[str]]) -> float:
    """pycocoevalcap's METEOR on already-normalised dicts, reusing one Java process (start-up is slow)."""
    with _meteor_lock:
        try:
            return _meteor_once(gts, res)
        except Exception:  # a dead or confused Java process: start a fresh one, once
            _discard_meteor()
        try:
            return _meteor_once(gts, res)
        except Exception:
            _discard_meteor()
            raise


def _meteor_once(gts: Mapping[Any, list[str]], res: Mapping[Any, list[str]]) -> float:
    global _meteor_scorer
    from pycocoevalcap.meteor.meteor import Meteor

    if _meteor_scorer is None:
        _meteor_scorer = Meteor()
    return float(_meteor_scorer.compute_score(gts, res)[0])


def _discard_meteor() -> None:
    """Kill a failed METEOR process; release its lock first or its ``__del__`` would deadlock."""
    global _meteor_scorer
    scorer, _meteor_scorer = _meteor_scorer, None
    if scorer is None:
        return
    if scorer.lock.locked():
        scorer.lock.release()
    try:
        scorer.meteor_p.kill()
    except OSError:
        pass


def per_example_scores(predictions: Sequence[str], references: References,
                       metric: str = "CIDEr") -> np.ndarray:
    """Per-example CIDEr (document frequencies from the whole set) or ROUGE-L; their mean is the score."""
    gts, res = prepare_inputs(predictions, references)
    if metric == "CIDEr":
        from pycocoevalcap.cider.cider import Cider

        return np.asarray(Cider().compute_score(gts, res)[1], dtype=np.float64)
    if metric == "ROUGE-L":
        from pycocoevalcap.rouge.rouge import Rouge

        return np.asarray(Rouge().compute_score(gts, res)[1], dtype=np.float64)
    raise ValueError(f"No per-example scores for {metric!r}: choose one of {BOOTSTRAP_METRICS} "
                     "(BLEU and METEOR are corpus-level, not means of per-example scores).")


def per_example_cider(predictions: Sequence[str], references: References) -> np.ndarray:
    """pycocoevalcap's per-example CIDEr-D, with document frequencies from the whole set."""
    return per_example_scores(predictions, references, "CIDEr")


# --------------------------------------------------------------------------------------------
# Bootstrap over studies
# --------------------------------------------------------------------------------------------
def bootstrap_mean_ci(scores: Sequence[float] | np.ndarray, groups: Sequence[Any] | None = None,
                      n_samples: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict[str, float]:
    """Percentile bootstrap CI of the mean of ``scores``, resampling whole groups with replacement.

    Each bootstrap sample draws as many groups as there are, with replacement; every example of a
    drawn group comes along, and the sample's value is the mean over all its examples (so the
    full set gives exactly the point estimate). ``groups=None`` treats each example as its own group.
    """
    values = np.asarray(scores, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("No scores to bootstrap.")
    _check_bootstrap_settings(n_samples, confidence)
    codes = _group_codes(groups, values.size)
    group_sums = np.bincount(codes, weights=values)
    group_sizes = np.bincount(codes).astype(np.float64)
    means = np.empty(n_samples, dtype=np.float64)
    for start, drawn in _resampled_groups(group_sums.size, n_samples, seed):
        means[start:start + len(drawn)] = group_sums[drawn].sum(axis=1) / group_sizes[drawn].sum(axis=1)
    return _interval(float(values.mean()), means, confidence, group_sums.size)


def _check_bootstrap_settings(n_samples: Any, confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}.")
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive whole number, got {n_samples!r}.")


def _group_codes(groups: Sequence[Any] | None, n: int) -> np.ndarray:
    """0..G-1 per example, numbering groups in order of first appearance (each example alone when None)."""
    if groups is None:
        return np.arange(n)
    groups = list(groups)
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries for {n} examples.")
    index: dict[Any, int] = {}
    return np.fromiter((index.setdefault(g, len(index)) for g in groups), dtype=np.int64, count=n)


def _resampled_groups(n_groups: int, n_samples: int, seed: int) -> Any:
    """``(first sample index, drawn group indices)`` chunks: every sample draws ``n_groups`` groups with
    replacement. The same ``seed`` and group count draw the same studies for every metric (paired)."""
    rng = np.random.default_rng(seed)
    rows_per_chunk = max(1, 4_000_000 // n_groups)  # bounds memory for very many groups
    for start in range(0, n_samples, rows_per_chunk):
        stop = min(n_samples, start + rows_per_chunk)
        yield start, rng.integers(0, n_groups, size=(stop - start, n_groups))


def _interval(point: float, values: np.ndarray, confidence: float, n_groups: int) -> dict[str, Any]:
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return {"point": float(point), "mean": float(values.mean()), "low": float(low), "high": float(high),
            "confidence": float(confidence), "n_samples": int(values.size), "n_groups": int(n_groups)}


def bootstrap_micro_f1_ci(counts: Sequence[Sequence[float]] | np.ndarray, groups: Sequence[Any] | None = None,
                          n_samples: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict[str, Any]:
    """Percentile bootstrap CI of micro-F1, resampling whole groups (studies) with replacement.

    ``counts`` holds one ``(tp, fp, fn)`` row per example (:func:`medcap_helpers.findings.example_counts`).
    Micro-F1 is not a mean of per-example scores, so each bootstrap sample sums the tp/fp/fn of its drawn
    groups (every example of a drawn group comes along) and recomputes ``2 tp / (2 tp + fp + fn)`` (0 when
    the sample has nothing to count). ``point`` is the full set's micro-F1. Same draws as
    :func:`bootstrap_mean_ci` for the same ``seed`` and groups.
    """
    table = np.asarray(counts, dtype=np.float64)
    if table.size == 0:
        raise ValueError("No counts to bootstrap.")
    if table.ndim != 2 or table.shape[1] != 3:
        raise ValueError(f"counts must hold one (tp, fp, fn) row per example, got shape {table.shape}.")
    _check_bootstrap_settings(n_samples, confidence)
    codes = _group_codes(groups, table.shape[0])
    n_groups = int(codes.max()) + 1
    scores = np.empty(n_samples, dtype=np.float64)
    for start, drawn in _resampled_groups(n_groups, n_samples, seed):
        scores[start:start + len(drawn)] = _resampled_micro_f1(table, codes, n_groups, drawn)
    result = _interval(findings.micro_f1(*table.sum(axis=0)), scores, confidence, n_groups)
    result["metric"] = CE_MICRO_F1
    return result


def bootstrap_ci(predictions: Sequence[str], references: References, groups: Sequence[Any] | None = None,
                 metric: str = "CIDEr", n_samples: int = 1000, seed: int = 0,
                 confidence: float = 0.95) -> dict[str, float]:
    """Bootstrap CI of CIDEr (or ROUGE-L) over studies: ``groups`` holds each example's study id.

    Rescoring CIDEr for every bootstrap sample is slow, so the per-example CIDEr-D scores are
    computed once, with document frequencies fixed from the full evaluated set, and studies are
    resampled from those (:func:`bootstrap_mean_ci`). This leaves out the (small) variability of
    the IDF weights themselves. ``point`` is the full-set score, equal to :func:`caption_scores`'.
    Use ``MedcapConfig.bootstrap_samples`` and ``MedcapConfig.seed`` for ``n_samples`` and ``seed``.
    """
    scores = per_example_scores(predictions, references, metric)
    result: dict[str, Any] = bootstrap_mean_ci(scores, groups, n_samples=n_samples, seed=seed,
                                               confidence=confidence)
    result["metric"] = metric
    return result


# --------------------------------------------------------------------------------------------
# Clinical efficacy (CheXpert findings of generated vs reference reports)
# --------------------------------------------------------------------------------------------
def _first_references(references: References) -> list[str]:
    refs = [r if isinstance(r, str) else (list(r) or [""])[0] for r in references]
    if not all(isinstance(r, str) for r in refs):
        raise TypeError("references must hold one string (or a list of strings) per prediction.")
    return refs


def clinical_efficacy_scores(predictions: Sequence[str], references: References,
                             groups: Sequence[Any] | None = None, n_samples: int | None = None, seed: int = 0,
                             confidence: float = 0.95, per_class: bool = False) -> dict[str, Any]:
    """CE of generated reports (:func:`medcap_helpers.findings.clinical_efficacy`) as table columns.

    ``CE micro-F1``, ``CE macro-F1``, ``CE micro-precision``, ``CE micro-recall``, ``CE macro-precision``,
    ``CE macro-recall``; with ``n_samples`` the bootstrap interval of micro-F1 over ``groups`` (study ids;
    each example alone when None) as ``CE micro-F1_ci_low``/``_ci_high`` (:func:`bootstrap_micro_f1_ci`);
    with ``per_class`` the per-class support/precision/recall/F1 under ``CE per class``. A list of
    references per prediction is labelled by its first reference.
    """
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be lists (one entry per example), not a string.")
    predictions = ["" if p is None else p for p in predictions]
    references = _first_references(references)
    if len(predictions) != len(references):
        raise ValueError(f"predictions and references differ in length: {len(predictions)} predictions, "
                         f"{len(references)} references.")
    if not predictions:
        raise ValueError("No predictions to score: predictions is empty.")
    ce = findings.clinical_efficacy(predictions, references)
    row: dict[str, Any] = {CE_MICRO_F1: ce["micro"]["f1"], CE_MACRO_F1: ce["macro"]["f1"]}
    for average in ("micro", "macro"):
        row[f"CE {average}-precision"] = ce[average]["precision"]
        row[f"CE {average}-recall"] = ce[average]["recall"]
    if n_samples:
        interval = bootstrap_micro_f1_ci(findings.example_counts(predictions, references), groups,
                                         n_samples=n_samples, seed=seed, confidence=confidence)
        row[f"{CE_MICRO_F1}_ci_low"], row[f"{CE_MICRO_F1}_ci_high"] = interval["low"], interval["high"]
    if per_class:
        row[CE_CLASSES] = {c: {k: v[k] for k in ("support", "tp", "fp", "fn", "precision", "recall", "f1")}
                           for c, v in ce["classes"].items()}
    return row


def collapse_signals(systems: Mapping[str, Sequence[str]], references: Sequence[str]) -> dict[str, Any]:
    """Signs of a collapsed generator: per system the share of distinct reports and the share naming an
    abnormal finding (:func:`medcap_helpers.findings.abnormal_share`), beside the references' own share."""
    return {"reference_abnormal_share": findings.abnormal_share(references),
            "reference_distinct_share": findings.distinct_share(references),
            "systems": {name: {"distinct_share": findings.distinct_share(predictions),
                               "abnormal_share": findings.abnormal_share(predictions),
                               "n_reports": len(predictions)}
                        for name, predictions in systems.items()}}


def collapse_markdown(signals: Mapping[str, Any]) -> str:
    """:func:`collapse_signals` as a table, the references in the last row."""
    lines = ["| system | distinct reports | naming an abnormal finding |", "|---|---:|---:|"]
    lines += [f"| {name} | {row['distinct_share']:.0%} | {row['abnormal_share']:.0%} |"
              for name, row in signals["systems"].items()]
    lines.append(f"| *reference reports* | {signals['reference_distinct_share']:.0%} | "
                 f"{signals['reference_abnormal_share']:.0%} |")
    return "\n".join(lines)


def ce_comparison(table: Mapping[str, Mapping[str, Any]], system: str, baseline: str,
                  labels: tuple[str, str] | None = None, difference: Mapping[str, Any] | None = None) -> str:
    """One sentence, from the numbers, on whether ``system`` names the findings better than ``baseline``
    (CE micro-F1 with its interval), and whether the test set establishes it; ``labels`` are the two names
    used in the sentence (default: the row names). With ``difference`` (:func:`paired_difference_ci` of CE
    micro-F1, the right test for two systems scored on the same studies) its interval decides; without it,
    only non-overlapping intervals count as established (conservative). Empty when either row or its CE is
    missing."""
    if system not in table or baseline not in table or CE_MICRO_F1 not in table[system] \
            or CE_MICRO_F1 not in table[baseline]:
        return ""
    model, base = table[system], table[baseline]
    paired = difference
    system_label, baseline_label = labels or (f"{system} model", baseline)

    def cell(row: Mapping[str, Any]) -> str:
        low, high = row.get(f"{CE_MICRO_F1}_ci_low"), row.get(f"{CE_MICRO_F1}_ci_high")
        return f"{row[CE_MICRO_F1]:.3f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None else "")

    difference = model[CE_MICRO_F1] - base[CE_MICRO_F1]
    verdict = ("names the findings better than" if difference > 0 else
               "names the findings no better than" if difference == 0 else "names the findings worse than")
    sentence = (f"The {system_label} {verdict} the {baseline_label}: CE micro-F1 {cell(model)} vs {cell(base)} "
                f"({difference:+.3f}).")
    if paired is not None:
        interval = f"[{paired['low']:+.3f}, {paired['high']:+.3f}]"
        sentence += (f" The 95% paired-bootstrap interval of the difference, {interval}, excludes 0: the test set "
                     "establishes it." if paired["low"] > 0 or paired["high"] < 0 else
                     f" The 95% paired-bootstrap interval of the difference, {interval}, includes 0, so this test "
                     "set does not establish the difference.")
        return sentence
    low, high = model.get(f"{CE_MICRO_F1}_ci_low"), base.get(f"{CE_MICRO_F1}_ci_high")
    if difference > 0 and low is not None and high is not None:
        sentence += (" The 95% intervals do not overlap." if low > high else
                     " The 95% intervals overlap, so this test set does not establish the difference.")
    return sentence


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------
def table_row(scores: Mapping[str, float], ci: Mapping[str, Any] | None = None) -> dict[str, float]:
    """One system's row for :func:`format_table` / the run summary: scores plus ``<metric>_ci_low/high``."""
    row = {k: float(v) for k, v in scores.items() if v is not None}
    if ci is not None:
        metric = ci.get("metric", "CIDEr")
        row[f"{metric}_ci_low"] = float(ci["low"])
        row[f"{metric}_ci_high"] = float(ci["high"])
    return row


TABLE_COLUMNS = ("CIDEr", CE_MICRO_F1, CE_MACRO_F1, "BLEU-1", "BLEU-4", "ROUGE-L", "METEOR")
"""What :func:`format_table` shows by default: CIDEr and CE micro-F1 with their intervals, CE macro-F1, and
BLEU-1/4, ROUGE-L, METEOR (BLEU-2/3 and CE precision/recall stay in the recorded rows)."""


def format_table(rows: Mapping[str, Mapping[str, Any]], columns: tuple[str, ...] = TABLE_COLUMNS) -> str:
    """A markdown table: one row per system, CIDEr and CE micro-F1 with their bootstrap intervals when recorded."""
    present = [c for c in columns if any(c in r for r in rows.values())]
    lines = ["| system | " + " | ".join(present) + " |", "|---|" + "---:|" * len(present)]
    for name, row in rows.items():
        cells = []
        for column in present:
            value = row.get(column)
            if value is None:
                cells.append("–")
                continue
            cell = f"{value:.3f}"
            low, high = row.get(f"{column}_ci_low"), row.get(f"{column}_ci_high")
            if low is not None and high is not None:
                cell += f" [{low:.3f}, {high:.3f}]"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def score_row(predictions: Sequence[str], split: Any, config: MedcapConfig) -> dict[str, Any]:
    """Metrics of ``predictions`` against the split's reports: caption metrics, CIDEr with a 95% bootstrap
    CI over studies, and clinical efficacy (:func:`clinical_efficacy_scores`) with micro-F1's CI over the
    same resampled studies and the per-class scores under ``CE per class``."""
    references, study_ids = list(split["text"]), list(split["study_id"])
    interval = bootstrap_ci(list(predictions), references, groups=study_ids, metric="CIDEr",
                            n_samples=config.bootstrap_samples, seed=config.seed)
    row: dict[str, Any] = table_row(caption_scores(list(predictions), references), interval)
    row.update(clinical_efficacy_scores(list(predictions), references, groups=study_ids,
                                        n_samples=config.bootstrap_samples, seed=config.seed, per_class=True))
    row["n_examples"] = len(references)
    row["n_studies"] = len(set(study_ids))
    return row


def score_systems(systems: Mapping[str, Sequence[str]], split: Any,
                  config: MedcapConfig) -> dict[str, dict[str, Any]]:
    """:func:`score_row` for every system (name -> predictions in the split's row order)."""
    return {name: score_row(predictions, split, config) for name, predictions in systems.items()}


def load_caption_metric() -> Any:
    """The ``evaluate`` metric of this module (loaded from its local file: works offline)."""
    import evaluate

    return evaluate.load(str(METRIC_MODULE_PATH))


# --------------------------------------------------------------------------------------------
# Paired comparison of two systems on the same studies
# --------------------------------------------------------------------------------------------
DIFFERENCE_METRICS = ("CIDEr", CE_MICRO_F1)
"""Metrics :func:`paired_difference_ci` can compare (ROUGE-L too)."""


def paired_difference_ci(predictions: Sequence[str], baseline_predictions: Sequence[str], references: References,
                         groups: Sequence[Any] | None = None, metric: str = "CIDEr", n_samples: int = 1000,
                         seed: int = 0, confidence: float = 0.95) -> dict[str, Any]:
    """Paired bootstrap CI of ``metric(predictions) - metric(baseline_predictions)`` over studies.

    Both systems are scored on the same examples, so each bootstrap sample draws one set of studies
    (``groups``) and scores *both* systems on it: the interval of the difference is much narrower than
    the two systems' own intervals suggest, because the studies that are hard for one are hard for the
    other. Overlapping per-system intervals therefore do not mean "no difference"; an interval of the
    difference that excludes 0 does mean one. CIDEr and ROUGE-L resample per-example scores (CIDEr's
    document frequencies come from the references, so they are the same for both systems); CE micro-F1
    recomputes both micro-F1s from each sample's pooled counts. ``point`` is the full-set difference.
    """
    predictions, baseline_predictions = list(predictions), list(baseline_predictions)
    if len(predictions) != len(baseline_predictions):
        raise ValueError(f"The two systems must be scored on the same examples: {len(predictions)} and "
                         f"{len(baseline_predictions)} predictions.")
    if metric == CE_MICRO_F1:
        references = _first_references(references)
        ours = np.asarray(findings.example_counts(["" if p is None else p for p in predictions], references),
                          dtype=np.float64)
        theirs = np.asarray(findings.example_counts(["" if p is None else p for p in baseline_predictions],
                                                    references), dtype=np.float64)
        _check_bootstrap_settings(n_samples, confidence)
        codes = _group_codes(groups, ours.shape[0])
        n_groups = int(codes.max()) + 1
        differences = np.empty(n_samples, dtype=np.float64)
        for start, drawn in _resampled_groups(n_groups, n_samples, seed):
            differences[start:start + len(drawn)] = (_resampled_micro_f1(ours, codes, n_groups, drawn)
                                                     - _resampled_micro_f1(theirs, codes, n_groups, drawn))
        point = findings.micro_f1(*ours.sum(axis=0)) - findings.micro_f1(*theirs.sum(axis=0))
        result = _interval(point, differences, confidence, n_groups)
    else:
        ours = per_example_scores(predictions, references, metric)
        theirs = per_example_scores(baseline_predictions, references, metric)
        result = bootstrap_mean_ci(ours - theirs, groups, n_samples=n_samples, seed=seed, confidence=confidence)
    result["metric"] = metric
    return result


def _resampled_micro_f1(counts: np.ndarray, codes: np.ndarray, n_groups: int, drawn: np.ndarray) -> np.ndarray:
    """Micro-F1 of every bootstrap sample in ``drawn`` (rows of group indices) from per-example (tp, fp, fn)."""
    sums = np.stack([np.bincount(codes, weights=counts[:, k], minlength=n_groups) for k in range(3)], axis=1)
    tp, fp, fn = (sums[:, k][drawn].sum(axis=1) for k in range(3))
    denominator = 2 * tp + fp + fn
    return np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)


def paired_differences(systems: Mapping[str, Sequence[str]], split: Any, config: MedcapConfig,
                       pairs: Sequence[tuple[str, str]],
                       metrics: Sequence[str] = DIFFERENCE_METRICS) -> list[dict[str, Any]]:
    """:func:`paired_difference_ci` for each ``(system, baseline)`` pair and metric, on ``split``'s studies
    (``config.bootstrap_samples`` resamples, ``config.seed``); each result names its ``system`` and
    ``baseline``. Pairs naming a system that is not in ``systems`` are a :class:`ValueError`."""
    missing = sorted({name for pair in pairs for name in pair} - set(systems))
    if missing:
        raise ValueError(f"No predictions for {', '.join(map(repr, missing))}; systems are "
                         f"{', '.join(map(repr, systems))}.")
    references, study_ids = list(split["text"]), list(split["study_id"])
    results = []
    for system, baseline in pairs:
        for metric in metrics:
            result = paired_difference_ci(systems[system], systems[baseline], references, groups=study_ids,
                                          metric=metric, n_samples=config.bootstrap_samples, seed=config.seed)
            results.append({"system": system, "baseline": baseline, **result})
    return results
