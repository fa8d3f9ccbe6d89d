"""Caption metrics: R2Gen normalisation, equality with pycocoevalcap, CIDEr over the whole set,
the evaluate module, and the study-level bootstrap."""

from __future__ import annotations

import shutil
import string
import time
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from medcap_helpers import metrics
from medcap_helpers.metrics import (
    bootstrap_ci,
    bootstrap_mean_ci,
    caption_scores,
    format_table,
    normalize_report,
    per_example_cider,
    per_example_scores,
    table_row,
)

# Report-like pairs in the style of IU X-Ray findings (de-identified "XXXX" included).
REFERENCES = [
    "The heart is normal in size. The mediastinum is unremarkable. The lungs are clear.",
    "Heart size and mediastinal contour are within normal limits. No focal airspace consolidation, "
    "pleural effusion, or pneumothorax.",
    "The cardiomediastinal silhouette is normal. There is no pleural effusion or pneumothorax. "
    "Degenerative changes of the thoracic spine.",
    "Stable cardiomegaly. Mild pulmonary vascular congestion. No focal consolidation.",
    "1. No acute cardiopulmonary abnormality. 2. Stable calcified granuloma in the right upper lobe.",
    "Lungs are hyperexpanded consistent with emphysema. No acute infiltrate.",
    "The heart size is upper limits of normal. Left basilar atelectasis. No pneumothorax.",
    "Normal chest XXXX. No acute disease.",
    "There is a 1.5 cm nodule in the left lower lobe. Recommend CT for further evaluation.",
    "Heart size normal. Lungs clear. XXXX are normal.",
    "Right-sided pleural effusion with adjacent atelectasis. Heart size is normal.",
    "Postoperative changes of CABG. The lungs are clear. No effusion.",
    "Low lung volumes. Bibasilar opacities likely atelectasis. No pneumothorax.",
    "No focal consolidation, pleural effusion, or pneumothorax. The heart size is normal.",
    "The lungs are clear bilaterally. Specifically, no evidence of focal consolidation, pneumothorax, "
    "or pleural effusion. Cardio mediastinal silhouette is unremarkable.",
    "Mild cardiomegaly. Tortuous aorta. No acute pulmonary process.",
    "Interval removal of right IJ catheter. Lungs are clear. No effusion.",
    "Calcified hilar lymph nodes. Otherwise clear lungs. Normal heart size.",
    "Hyperinflation. Flattened diaphragms. No focal airspace disease.",
    "The trachea is midline. Heart and mediastinum are normal. Osseous structures intact.",
]
PREDICTIONS = [
    "The heart is normal in size. The lungs are clear.",
    "Heart size and mediastinal contour are normal. No pleural effusion or pneumothorax.",
    "The cardiomediastinal silhouette is normal. No pleural effusion or pneumothorax.",
    "Cardiomegaly. No focal consolidation.",
    "No acute cardiopulmonary abnormality.",
    "Lungs are hyperexpanded. No acute infiltrate.",
    "The heart size is normal. No pneumothorax.",
    "No acute disease.",
    "Nodule in the left lower lobe.",
    "Heart size normal. Lungs clear.",
    "Pleural effusion. Heart size is normal.",
    "The lungs are clear. No effusion.",
    "Low lung volumes. No pneumothorax.",
    "No focal consolidation. The heart size is normal.",
    "The lungs are clear. No pneumothorax or pleural effusion.",
    "Cardiomegaly. No acute pulmonary process.",
    "Lungs are clear. No effusion.",
    "Normal heart size. Clear lungs.",
    "No focal airspace disease.",
    "Heart and mediastinum are normal.",
]


def pycoco_dicts(predictions, references):
    """pycocoevalcap's {id: [text]} inputs, built independently of medcap's plumbing."""
    gts = {i: [normalize_report(r) for r in (refs if isinstance(refs, list) else [refs])]
           for i, refs in enumerate(references)}
    res = {i: [normalize_report(p)] for i, p in enumerate(predictions)}
    return gts, res


