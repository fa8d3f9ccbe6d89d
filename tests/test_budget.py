"""Budget fit with a fake memory probe: candidates that run out of memory are skipped."""

from __future__ import annotations

import pytest

from medcap_helpers.budget import TrainingCandidate, candidate_settings, fit_to_budget


def test_candidates_keep_the_effective_batch_fastest_first() -> None:
    candidates = candidate_settings(effective_batch=4)
    assert [c.per_device_train_batch_size * c.gradient_accumulation_steps for c in candidates] == [4] * 6
    assert candidates[0] == TrainingCandidate(4, 1, False)
    assert candidates[-1] == TrainingCandidate(1, 4, True)
    assert [c.per_device_train_batch_size for c in candidate_settings(12)][::2] == [12, 6, 4, 3, 2, 1]
    # the full profile's effective batch is tried whole first (one launch-bound micro-batch per step)
    assert [(c.per_device_train_batch_size, c.gradient_checkpointing) for c in candidate_settings(32)][:3] == [
        (32, False), (32, True), (16, False)]
    assert candidate_settings(64)[0].per_device_train_batch_size == 32


def fake_probe(peaks: dict[tuple[int, bool], float | None]):
    calls: list[TrainingCandidate] = []

    def probe(candidate: TrainingCandidate) -> tuple[float, float]:
        calls.append(candidate)
        peak = peaks[(candidate.per_device_train_batch_size, candidate.gradient_checkpointing)]
        if peak is None:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return peak, 10.0 / peak

    return probe, calls


def test_oom_and_over_budget_candidates_are_skipped() -> None:
    probe, calls = fake_probe({(4, False): None, (4, True): 3.8, (2, False): 3.5, (2, True): 2.0,
                               (1, False): 1.9, (1, True): 1.0})
    fit = fit_to_budget(candidate_settings(4), probe, budget_gb=4.0, margin=0.1)
    assert fit.chosen == TrainingCandidate(2, 2, False)  # 3.5 GB <= 3.6 usable
    assert [o.status for o in fit.tried] == ["out of memory", "over budget", "fits"]
    assert len(calls) == 3  # stops at the first fit
    assert "out of memory" in fit.explain() and "Chosen: batch 2 × accumulation 2" in fit.explain()


def test_nothing_fits_is_reported_not_raised() -> None:
    probe, _ = fake_probe({(b, c): None for b in (1, 2) for c in (False, True)})
    fit = fit_to_budget(candidate_settings(2), probe, budget_gb=0.5)
    assert fit.chosen is None and len(fit.tried) == 4
    assert "Nothing fits" in fit.explain()


def test_other_errors_are_not_swallowed() -> None:
    def broken(_: TrainingCandidate) -> tuple[float, float]:
        raise ValueError("shape mismatch")

    with pytest.raises(ValueError, match="shape mismatch"):
        fit_to_budget(candidate_settings(1), broken, budget_gb=4.0)


def test_the_probe_batch_is_the_costliest_the_training_set_holds() -> None:
    """Two-view studies first, then the longest reports: a setting that fits them fits every batch."""
    from datasets import Dataset, Features, Image, Value

    from medcap_helpers.budget import costliest_rows

    texts = ["short", "a much longer report text", "mid length", "longest report of all of them here", "x"]
    seconds = [None, None, "second.png", None, "second.png"]
    rows = [{"text": t, "image_2": s} for t, s in zip(texts, seconds)]
    chosen = [r["text"] for r in costliest_rows(rows, 3)]
    assert chosen == ["mid length", "x", "longest report of all of them here"]
    assert [r["text"] for r in costliest_rows(rows[:2], 3)] == [texts[1], texts[0], texts[1]]  # repeated
    dataset = Dataset.from_dict({"text": texts, "image_2": [None] * 5},
                                features=Features({"text": Value("string"), "image_2": Image()}))
    assert [r["text"] for r in costliest_rows(dataset, 2)] == [texts[3], texts[1]]  # no image is decoded
