"""Clinical efficacy (CE) of generated reports: the metric, its bootstrap over studies, every table that
scores systems, the evaluate module, and (slow) the smoke run's fine-tuned model beating the constant report."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from medcap_helpers import findings, pretrain, runs
from medcap_helpers.config import MedcapConfig
from medcap_helpers.merge import MergeOutcome, degradation_markdown
from medcap_helpers.metrics import (
    CE_CLASSES,
    CE_MACRO_F1,
    CE_MICRO_F1,
    bootstrap_mean_ci,
    bootstrap_micro_f1_ci,
    ce_comparison,
    clinical_efficacy_scores,
    collapse_markdown,
    collapse_signals,
    format_table,
    load_caption_metric,
    score_row,
)
from medcap_helpers.summary import summary_markdown
from medcap_helpers.sweep import SweepResult, results_markdown
from medcap_helpers.train import _default_scorer, epoch_history, history_markdown

# A hand-labelled example: three studies, A with two images.
#   A1: ref {Cardiomegaly, Effusion}, pred {Cardiomegaly}            -> tp 1, fp 0, fn 1
#   A2: ref {Cardiomegaly, Effusion}, pred {Cardiomegaly, Effusion}  -> tp 2, fp 0, fn 0
#   B:  ref {No Finding},             pred {Pneumothorax}            -> tp 0, fp 1, fn 1
#   C:  ref {No Finding},             pred {No Finding}              -> tp 1, fp 0, fn 0
REF_A = "Mild cardiomegaly. Small left pleural effusion."
REFERENCES = [REF_A, REF_A, "Lungs are clear. Heart size is normal.", "No acute cardiopulmonary abnormality."]
PREDICTIONS = ["The heart is enlarged.", "Cardiomegaly. Small right pleural effusion.", "Large right pneumothorax.",
               "The lungs are clear."]
STUDIES = ["A", "A", "B", "C"]
COUNTS = [(1, 0, 1), (2, 0, 0), (0, 1, 1), (1, 0, 0)]


def f1(tp: float, fp: float, fn: float) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def test_labels_of_the_hand_example() -> None:
    labels = [findings.positive_classes(t) for t in PREDICTIONS + REFERENCES]
    assert labels[:4] == [{"Cardiomegaly"}, {"Cardiomegaly", "Pleural Effusion"}, {"Pneumothorax"}, {"No Finding"}]
    assert labels[4:] == [{"Cardiomegaly", "Pleural Effusion"}] * 2 + [{"No Finding"}] * 2
    assert findings.example_counts(PREDICTIONS, REFERENCES) == COUNTS


def test_hand_computed_micro_macro_and_per_class() -> None:
    ce = findings.clinical_efficacy(PREDICTIONS, REFERENCES)
    # Micro over all 14 classes: tp 4, fp 1 (the pneumothorax no reference names still counts), fn 2.
    assert (ce["tp"], ce["fp"], ce["fn"]) == (4, 1, 2)
    assert ce["micro"]["precision"] == pytest.approx(4 / 5) and ce["micro"]["recall"] == pytest.approx(4 / 6)
    assert ce["micro_f1"] == pytest.approx(8 / 11)
    classes = ce["classes"]
    assert (classes["Cardiomegaly"]["tp"], classes["Cardiomegaly"]["f1"]) == (2, 1.0)
    assert classes["Pleural Effusion"]["recall"] == 0.5 and classes["Pleural Effusion"]["f1"] == pytest.approx(2 / 3)
    assert classes["No Finding"]["precision"] == 1.0 and classes["No Finding"]["recall"] == 0.5
    assert (classes["Pneumothorax"]["support"], classes["Pneumothorax"]["fp"]) == (0, 1)
    # Macro over the classes the references name (Pneumothorax has no support, so it is not averaged).
    assert ce["included"] == ["No Finding", "Cardiomegaly", "Pleural Effusion"]
    assert ce["macro_f1"] == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)
    assert ce["macro"]["precision"] == pytest.approx(1.0) and ce["macro"]["recall"] == pytest.approx(2 / 3)

    row = clinical_efficacy_scores(PREDICTIONS, REFERENCES, per_class=True)
    assert row[CE_MICRO_F1] == pytest.approx(8 / 11) and row[CE_MACRO_F1] == pytest.approx(7 / 9)
    assert row["CE micro-precision"] == pytest.approx(0.8) and row["CE micro-recall"] == pytest.approx(2 / 3)
    assert row[CE_CLASSES]["Pleural Effusion"] == pytest.approx(
        {"support": 2, "tp": 1, "fp": 0, "fn": 1, "precision": 1.0, "recall": 0.5, "f1": 2 / 3})
    assert f"{CE_MICRO_F1}_ci_low" not in row  # no interval unless asked for


def test_perfect_empty_and_bad_inputs() -> None:
    assert clinical_efficacy_scores(REFERENCES, REFERENCES)[CE_MICRO_F1] == 1.0
    # An empty report names nothing abnormal: No Finding, right only for the normal references.
    empty = findings.clinical_efficacy([""] * 4, REFERENCES)
    assert (empty["tp"], empty["fp"], empty["fn"]) == (2, 2, 4)
    # A list of references per prediction is labelled by its first one.
    listed = clinical_efficacy_scores(PREDICTIONS, [[r, "Cardiomegaly."] for r in REFERENCES])
    assert listed[CE_MICRO_F1] == pytest.approx(8 / 11)
    with pytest.raises(ValueError, match="differ in length"):
        clinical_efficacy_scores(PREDICTIONS, REFERENCES[:3])
    with pytest.raises(ValueError, match="empty"):
        clinical_efficacy_scores([], [])
    with pytest.raises(TypeError):
        clinical_efficacy_scores("a report", "a reference")


# ------------------------------------------------------------------------------------ bootstrap
def exact_study_bootstrap(counts: list[tuple[int, int, int]], groups: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Every equally likely ordered draw of len(studies) studies with replacement: its micro-F1 from the
    summed counts. Returns (values, probabilities) of the exact bootstrap distribution."""
    per_study = {}
    for g, c in zip(groups, counts):
        per_study[g] = tuple(a + b for a, b in zip(per_study.get(g, (0, 0, 0)), c))
    studies = list(per_study.values())
    draws = [f1(*np.sum(draw, axis=0)) for draw in itertools.product(studies, repeat=len(studies))]
    values, times = np.unique(np.round(draws, 12), return_counts=True)
    return values, times / times.sum()


