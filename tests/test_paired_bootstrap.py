"""The paired bootstrap of score differences: same studies for both systems, narrower than two intervals."""

from __future__ import annotations

import numpy as np
import pytest

from medcap_helpers.config import MedcapConfig
from medcap_helpers.metrics import (
    CE_MICRO_F1,
    bootstrap_ci,
    caption_scores,
    clinical_efficacy_scores,
    paired_difference_ci,
    paired_differences,
)

REFERENCES = [
    "The heart is enlarged. Small left pleural effusion.",
    "The lungs are clear. No pneumothorax.",
    "Heart size normal. Right lower lobe opacity, pneumonia.",
    "No acute cardiopulmonary abnormality. The lungs are clear.",
    "Cardiomegaly. Pulmonary edema.",
    "Heart size is normal. No pleural effusion.",
] * 4
STUDIES = [i // 2 for i in range(len(REFERENCES))]  # two images per study
TEMPLATE = ["The lungs are clear. No pneumothorax."] * len(REFERENCES)


def test_point_is_the_difference_of_the_full_set_scores() -> None:
    good = list(REFERENCES)
    good[0] = "The heart is normal."
    for metric in ("CIDEr", CE_MICRO_F1):
        result = paired_difference_ci(good, TEMPLATE, REFERENCES, groups=STUDIES, metric=metric, n_samples=200)
        if metric == "CIDEr":
            expected = caption_scores(good, REFERENCES, meteor=False)["CIDEr"] - \
                caption_scores(TEMPLATE, REFERENCES, meteor=False)["CIDEr"]
        else:
            expected = clinical_efficacy_scores(good, REFERENCES)[CE_MICRO_F1] - \
                clinical_efficacy_scores(TEMPLATE, REFERENCES)[CE_MICRO_F1]
        assert result["point"] == pytest.approx(expected)
        assert result["low"] > 0 and result["low"] <= result["high"], metric
        assert result["n_groups"] == len(set(STUDIES)) and result["metric"] == metric


def test_a_system_against_itself_differs_by_exactly_zero() -> None:
    result = paired_difference_ci(TEMPLATE, TEMPLATE, REFERENCES, groups=STUDIES, n_samples=100)
    assert result["point"] == result["low"] == result["high"] == 0.0


def test_paired_interval_is_narrower_than_the_two_intervals_suggest() -> None:
    """Two systems that differ on one study only: their own intervals overlap widely, the paired one is tight."""
    better = list(TEMPLATE)
    better[4] = better[5] = REFERENCES[4]
    own = bootstrap_ci(better, REFERENCES, groups=STUDIES, n_samples=300)
    other = bootstrap_ci(TEMPLATE, REFERENCES, groups=STUDIES, n_samples=300)
    paired = paired_difference_ci(better, TEMPLATE, REFERENCES, groups=STUDIES, n_samples=300)
    assert own["low"] < other["high"]  # the per-system intervals overlap ...
    assert paired["high"] - paired["low"] < (own["high"] - own["low"])  # ... the paired one is narrower
    assert paired["low"] >= 0.0  # and never negative: the better system is never worse on any study


def test_same_seed_same_draws_and_mismatched_lengths_are_a_clear_error() -> None:
    first = paired_difference_ci(REFERENCES, TEMPLATE, REFERENCES, groups=STUDIES, n_samples=50, seed=3)
    again = paired_difference_ci(REFERENCES, TEMPLATE, REFERENCES, groups=STUDIES, n_samples=50, seed=3)
    assert first == again
    with pytest.raises(ValueError, match="same examples"):
        paired_difference_ci(REFERENCES[:-1], TEMPLATE, REFERENCES)


def test_paired_differences_names_each_pair_and_rejects_unknown_systems() -> None:
    split = {"text": REFERENCES, "study_id": STUDIES}
    config = MedcapConfig.from_profile("smoke", bootstrap_samples=50)
    systems = {"model": REFERENCES, "constant": TEMPLATE}
    results = paired_differences(systems, split, config, [("model", "constant")])
    assert [(r["system"], r["baseline"], r["metric"]) for r in results] == [
        ("model", "constant", "CIDEr"), ("model", "constant", CE_MICRO_F1)]
    assert all(np.isfinite(r["low"]) for r in results)
    with pytest.raises(ValueError, match="No predictions for 'nearest'"):
        paired_differences(systems, split, config, [("nearest", "constant")])