# ------------------------------------------------------------------------------------ normalisation
@pytest.mark.parametrize("raw, expected", [
    ("The heart is normal. Lungs are clear.", "the heart is normal . lungs are clear ."),
    ("HEART SIZE NORMAL", "heart size normal ."),
    ("1. No acute disease. 2. Stable cardiomegaly.", "no acute disease . stable cardiomegaly ."),
    ("Heart size normal.. Lungs clear...", "heart size normal . lungs clear ."),
    ("No pneumothorax, effusion, or consolidation; (stable)!", "no pneumothorax effusion or consolidation stable ."),
    ("Left-sided 1.5 cm nodule.", "left-sided 15 cm nodule ."),
    ("Patient's \"XXXX\" and/or [sic] {x}", "patients xxxx andor sic x ."),
    ("Changes <5 mm @ T10=stable: yes?", "changes 5 mm t10stable yes ."),
    ("Heart normal.\nLungs   clear.\t", "heart normal . lungs clear ."),
    ("Normal.  . Clear.", "normal . clear ."),
])
def test_normalize_report_follows_r2gen_cleaning(raw, expected):
    assert normalize_report(raw) == expected


@pytest.mark.parametrize("raw", ["", "   ", "...", " . ", "?!"])
def test_normalize_report_of_wordless_text_is_empty(raw):
    assert normalize_report(raw) == ""


def test_normalize_report_rejects_non_strings():
    with pytest.raises(TypeError):
        normalize_report(None)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=string.ascii_letters + string.digits + string.punctuation + " \n\t", max_size=80))
def test_normalize_report_is_idempotent_and_tokenized(text):
    out = normalize_report(text)
    assert normalize_report(out) == out
    assert out == out.lower() and out == out.strip() and "  " not in out
    assert out == "" or out.endswith(" .")
    for token in out.split(" "):
        assert token == "." or not set(token) & set(".,?;*!%^&_+():;<=>@[]{}\"'/\\")


# ------------------------------------------------------------------------------------ equality
@pytest.mark.parametrize("multi_reference", [False, True])
def test_scores_equal_pycocoevalcap(multi_reference):
    references = ([[r, REFERENCES[(i + 7) % len(REFERENCES)]] if i % 3 == 0 else [r]
                   for i, r in enumerate(REFERENCES)] if multi_reference else REFERENCES)
    gts, res = pycoco_dicts(PREDICTIONS, references)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, rouge_each = Rouge().compute_score(gts, res)
    cider, cider_each = Cider().compute_score(gts, res)

    scores = caption_scores(PREDICTIONS, references, meteor=False)
    assert set(scores) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"}
    for n in range(4):
        assert scores[f"BLEU-{n + 1}"] == pytest.approx(bleu[n], abs=1e-12)
    assert scores["ROUGE-L"] == pytest.approx(rouge, abs=1e-12)
    assert scores["CIDEr"] == pytest.approx(cider, abs=1e-12)
    np.testing.assert_allclose(per_example_cider(PREDICTIONS, references), cider_each, atol=1e-12)
    np.testing.assert_allclose(per_example_scores(PREDICTIONS, references, "ROUGE-L"), rouge_each, atol=1e-12)
    assert 0 < scores["BLEU-4"] < scores["BLEU-1"] < 1 and scores["CIDEr"] > 0


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java")
def test_meteor_equals_pycocoevalcap(monkeypatch):
    from pycocoevalcap.meteor.meteor import Meteor

    gts, res = pycoco_dicts(PREDICTIONS, REFERENCES)
    scorer = Meteor()  # one Java start (slow): medcap's cached scorer is pointed at the same process
    expected, _ = scorer.compute_score(gts, res)
    monkeypatch.setattr(metrics, "_meteor_scorer", scorer)
    assert caption_scores(PREDICTIONS, REFERENCES, meteor=True)["METEOR"] == pytest.approx(expected, abs=1e-12)
    assert "METEOR" in caption_scores(PREDICTIONS, REFERENCES)  # default: on when Java is present
    assert 0 < expected < 1