def test_bootstrap_recomputes_micro_f1_from_the_resampled_studies() -> None:
    ci = bootstrap_micro_f1_ci(COUNTS, STUDIES, n_samples=20_000, seed=0)
    assert ci["point"] == pytest.approx(8 / 11) and ci["n_groups"] == 3 and ci["metric"] == CE_MICRO_F1
    values, probabilities = exact_study_bootstrap(COUNTS, STUDIES)
    exact_mean = float(values @ probabilities)
    assert ci["mean"] == pytest.approx(exact_mean, abs=0.005)
    # Not the mean of per-study F1 (A 6/7, B 0, C 1): micro-F1 is a ratio of summed counts.
    per_study_f1_mean = (f1(3, 0, 1) + f1(0, 1, 1) + f1(1, 0, 0)) / 3
    assert abs(exact_mean - per_study_f1_mean) > 0.03
    # The percentile bounds are values the exact distribution takes, at its 2.5% and 97.5% quantiles.
    cdf = np.cumsum(probabilities)
    assert min(abs(cdf - 0.025).min(), abs(cdf - 0.975).min()) > 0.01  # no quantile sits on a step
    assert ci["low"] == pytest.approx(values[np.searchsorted(cdf, 0.025)], abs=1e-9)
    assert ci["high"] == pytest.approx(values[np.searchsorted(cdf, 0.975)], abs=1e-9)
    assert ci["low"] < ci["point"] < ci["high"]


def test_bootstrap_resamples_studies_not_images() -> None:
    # Study A's two images always travel together: resampling images instead gives another distribution.
    by_study = bootstrap_micro_f1_ci(COUNTS, STUDIES, n_samples=20_000, seed=1)
    by_image = bootstrap_micro_f1_ci(COUNTS, None, n_samples=20_000, seed=1)
    assert by_image["n_groups"] == 4 and by_study["n_groups"] == 3
    assert by_study["point"] == by_image["point"]
    image_values, image_probabilities = exact_study_bootstrap(COUNTS, ["1", "2", "3", "4"])
    assert by_image["mean"] == pytest.approx(float(image_values @ image_probabilities), abs=0.005)
    assert abs(by_image["mean"] - by_study["mean"]) > 0.01


