"""The interpretation cells' text: written from the numbers, saying when a difference is inside the noise."""

from __future__ import annotations

from pathlib import Path

import pytest

from medcap_helpers import interpretation as say
from medcap_helpers import merge, runs
from medcap_helpers.config import MedcapConfig
from medcap_helpers.metrics import CE_MICRO_F1
from medcap_helpers.summary import summary_markdown


def difference(system: str, baseline: str, point: float, low: float, high: float,
               metric: str = "CIDEr") -> dict:
    return {"system": system, "baseline": baseline, "metric": metric, "point": point, "low": low, "high": high}


def test_every_interpretation_starts_with_the_reading_mark() -> None:
    texts = [say.report_lengths([10, 20, 30], 64, 40), say.template_sentences([("the lungs are clear", 3, 0.1)]),
             say.dataset_splits({"test": {"studies": 60}, "validation": {"studies": 30}}, True),
             say.sample_images(False, 4), say.examples({"reference": ["Cardiomegaly."], "model": ["Normal."]})]
    assert all(text.startswith(say.READING) for text in texts)


def test_verdict_follows_the_interval_not_the_point() -> None:
    assert say.verdict(difference("a", "b", 0.2, 0.01, 0.4)) == "better"
    assert say.verdict(difference("a", "b", -0.2, -0.4, -0.01)) == "worse"
    inside = difference("a", "b", 0.3, -0.05, 0.6)
    assert say.verdict(inside) == "inside the noise" and not say.established(inside)
    table = say.differences_markdown([inside])
    assert "| a | b | CIDEr | +0.300 [-0.050, +0.600] | inside the noise |" in table
    assert "cannot tell the two apart" in say.difference_sentence(inside)
    assert "real gain" in say.difference_sentence(difference("a", "b", 0.2, 0.01, 0.4))


def test_report_lengths_say_which_limit_cuts_reports() -> None:
    text = say.report_lengths(list(range(10, 110)), max_target_tokens=64, max_new_tokens=40)
    assert "median report has 60 tokens" in text
    assert "45.0% of the training reports are longer than `max_target_tokens` = 64" in text
    assert "`max_new_tokens` = 40" in text and "capped" in text
    roomy = say.report_lengths([10, 12], max_target_tokens=64, max_new_tokens=100)
    assert "none is cut" in roomy and "leaves room" in roomy


def test_training_history_flags_an_epoch_chosen_on_noise_and_a_still_falling_loss() -> None:
    history = [{"epoch": float(e), "eval_loss": 2.0 - 0.1 * e, "val_scores": {CE_MICRO_F1: s}}
               for e, s in enumerate([0.40, 0.44, 0.41, 0.45, 0.44], start=1)]
    text = say.training_history(history, 4.0, CE_MICRO_F1)
    assert "still falling" in text and "kept epoch, 4" in text and "made on noise" in text
    clear = [{"epoch": float(e), "eval_loss": 1.0 + 0.1 * e, "val_scores": {CE_MICRO_F1: s}}
             for e, s in enumerate([0.1, 0.12, 0.11, 0.6], start=1)]
    text = say.training_history(clear, 4.0, CE_MICRO_F1)
    assert "lowest at epoch 1" in text and "made on noise" not in text
    assert say.epoch_noise(clear, CE_MICRO_F1) == pytest.approx((0.01 + 0.49) / 2)  # the second half's changes


def test_sweep_choice_calls_a_tie_a_tie() -> None:
    trials = [{"lora_r": r, "lora_alpha": 16, "val_ce_micro_f1": v} for r, v in ((4, 0.44), (16, 0.45))]
    chosen = trials[1]
    assert say.trial_key(CE_MICRO_F1) == "val_ce_micro_f1" and say.trial_key("CIDEr") == "val_cider"
    assert "made on noise" in say.sweep_choice(trials, chosen, CE_MICRO_F1, noise=0.05)
    assert "leads the others" in say.sweep_choice(trials, chosen, CE_MICRO_F1, noise=0.001)
    assert "No trial finished" in say.sweep_choice([], None, CE_MICRO_F1, noise=0.1)
    halving = [dict(t, rung=0) for t in trials] + [dict(trials[1], rung=1, val_ce_micro_f1=0.5),
                                                   dict(trials[0], rung=1, val_ce_micro_f1=0.3)]
    text = say.sweep_choice(halving, halving[2], CE_MICRO_F1, noise=0.05)
    assert "2 trials in the final rung score between 0.300 and 0.500" in text and "leads the others" in text
    tied = say.sweep_choice([dict(t, val_ce_micro_f1=0.444) for t in trials], dict(chosen, val_ce_micro_f1=0.444),
                            CE_MICRO_F1, noise=0.02)
    assert "2 trials in the sweep all score 0.444" in tied and "made on noise" in tied


