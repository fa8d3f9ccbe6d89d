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

from medcap_helpers.config import MedcapConfig

METRIC_MODULE_PATH = Path(__file__).resolve().parent / "metrics_module" / "caption_metrics.py"
BOOTSTRAP_METRICS = ("CIDEr", "ROUGE-L")
"""Metrics that are a mean of per-example scores, so studies can be resampled without rescoring."""

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
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}.")
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive whole number, got {n_samples!r}.")
    if groups is None:
        codes = np.arange(values.size)
    else:
        groups = list(groups)
        if len(groups) != values.size:
            raise ValueError(f"groups has {len(groups)} entries for {values.size} examples.")
        index: dict[Any, int] = {}
        codes = np.fromiter((index.setdefault(g, len(index)) for g in groups), dtype=np.int64,
                            count=len(groups))
    group_sums = np.bincount(codes, weights=values)
    group_sizes = np.bincount(codes).astype(np.float64)
    n_groups = group_sums.size

    rng = np.random.default_rng(seed)
    means = np.empty(n_samples, dtype=np.float64)
    rows_per_chunk = max(1, 4_000_000 // n_groups)  # bounds memory for very many groups
    for start in range(0, n_samples, rows_per_chunk):
        stop = min(n_samples, start + rows_per_chunk)
        drawn = rng.integers(0, n_groups, size=(stop - start, n_groups))
        means[start:stop] = group_sums[drawn].sum(axis=1) / group_sizes[drawn].sum(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return {"point": float(values.mean()), "mean": float(means.mean()), "low": float(low),
            "high": float(high), "confidence": float(confidence), "n_samples": int(n_samples),
            "n_groups": int(n_groups)}


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


TABLE_COLUMNS = ("CIDEr", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "METEOR")


def format_table(rows: Mapping[str, Mapping[str, Any]], columns: tuple[str, ...] = TABLE_COLUMNS) -> str:
    """A markdown table: one row per system, CIDEr with its bootstrap interval when recorded."""
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
    """Metrics of ``predictions`` against the split's reports, CIDEr with a 95% bootstrap CI over studies."""
    references, study_ids = list(split["text"]), list(split["study_id"])
    interval = bootstrap_ci(list(predictions), references, groups=study_ids, metric="CIDEr",
                            n_samples=config.bootstrap_samples, seed=config.seed)
    row: dict[str, Any] = table_row(caption_scores(list(predictions), references), interval)
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