def test_bootstrap_edge_cases_and_determinism() -> None:
    same = bootstrap_micro_f1_ci([(2, 1, 1)] * 6, ["s1", "s1", "s2", "s2", "s3", "s3"], n_samples=300)
    assert same["low"] == same["high"] == same["point"] == pytest.approx(f1(2, 1, 1))  # identical studies
    nothing = bootstrap_micro_f1_ci([(0, 0, 0)] * 3, n_samples=50)
    assert nothing["point"] == nothing["low"] == nothing["high"] == 0.0
    first = bootstrap_micro_f1_ci(COUNTS, STUDIES, n_samples=500, seed=7)
    assert first == bootstrap_micro_f1_ci(COUNTS, STUDIES, n_samples=500, seed=7)
    # The same seed draws the same studies as bootstrap_mean_ci (CIDEr's): with one tp or one fn per example,
    # a resample's micro-F1 is 2m / (1 + m), m its share of tp, so the two intervals map onto each other.
    hits = [1.0, 0.0, 1.0, 0.0]
    paired = bootstrap_micro_f1_ci([(h, 0, 1 - h) for h in hits], STUDIES, n_samples=400, seed=3)
    share = bootstrap_mean_ci(hits, STUDIES, n_samples=400, seed=3)
    for key in ("low", "high"):
        assert paired[key] == pytest.approx(2 * share[key] / (1 + share[key]), abs=1e-12)
    assert paired["low"] < paired["high"]
    for bad, message in (([(1, 0)], "one \\(tp, fp, fn\\) row"), ([], "No counts")):
        with pytest.raises(ValueError, match=message):
            bootstrap_micro_f1_ci(bad)
    with pytest.raises(ValueError, match="groups has 2 entries"):
        bootstrap_micro_f1_ci(COUNTS, ["a", "b"])
    with pytest.raises(ValueError, match="n_samples"):
        bootstrap_micro_f1_ci(COUNTS, n_samples=0)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_micro_f1_ci(COUNTS, confidence=1.5)


# ------------------------------------------------------------------------------------ tables
def split() -> dict:
    return {"text": REFERENCES, "study_id": STUDIES}


def test_score_row_and_table_show_ce_with_its_interval() -> None:
    config = MedcapConfig(bootstrap_samples=400, seed=0)
    row = score_row(PREDICTIONS, split(), config)
    interval = bootstrap_micro_f1_ci(COUNTS, STUDIES, n_samples=400, seed=0)
    assert row[CE_MICRO_F1] == pytest.approx(8 / 11)
    assert (row[f"{CE_MICRO_F1}_ci_low"], row[f"{CE_MICRO_F1}_ci_high"]) == (interval["low"], interval["high"])
    assert row[CE_CLASSES]["Cardiomegaly"]["f1"] == 1.0 and "CIDEr_ci_low" in row
    table = format_table({"model": row, "constant": score_row(["The lungs are clear."] * 4, split(), config)})
    header = table.splitlines()[0]
    assert header.startswith("| system | CIDEr | CE micro-F1 | CE macro-F1 | BLEU-1 | BLEU-4 | ROUGE-L")
    assert f"| {8 / 11:.3f} [{interval['low']:.3f}, {interval['high']:.3f}] |" in table.splitlines()[2]
    assert CE_CLASSES not in table


def test_ce_comparison_sentence_comes_from_the_numbers() -> None:
    table = {"model": {CE_MICRO_F1: 0.6, f"{CE_MICRO_F1}_ci_low": 0.5, f"{CE_MICRO_F1}_ci_high": 0.7},
             "constant": {CE_MICRO_F1: 0.3, f"{CE_MICRO_F1}_ci_low": 0.2, f"{CE_MICRO_F1}_ci_high": 0.4}}
    better = ce_comparison(table, "model", "constant", labels=("fine-tuned model", "constant report"))
    assert better == ("The fine-tuned model names the findings better than the constant report: CE micro-F1 "
                      "0.600 [0.500, 0.700] vs 0.300 [0.200, 0.400] (+0.300). The 95% intervals do not overlap.")
    table["constant"][f"{CE_MICRO_F1}_ci_high"] = 0.55
    assert "intervals overlap, so this test set does not establish" in ce_comparison(table, "model", "constant")
    paired = {"point": 0.3, "low": 0.05, "high": 0.5}
    assert "paired-bootstrap interval of the difference, [+0.050, +0.500], excludes 0" in ce_comparison(
        table, "model", "constant", difference=paired)
    assert "includes 0, so this test set does not establish" in ce_comparison(
        table, "model", "constant", difference={"point": 0.3, "low": -0.05, "high": 0.5})
    assert "names the findings worse than" in ce_comparison(table, "constant", "model")
    assert ce_comparison(table, "model", "missing") == ""