def test_missing_java_skips_meteor_with_one_warning(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    monkeypatch.setattr(metrics, "_java_warned", False)
    with pytest.warns(RuntimeWarning, match="METEOR skipped.*Java"):
        first = caption_scores(PREDICTIONS[:4], REFERENCES[:4], meteor=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = caption_scores(PREDICTIONS[:4], REFERENCES[:4], meteor=True)
    assert "METEOR" not in first and "METEOR" not in second
    assert first == second


# ------------------------------------------------------------------------------------ sanity
def test_identical_predictions_score_perfectly():
    scores = caption_scores(REFERENCES, REFERENCES, meteor=False)
    for n in range(1, 5):
        assert scores[f"BLEU-{n}"] == pytest.approx(1.0, abs=1e-6)
    assert scores["ROUGE-L"] == 1.0


def test_constant_prediction_scores_lower_cider_than_exact_references():
    constant = [REFERENCES[0]] * len(REFERENCES)
    assert caption_scores(constant, REFERENCES, meteor=False)["CIDEr"] < \
        caption_scores(REFERENCES, REFERENCES, meteor=False)["CIDEr"]


def test_normalisation_makes_case_and_punctuation_irrelevant():
    shouted = [p.upper().replace(".", " ;. ") for p in PREDICTIONS]
    assert caption_scores(shouted, REFERENCES, meteor=False) == caption_scores(PREDICTIONS, REFERENCES, meteor=False)


def test_empty_prediction_strings_score_zero():
    predictions = list(PREDICTIONS)
    predictions[3] = ""
    assert per_example_cider(predictions, REFERENCES)[3] == 0.0
    assert per_example_scores(predictions, REFERENCES, "ROUGE-L")[3] == 0.0
    assert caption_scores(predictions, REFERENCES, meteor=False)["CIDEr"] < \
        caption_scores(PREDICTIONS, REFERENCES, meteor=False)["CIDEr"]


@pytest.mark.parametrize("predictions, references, message", [
    ([], [], "empty"),
    (["a."], ["a.", "b."], "differ in length"),
    (["a.", "b."], ["a.", "..."], "empty after normalisation"),
    (["a."], [[]], "at least one reference"),
])
def test_bad_inputs_raise_clear_errors(predictions, references, message):
    with pytest.raises(ValueError, match=message):
        caption_scores(predictions, references, meteor=False)


def test_cider_uses_whole_set_document_frequencies():
    whole = caption_scores(PREDICTIONS, REFERENCES, meteor=False)["CIDEr"]
    halves = [caption_scores(PREDICTIONS[s], REFERENCES[s], meteor=False)["CIDEr"]
              for s in (slice(0, 10), slice(10, 20))]
    assert np.mean(halves) != pytest.approx(whole, rel=1e-3)
    assert per_example_cider(PREDICTIONS, REFERENCES).mean() == pytest.approx(whole, abs=1e-12)
    # One example alone: every n-gram has df = N = 1, so IDF and CIDEr are exactly 0.
    assert caption_scores(REFERENCES[:1], REFERENCES[:1], meteor=False)["CIDEr"] == 0.0


# ------------------------------------------------------------------------------------ evaluate module
@pytest.fixture(scope="module")
def caption_metric():
    return metrics.load_caption_metric()


def test_evaluate_module_loads_offline_and_matches(caption_metric):
    direct = caption_scores(PREDICTIONS, REFERENCES, meteor=False)
    direct.update(metrics.clinical_efficacy_scores(PREDICTIONS, REFERENCES))  # CE rides along by default
    assert caption_metric.compute(predictions=PREDICTIONS, references=REFERENCES, meteor=False) == direct
    as_lists = caption_metric.compute(predictions=PREDICTIONS, references=[[r] for r in REFERENCES], meteor=False)
    assert as_lists == direct


def test_evaluate_module_batches_score_the_whole_set(caption_metric):
    for start in range(0, len(PREDICTIONS), 6):
        caption_metric.add_batch(predictions=PREDICTIONS[start:start + 6],
                                 references=[[r] for r in REFERENCES[start:start + 6]])
    batched = caption_metric.compute(meteor=False, clinical_efficacy=False)
    assert batched == caption_scores(PREDICTIONS, REFERENCES, meteor=False)


# ------------------------------------------------------------------------------------ bootstrap
def test_bootstrap_interval_contains_point_and_is_deterministic():
    groups = [i // 2 for i in range(len(PREDICTIONS))]
    ci = bootstrap_ci(PREDICTIONS, REFERENCES, groups=groups, n_samples=500, seed=3)
    assert ci["point"] == pytest.approx(caption_scores(PREDICTIONS, REFERENCES, meteor=False)["CIDEr"], abs=1e-12)
    assert ci["low"] < ci["point"] < ci["high"]
    assert ci["n_groups"] == 10 and ci["metric"] == "CIDEr"
    assert bootstrap_ci(PREDICTIONS, REFERENCES, groups=groups, n_samples=500, seed=3) == ci
    assert bootstrap_ci(PREDICTIONS, REFERENCES, groups=groups, n_samples=500, seed=4) != ci


def test_bootstrap_narrows_with_more_studies():
    small = bootstrap_ci(PREDICTIONS, REFERENCES, n_samples=1000, seed=0)
    copies = 4  # the same kind of data, four times as many studies
    large = bootstrap_ci(PREDICTIONS * copies, REFERENCES * copies, n_samples=1000, seed=0)
    assert (large["high"] - large["low"]) < 0.7 * (small["high"] - small["low"])


def test_bootstrap_keeps_studies_together():
    good, bad = REFERENCES[:10], ["Xylophone noted."] * 10
    predictions, references = good + bad, REFERENCES[:10] + REFERENCES[10:]
    scores = per_example_cider(predictions, references)
    good_mean, bad_mean = scores[:10].mean(), scores[10:].mean()
    assert good_mean > bad_mean + 1
    by_study = bootstrap_ci(predictions, references, groups=["A"] * 10 + ["B"] * 10, n_samples=1000, seed=0)
    # Two studies: each sample is AA, AB or BB (P(BB) = P(AA) = 1/4), so the 2.5% and 97.5% points are
    # exactly the two studies' means.
    assert by_study["low"] == pytest.approx(bad_mean, abs=1e-9)
    assert by_study["high"] == pytest.approx(good_mean, abs=1e-9)
    by_example = bootstrap_ci(predictions, references, groups=None, n_samples=1000, seed=0)
    spread = good_mean - bad_mean
    assert by_example["low"] > bad_mean + 0.1 * spread and by_example["high"] < good_mean - 0.1 * spread


def test_bootstrap_is_fast_for_600_studies():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(600), 2)
    scores = rng.gamma(2.0, 0.2, size=groups.size)
    start = time.perf_counter()
    ci = bootstrap_mean_ci(scores, groups, n_samples=1000, seed=0)
    assert time.perf_counter() - start < 0.5
    assert ci["low"] < scores.mean() < ci["high"] and ci["n_groups"] == 600


@pytest.mark.parametrize("kwargs, message", [
    (dict(groups=[1, 2]), "groups has 2 entries"),
    (dict(confidence=1.0), "confidence"),
    (dict(n_samples=0), "n_samples"),
    (dict(metric="BLEU-4"), "corpus-level"),
])
def test_bootstrap_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bootstrap_ci(PREDICTIONS[:4], REFERENCES[:4], **kwargs)


# ------------------------------------------------------------------------------------ table
def test_format_table_shows_scores_and_interval():
    scores = caption_scores(PREDICTIONS, REFERENCES, meteor=False)
    ci = bootstrap_ci(PREDICTIONS, REFERENCES, n_samples=200)
    row = table_row(scores, ci)
    assert row["CIDEr_ci_low"] == ci["low"] and row["CIDEr_ci_high"] == ci["high"]
    table = format_table({"constant": row, "finetuned": table_row(scores)})
    lines = table.splitlines()
    assert lines[0].startswith("| system | CIDEr") and len(lines) == 4
    assert f"{scores['CIDEr']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]" in lines[2]
    assert lines[3].startswith("| finetuned |") and "[" not in lines[3]