def test_baselines_explain_a_constant_report_with_the_best_cider() -> None:
    table = {"constant": {"CIDEr": 0.44, CE_MICRO_F1: 0.31}, "nearest": {"CIDEr": 0.35, CE_MICRO_F1: 0.55}}
    differences = [difference("nearest", "constant", -0.09, -0.5, 0.3),
                   difference("nearest", "constant", 0.24, 0.1, 0.35, CE_MICRO_F1)]
    text = say.baselines(table, differences, "constant")
    assert "highest CIDEr is the constant's (0.440)" in text and "tf-idf" in text
    assert "establish: nearest on CE micro-F1 (better, +0.240 [+0.100, +0.350])" in text
    assert "Inside the noise (interval includes 0): nearest on CIDEr." in text


def test_collapse_names_the_systems_that_write_one_report() -> None:
    signals = {"reference_abnormal_share": 0.58, "reference_distinct_share": 0.97,
               "systems": {"constant": {"distinct_share": 0.02, "abnormal_share": 0.0},
                           "model": {"distinct_share": 0.6, "abnormal_share": 0.5}}}
    text = say.collapse(signals)
    assert "under 25% distinct): constant." in text and "Closest to the references' share: model" in text


def test_merge_choice_states_the_rule_and_when_the_choice_is_noise() -> None:
    rule = merge.FINAL_RULE.format(metric="CIDEr")
    noisy = [difference(merge.FINAL_CANDIDATES["merged-nf4"], merge.FINAL_CANDIDATES["merged-dequantized-nf4"],
                        0.003, -0.1, 0.1)]
    text = say.merge_choice(noisy, merge.FINAL_CANDIDATES["merged-dequantized-nf4"], rule)
    assert "excludes 0" in text and "choosing on noise" in text


@pytest.mark.parametrize(("adapter", "sixteen", "expected"), [
    ((0.05, -0.01, 0.1), (0.2, 0.1, 0.3), "merged-nf4"),       # only the 16-bit merge is established
    ((0.3, 0.2, 0.4), (0.2, 0.1, 0.3), "adapter"),             # both are: the larger difference wins
    ((0.3, -0.1, 0.7), (0.003, -0.1, 0.1), "merged-dequantized-nf4"),  # points alone never switch
])
def test_choose_final_switches_only_on_an_interval_above_zero(adapter: tuple, sixteen: tuple,
                                                               expected: str) -> None:
    default = merge.FINAL_CANDIDATES["merged-dequantized-nf4"]
    differences = [difference(merge.FINAL_CANDIDATES["adapter"], default, *adapter),
                   difference(merge.FINAL_CANDIDATES["merged-nf4"], default, *sixteen)]
    assert merge.choose_final(differences, "CIDEr") == expected
    assert merge.choose_final(differences, "CIDEr", candidates=merge.MERGES) in merge.MERGES


def test_choose_final_without_the_comparisons_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="No paired CIDEr difference"):
        merge.choose_final([], "CIDEr")


def test_summary_shows_the_paired_differences(tmp_path: Path) -> None:
    config = MedcapConfig.from_profile("smoke", run_dir=str(tmp_path))
    runs.write_run_header(config)
    runs.write_stage_metrics(tmp_path, "06_eval_and_demo", {
        "test_table": {"model": {"CIDEr": 0.4}, "constant": {"CIDEr": 0.44}},
        "test_differences": [difference("model", "constant", -0.04, -0.2, 0.1)]})
    text = summary_markdown(tmp_path)
    assert "Paired differences" in text and "| model | constant | CIDEr | -0.040 [-0.200, +0.100] | inside the noise |" in text


@pytest.mark.parametrize(("interval", "expected"), [
    ((0.1, 0.05, 0.2), "confirms 05's choice"),
    ((-0.1, -0.2, -0.05), "reverses 05's choice"),
    ((0.003, -0.1, 0.1), "made on noise"),
])
def test_final_results_say_whether_the_test_split_confirms_the_choice(interval: tuple, expected: str) -> None:
    table = {"constant": {"CIDEr": 0.44}, "adapter": {"CIDEr": 0.40}, "merged": {"CIDEr": 0.24}}
    differences = [difference("adapter", "constant", 0.15, 0.07, 0.24, CE_MICRO_F1),
                   difference("adapter", "merged", *interval, metric=CE_MICRO_F1)]
    text = say.final_results(table, differences, "adapter", "constant", CE_MICRO_F1)
    assert expected in text
    assert "Against the constant report, established: CE micro-F1 +0.150 [+0.070, +0.240] (better)." in text
    assert "Below the constant report on CIDEr: adapter, merged." in text