def test_collapse_signals() -> None:
    signals = collapse_signals({"constant": ["The lungs are clear."] * 4, "model": PREDICTIONS}, REFERENCES)
    assert signals["reference_abnormal_share"] == 0.5 and signals["reference_distinct_share"] == 0.75
    assert signals["systems"]["constant"] == {"distinct_share": 0.25, "abnormal_share": 0.0, "n_reports": 4}
    assert signals["systems"]["model"]["abnormal_share"] == 0.75
    text = collapse_markdown(signals)
    assert "| constant | 25% | 0% |" in text and "| *reference reports* | 75% | 50% |" in text
    # A device is not an abnormal finding.
    assert not findings.names_abnormal("Left-sided pacemaker. The lungs are clear.")


def test_validation_scorer_and_epoch_table_carry_ce() -> None:
    scores = _default_scorer()(PREDICTIONS, REFERENCES)
    assert scores[CE_MICRO_F1] == pytest.approx(8 / 11) and "CIDEr" in scores and "METEOR" not in scores
    log = [{"epoch": 1.0, "step": 4, "eval_loss": 2.0, "eval_cider": 0.1, "eval_ce_micro_f1": 0.4,
            "eval_bleu_4": 0.05, "eval_rouge_l": 0.2}]
    history = epoch_history(log)
    assert history[0]["val_ce_micro_f1"] == 0.4 and history[0]["val_scores"][CE_MICRO_F1] == 0.4
    table = history_markdown(history)
    assert "val CE micro-F1" in table.splitlines()[0] and "| 0.100 | 0.400 | 0.050 |" in table


def test_sweep_and_merge_tables_carry_ce() -> None:
    trial = {"lora_r": 8, "lora_alpha": 32, "val_cider": 0.2, "val_ce_micro_f1": 0.45, "trainable_params": 10,
             "peak_gpu_gb": None, "peak_rss_gb": 1.0, "wall_time_s": 3.0, "feasible": None}
    text = results_markdown(SweepResult(trials=[trial], chosen=trial))
    assert "val CE micro-F1" in text and "| 0.200 | 0.450 |" in text and "CE micro-F1 0.450" in text
    reference = {"CIDEr": 0.2, CE_MICRO_F1: 0.5, "BLEU-4": 0.1, "ROUGE-L": 0.3, f"{CE_MICRO_F1}_ci_low": 0.4,
                 CE_CLASSES: {}}
    merged = dict(reference, **{CE_MICRO_F1: 0.45})
    outcome = MergeOutcome(checkpoints={}, validation={"adapter on 4-bit base": reference, "merged": merged},
                           final_name="merged-nf4", final_dir=Path("x"))
    assert outcome.deltas()["merged"][CE_MICRO_F1] == pytest.approx(-0.05)
    assert f"{CE_MICRO_F1}_ci_low" not in outcome.deltas()["merged"]
    assert "ΔCE micro-F1" in degradation_markdown(outcome) and "| -0.0500 |" in degradation_markdown(outcome)


def test_summary_shows_the_ce_sentence_and_collapse_table(tmp_path: Path) -> None:
    config = MedcapConfig.from_profile("smoke", run_dir=str(tmp_path))
    runs.write_run_header(config)
    table = {"constant (most frequent report)": {"CIDEr": 0.2, CE_MICRO_F1: 0.3},
             "fine-tuned, merged NF4": {"CIDEr": 0.1, CE_MICRO_F1: 0.5}}
    sentence = ce_comparison(table, "fine-tuned, merged NF4", "constant (most frequent report)")
    signals = collapse_signals({"constant (most frequent report)": ["Clear."] * 2}, ["Cardiomegaly.", "Clear."])
    runs.write_stage_metrics(tmp_path, "06_eval_and_demo", {"test_table": table, "ce_statement": sentence,
                                                            "collapse": signals})
    text = summary_markdown(tmp_path)
    assert "| system | CIDEr | CE micro-F1 |" in text
    assert sentence in text and "| *reference reports* | 100% | 50% |" in text


def test_evaluate_module_computes_ce_with_its_interval() -> None:
    metric = load_caption_metric()
    metric.add_batch(predictions=PREDICTIONS[:2], references=REFERENCES[:2])
    metric.add_batch(predictions=PREDICTIONS[2:], references=REFERENCES[2:])
    scores = metric.compute(meteor=False, study_ids=STUDIES, bootstrap_samples=400, seed=0)
    expected = clinical_efficacy_scores(PREDICTIONS, REFERENCES, groups=STUDIES, n_samples=400, seed=0)
    assert {k: scores[k] for k in expected} == pytest.approx(expected)
    assert "CIDEr" in scores and scores[CE_MICRO_F1] == pytest.approx(8 / 11)
    plain = load_caption_metric().compute(predictions=PREDICTIONS, references=REFERENCES, meteor=False)
    assert plain[CE_MICRO_F1] == pytest.approx(8 / 11) and f"{CE_MICRO_F1}_ci_low" not in plain
    without = load_caption_metric().compute(predictions=PREDICTIONS, references=REFERENCES, meteor=False,
                                            clinical_efficacy=False)
    assert CE_MICRO_F1 not in without


# ------------------------------------------------------------------------------------ the smoke run
@pytest.mark.slow
def test_smoke_run_fine_tuned_model_names_findings_better_than_the_constant_report(smoke_run: dict) -> None:
    table = smoke_run["metrics"]["06_eval_and_demo"]["test_table"]
    constant = table["constant (most frequent report)"][CE_MICRO_F1]
    for name in ("fine-tuned (adapter on 4-bit base)", "fine-tuned, merged NF4"):
        row = table[name]
        assert row[CE_MICRO_F1] > constant, f"{name}: CE micro-F1 {row[CE_MICRO_F1]:.3f} vs constant {constant:.3f}"
        assert row[f"{CE_MICRO_F1}_ci_low"] <= row[CE_MICRO_F1] <= row[f"{CE_MICRO_F1}_ci_high"]
        assert set(row[CE_CLASSES]) == set(findings.CLASSES)
    final = smoke_run["metrics"]["06_eval_and_demo"]
    assert final["ce_statement"].startswith("The fine-tuned model (")
    assert "the final model) names the findings better than the constant report: CE micro-F1 " in final["ce_statement"]
    assert "paired-bootstrap interval of the difference" in final["ce_statement"]
    summary = (smoke_run["dir"] / "summary.md").read_text()
    assert final["ce_statement"] in summary and "CE micro-F1" in summary.splitlines()[
        next(i for i, line in enumerate(summary.splitlines()) if line.startswith("| system |"))]
    # The fine-tuned model did not collapse onto one report and names findings (the constant never does).
    collapse = final["collapse"]["systems"]
    assert collapse["constant (most frequent report)"]["abnormal_share"] == 0.0
    assert collapse["fine-tuned, merged NF4"]["abnormal_share"] > 0.0
    assert collapse["fine-tuned, merged NF4"]["distinct_share"] > collapse["constant (most frequent report)"][
        "distinct_share"]


@pytest.mark.slow
def test_smoke_run_records_ce_in_every_stage(smoke_run: dict) -> None:
    m = smoke_run["metrics"]
    agreement = m["01_data"]["labeler_agreement"]
    assert agreement["half"] == "odd" and agreement["micro"]["f1"] >= 0.92 and "confusions" not in agreement
    prevalence = m["01_data"]["train_findings_prevalence"]
    assert prevalence["n_reports"] > 0 and prevalence["classes"]["Cardiomegaly"]["positive"] > 0
    assert 0 < prevalence["abnormal_share"] < 1
    baseline = m["02_baseline"]
    assert all(CE_MICRO_F1 in row and f"{CE_MICRO_F1}_ci_high" in row for row in baseline["test_table"].values())
    assert set(baseline["collapse"]["systems"]) == set(baseline["test_table"])
    epochs = m["03_qlora_train"]["epochs"]
    assert all(e["val_ce_micro_f1"] is not None for e in epochs)
    assert m["03_qlora_train"]["best_val_ce_micro_f1"] == max(e["val_ce_micro_f1"] for e in epochs)
    assert m["03_qlora_train"]["best_model_metric"] == CE_MICRO_F1  # the smoke profile keeps the best-CE epoch
    pretraining = m["03_qlora_train"]["tiny_pretraining"]
    assert pretraining["epochs"] == smoke_run["config"].tiny_pretrain_epochs and pretraining["texts"] > 3000
    assert pretraining["epoch_losses"][-1] < pretraining["epoch_losses"][0]
    assert all(t["val_ce_micro_f1"] is not None for t in m["04_sweep"]["trials"])
    assert all(CE_MICRO_F1 in delta for delta in m["05_merge_requant"]["deltas"].values())


# ------------------------------------------------------------------------------------ decoder pretraining
PRETRAIN_TEXTS = ["Heart size is normal. The lungs are clear.", "Mild cardiomegaly. Small left pleural effusion.",
                  "No acute cardiopulmonary abnormality.", "Right upper lobe opacity, possible pneumonia.",
                  "Low lung volumes with bibasilar atelectasis.", "The trachea is midline. No pneumothorax."] * 6


def tiny_blip(seed: int = 0):
    import torch
    from transformers import BlipForConditionalGeneration

    from medcap_helpers.model import tiny_blip_config
    from medcap_helpers.processing import build_offline_processor

    processor = build_offline_processor(PRETRAIN_TEXTS, image_size=64)
    tokenizer = processor.tokenizer
    config = tiny_blip_config(len(tokenizer), 64, 0.1, bos_token_id=tokenizer.bos_token_id,
                              pad_token_id=tokenizer.pad_token_id, sep_token_id=tokenizer.sep_token_id)
    torch.manual_seed(seed)
    return BlipForConditionalGeneration(config), processor


def weights(model, part: str) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if part in n}


def test_decoder_pretraining_learns_reads_its_memory_and_is_deterministic() -> None:
    import torch

    from medcap_helpers.pretrain import pretrain_text_decoder

    model, processor = tiny_blip()
    vision, cross = weights(model, "vision_model"), weights(model, "crossattention")
    record = pretrain_text_decoder(model, processor.tokenizer, PRETRAIN_TEXTS, epochs=4, learning_rate=1e-2,
                                   memory_share=0.3, max_length=24, seed=5, batch_size=8)
    assert record["texts"] == len(PRETRAIN_TEXTS) and len(record["epoch_losses"]) == 4
    assert record["epoch_losses"][-1] < record["epoch_losses"][0] / 2  # it learns the language
    assert all(torch.equal(v, p) for (_, v), (_, p) in zip(vision.items(), weights(model, "vision_model").items()))
    assert any(not torch.equal(v, p) for (_, v), (_, p) in zip(cross.items(), weights(model, "crossattention").items()))
    again, _ = tiny_blip()
    assert pretrain_text_decoder(again, processor.tokenizer, PRETRAIN_TEXTS, epochs=4, learning_rate=1e-2,
                                 memory_share=0.3, max_length=24, seed=5, batch_size=8) == record
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    # Without memory the cross-attention is skipped: plain language modelling leaves it untouched.
    plain, _ = tiny_blip()
    cross = weights(plain, "crossattention")
    pretrain_text_decoder(plain, processor.tokenizer, PRETRAIN_TEXTS, epochs=1, memory_share=0.0, max_length=24)
    assert all(torch.equal(v, p) for (_, v), (_, p) in zip(cross.items(), weights(plain, "crossattention").items()))
    with pytest.raises(ValueError, match="No texts"):
        pretrain_text_decoder(plain, processor.tokenizer, ["", "  "], epochs=1)


def test_tiny_model_is_pretrained_on_training_side_text_only(tmp_path: Path) -> None:
    from medcap_helpers import data, model, sources

    config = MedcapConfig.from_profile("smoke", run_dir=str(tmp_path / "run"), smoke_num_reports=12,
                                       smoke_image_size=64, tiny_pretrain_epochs=1, max_target_tokens=16)
    dataset, _ = data.build_dataset(config, progress=False)
    model.load_model_and_processor(config, dataset)
    record = runs.read_json(tmp_path / "run" / "tiny_model" / pretrain.PRETRAINING_FILE)
    corpus = sources.tokenizer_training_texts(config, dataset)
    assert record["texts"] == len(corpus) > 3000 and record["epochs"] == 1 and record["max_length"] == 16
    # Never a validation or test report: the corpus is every bundled report but those (a held-out text can
    # still occur as another study's identical report, as normal templates do).
    held_out = Counter(t for name in ("validation", "test") for t in dataset[name]["text"])
    everything = Counter(sources.tokenizer_training_texts(config, {}))
    assert held_out and everything - held_out == Counter(corpus)
    assert record["memory_share"] == config.tiny_pretrain_memory_share
    # No pretraining asked: no record, as before.
    plain = config.replace(run_dir=str(tmp_path / "plain"), tiny_pretrain_epochs=0)
    model.load_model_and_processor(plain, dataset)
    assert not (tmp_path / "plain" / "tiny_model" / pretrain.PRETRAINING_FILE).exists()


@pytest.mark.parametrize("overrides, message", [
    ({"tiny_pretrain_epochs": -1}, "tiny_pretrain_epochs"),
    ({"tiny_pretrain_epochs": 1.5}, "tiny_pretrain_epochs"),
    ({"tiny_pretrain_learning_rate": 0}, "tiny_pretrain_learning_rate"),
    ({"tiny_pretrain_memory_share": 1.5}, "tiny_pretrain_memory_share"),
    ({"best_model_metric": "BLEU-4"}, "best_model_metric"),
])
def test_new_settings_are_validated(overrides: dict, message: str) -> None:
    from medcap_helpers.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        MedcapConfig.from_profile("smoke", **overrides)


def test_smoke_profile_settings_for_learning() -> None:
    smoke, full = MedcapConfig.from_profile("smoke"), MedcapConfig.from_profile("full")
    assert smoke.tiny_pretrain_epochs > 0 and smoke.best_model_metric == CE_MICRO_F1
    assert smoke.smoke_num_reports == 300 and smoke.num_train_epochs == 20
    assert full.best_model_metric == "CIDEr" and full.tiny_pretrain_epochs == 0


def test_best_epoch_follows_the_chosen_metric() -> None:
    from medcap_helpers.train import best_epoch_of

    history = [{"epoch": 1.0, "val_cider": 0.6, "val_scores": {"CIDEr": 0.6, CE_MICRO_F1: 0.3}},
               {"epoch": 2.0, "val_cider": 0.2, "val_scores": {"CIDEr": 0.2, CE_MICRO_F1: 0.5}},
               {"epoch": 3.0, "val_cider": 0.3, "val_scores": {"CIDEr": 0.3, CE_MICRO_F1: 0.5}}]
    assert best_epoch_of(history) == (1.0, 0.6)
    assert best_epoch_of(history, CE_MICRO_F1) == (2.0, 0.2)  # the first of equals, with its CIDEr


def test_the_final_merge_is_chosen_by_the_same_metric_as_the_epoch() -> None:
    from medcap_helpers.merge import FINAL_CANDIDATES, choose_final

    default = FINAL_CANDIDATES["merged-dequantized-nf4"]

    def compared(metric: str, low: float) -> dict:
        return {"system": FINAL_CANDIDATES["merged-nf4"], "baseline": default, "metric": metric,
                "point": low + 0.05, "low": low, "high": low + 0.1}

    adapter = {"system": FINAL_CANDIDATES["adapter"], "baseline": default, "point": 0.0, "low": -0.1, "high": 0.1}
    differences = [compared("CIDEr", -0.05), compared(CE_MICRO_F1, 0.02),
                   dict(adapter, metric="CIDEr"), dict(adapter, metric=CE_MICRO_F1)]
    assert choose_final(differences) == "merged-dequantized-nf4"
    assert choose_final(differences, CE_MICRO_F1) == "merged-nf4"


def test_the_sweep_chooses_by_the_same_metric() -> None:
    from medcap_helpers.sweep import choose_trial

    trials = [{"lora_r": 4, "lora_alpha": 16, "val_cider": 0.5, "val_ce_micro_f1": 0.3, "feasible": None},
              {"lora_r": 16, "lora_alpha": 64, "val_cider": 0.4, "val_ce_micro_f1": 0.45, "feasible": None}]
    assert choose_trial(trials)["lora_r"] == 4
    assert choose_trial(trials, CE_MICRO_F1)["lora_r"] == 16
    assert choose_trial([{k: v for k, v in t.items() if k != "val_ce_micro_f1"} for t in trials],
                        CE_MICRO_F1)["lora_r"] == 4  # no CE recorded: ranked by CIDEr
