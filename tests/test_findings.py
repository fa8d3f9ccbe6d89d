"""The rule-based findings labeler, the MeSH mapping, agreement arithmetic and the IU X-Ray validation."""

from __future__ import annotations

import pytest

from medcap_helpers.findings import (
    ABSENT,
    CLASSES,
    MESH_TO_CLASS,
    NEGATIVE,
    POSITIVE,
    UNCERTAIN,
    abnormal_share,
    agreement,
    agreement_markdown,
    agreement_summary,
    clinical_efficacy,
    distinct_share,
    example_counts,
    label_report,
    mesh_labels,
    micro_f1,
    names_abnormal,
    positive_classes,
    prevalence,
    prevalence_markdown,
    validate_against_mesh,
)
from medcap_helpers.reports import bundled_reports, xrv_reports_archive


def labels(text: str, *classes: str) -> tuple[str, ...]:
    result = label_report(text)
    return tuple(result[c] for c in classes)


def test_classes_in_chexpert_order() -> None:
    assert len(CLASSES) == 14 and CLASSES[0] == "No Finding" and CLASSES[-1] == "Support Devices"
    assert set(label_report("")) == set(CLASSES)


@pytest.mark.parametrize("text, cls, expected", [
    ("No pleural effusion or pneumothorax.", "Pleural Effusion", NEGATIVE),
    ("No pleural effusion or pneumothorax.", "Pneumothorax", NEGATIVE),
    ("No focal consolidation, effusion or pneumothorax.", "Consolidation", NEGATIVE),
    ("No focal consolidation, effusion or pneumothorax.", "Pleural Effusion", NEGATIVE),
    ("No focal consolidation, effusion or pneumothorax.", "Pneumothorax", NEGATIVE),
    ("Without evidence of pneumothorax.", "Pneumothorax", NEGATIVE),
    ("The previously seen left effusion has resolved.", "Pleural Effusion", NEGATIVE),
    ("Interval resolution of the right pleural effusion.", "Pleural Effusion", NEGATIVE),
    ("Clear lungs.", "Lung Opacity", NEGATIVE),
    ("Heart size is normal.", "Cardiomegaly", NEGATIVE),
    ("The heart is not enlarged.", "Cardiomegaly", NEGATIVE),
    ("Normal heart size and mediastinal contours.", "Cardiomegaly", NEGATIVE),
    ("No displaced rib fractures.", "Fracture", NEGATIVE),
    ("There is no focal opacity to suggest pneumonia.", "Pneumonia", NEGATIVE),
])
def test_negation(text: str, cls: str, expected: str) -> None:
    assert label_report(text)[cls] == expected


def test_negation_scope_ends_at_but_however_and_sentence_end() -> None:
    text = "No pneumothorax, but there is a small left pleural effusion."
    assert labels(text, "Pneumothorax", "Pleural Effusion") == (NEGATIVE, POSITIVE)
    assert labels("No pneumothorax; however, mild cardiomegaly is present.", "Pneumothorax",
                  "Cardiomegaly") == (NEGATIVE, POSITIVE)
    assert labels("No pneumothorax. Small right effusion.", "Pneumothorax",
                  "Pleural Effusion") == (NEGATIVE, POSITIVE)
    assert labels("Lungs are clear, the heart is enlarged.", "Cardiomegaly") == (POSITIVE,)


@pytest.mark.parametrize("text, cls", [
    ("Left basilar opacity may represent atelectasis.", "Atelectasis"),
    ("Cannot exclude pneumonia.", "Pneumonia"),
    ("Early pneumonia cannot be excluded.", "Pneumonia"),
    ("Possible small left effusion.", "Pleural Effusion"),
    ("Findings are concerning for pneumonia.", "Pneumonia"),
    ("Question of a small right pneumothorax.", "Pneumothorax"),
])
def test_uncertainty(text: str, cls: str) -> None:
    assert label_report(text)[cls] == UNCERTAIN


@pytest.mark.parametrize("text, cls", [
    ("The heart is enlarged.", "Cardiomegaly"),
    ("Cardiomegaly.", "Cardiomegaly"),
    ("Heart size is mildly enlarged.", "Cardiomegaly"),
    ("Right IJ catheter tip in the SVC.", "Support Devices"),
    ("Left chest wall pacemaker with leads in the right ventricle.", "Support Devices"),
    ("Old healed rib fracture.", "Fracture"),
    ("Calcified granuloma in the right upper lobe.", "Lung Lesion"),
    ("Pulmonary vascular congestion.", "Edema"),
    ("Patchy left basilar airspace disease.", "Lung Opacity"),
    ("Left basilar opacity, likely atelectasis.", "Atelectasis"),  # probable existence counts as present
    ("Mild bilateral apical pleural thickening.", "Pleural Other"),
])
def test_positive(text: str, cls: str) -> None:
    assert label_report(text)[cls] == POSITIVE


def test_pseudo_negation_and_hypothetical() -> None:
    assert label_report("No change in the calcified left lower lobe nodule.")["Lung Lesion"] == POSITIVE
    assert label_report("Recommend CT to evaluate for a pulmonary nodule.")["Lung Lesion"] == ABSENT
    assert label_report("Lungs are clear.")["Pneumothorax"] == ABSENT


def test_no_finding_logic() -> None:
    normal = "The lungs are clear. Heart size is normal. No pleural effusion or pneumothorax."
    assert label_report(normal)["No Finding"] == POSITIVE
    assert label_report("").get("No Finding") == POSITIVE
    assert label_report(normal + " Left-sided pacemaker.")["No Finding"] == POSITIVE  # devices don't count
    assert label_report(normal + " Mild cardiomegaly.")["No Finding"] == NEGATIVE
    assert label_report("Possible small effusion.")["No Finding"] == NEGATIVE  # uncertain counts as finding
    assert positive_classes(normal) == frozenset({"No Finding"})
    assert positive_classes("Possible small effusion.") == frozenset()
    assert positive_classes("Possible small effusion.", uncertain_as_positive=True) == {"Pleural Effusion"}


def test_mesh_mapping() -> None:
    assert mesh_labels(["Cardiomegaly/mild"]) == {"Cardiomegaly"}
    assert mesh_labels(["normal"]) == {"No Finding"}
    assert mesh_labels(["Calcified Granuloma/lung/hilum/right"]) == {"Lung Lesion"}
    assert mesh_labels(["Spine/degenerative"]) == frozenset()
    assert mesh_labels(["Lung/hypoinflation", "Aorta/tortuous"]) == frozenset()
    assert mesh_labels(["Pulmonary Atelectasis/base/left", "Opacity/lung/base/left/patchy"]) == {
        "Atelectasis", "Lung Opacity"}
    assert mesh_labels(["Catheters, Indwelling", "Fractures, Bone/ribs/left"]) == {"Support Devices", "Fracture"}
    assert mesh_labels(["Thickening/pleura/apex"]) == {"Pleural Other"}
    assert mesh_labels(["Thickening/bronchi"]) == frozenset()  # the qualified key decides
    assert mesh_labels(["PLEURAL EFFUSION/left"]) == {"Pleural Effusion"}
    # CheXpert convention for the reference: no class but Support Devices -> No Finding.
    assert mesh_labels(["Spine/degenerative", "Catheters, Indwelling"], chexpert_no_finding=True) == {
        "No Finding", "Support Devices"}
    assert mesh_labels(["Cardiomegaly"], chexpert_no_finding=True) == {"Cardiomegaly"}
    assert all(c in CLASSES for classes in MESH_TO_CLASS.values() for c in classes)


def test_agreement_arithmetic() -> None:
    a, c = "Atelectasis", "Cardiomegaly"
    predicted = [frozenset({a}), frozenset({a, c}), frozenset(), frozenset({c})]
    reference = [frozenset({a}), frozenset({a}), frozenset({a}), frozenset({c})]
    result = agreement(predicted, reference, min_support=2)
    atel, cardio = result["classes"][a], result["classes"][c]
    assert (atel["support"], atel["tp"], atel["fp"], atel["fn"]) == (3, 2, 0, 1)
    assert atel["precision"] == 1.0 and atel["recall"] == pytest.approx(2 / 3) and atel["f1"] == pytest.approx(0.8)
    assert (cardio["support"], cardio["tp"], cardio["fp"], cardio["fn"]) == (1, 1, 1, 0)
    assert cardio["precision"] == 0.5 and cardio["recall"] == 1.0 and not cardio["included"]
    assert result["included"] == [a]
    assert result["micro"]["f1"] == pytest.approx(0.8) and result["macro"]["f1"] == pytest.approx(0.8)
    both = agreement(predicted, reference, min_support=1)
    assert both["included"] == [c, a]  # CLASSES order
    assert both["micro"]["precision"] == pytest.approx(3 / 4) and both["micro"]["recall"] == pytest.approx(3 / 4)
    assert both["macro"]["f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    with pytest.raises(ValueError):
        agreement(predicted, reference[:2])
    assert "| Atelectasis | 3 | 1.000 | 0.667 | 0.800 | yes |" in agreement_markdown(result)


def test_clinical_efficacy_and_collapse_signals() -> None:
    texts = ["Mild cardiomegaly. No effusion.", "Lungs are clear. Normal heart size.", "Small left pleural effusion."]
    same = clinical_efficacy(texts, texts)
    assert same["micro_f1"] == 1.0 and same["macro_f1"] == 1.0
    disjoint = clinical_efficacy(["Large right pneumothorax."] * 2, ["Mild cardiomegaly.", "Small effusion."])
    assert disjoint["micro_f1"] == 0.0
    assert set(disjoint["included"]) == {"Cardiomegaly", "Pleural Effusion"}
    assert abnormal_share(texts) == pytest.approx(2 / 3) and abnormal_share([]) == 0.0
    assert distinct_share(["No acute disease.", "no acute  disease.", "Cardiomegaly."]) == pytest.approx(2 / 3)


def test_odd_half_meets_goal() -> None:
    try:
        xrv_reports_archive()
    except FileNotFoundError as err:
        pytest.skip(f"torchxrayvision's report archive is absent: {err}")
    result = validate_against_mesh(bundled_reports().reports, half="odd")
    assert result["n_reports"] > 1800
    assert result["micro"]["f1"] >= 0.92 and result["macro"]["f1"] >= 0.85
    assert {"No Finding", "Cardiomegaly", "Support Devices"} <= set(result["included"])


def test_ce_micro_counts_every_class_and_per_example_counts_sum_to_it() -> None:
    predictions = ["Large right pneumothorax. Mild cardiomegaly.", "The lungs are clear."]
    references = ["Mild cardiomegaly.", "Small left pleural effusion."]
    ce = clinical_efficacy(predictions, references)
    # The pneumothorax no reference names is a false positive of micro (all 14 classes) but not averaged
    # in macro (only classes with a reference positive).
    assert (ce["tp"], ce["fp"], ce["fn"]) == (1, 2, 1)
    assert ce["micro_f1"] == pytest.approx(2 / (2 + 2 + 1))
    assert "Pneumothorax" not in ce["included"] and ce["classes"]["Pneumothorax"]["fp"] == 1
    counts = example_counts(predictions, references)
    assert counts == [(1, 1, 0), (0, 1, 1)]
    assert tuple(map(sum, zip(*counts))) == (ce["tp"], ce["fp"], ce["fn"])
    assert micro_f1(*map(sum, zip(*counts))) == ce["micro_f1"] and micro_f1(0, 0, 0) == 0.0
    with pytest.raises(ValueError):
        example_counts(predictions, references[:1])


def test_prevalence_and_abnormal_reports() -> None:
    texts = ["Mild cardiomegaly. Small left pleural effusion.", "The lungs are clear.", "Cardiomegaly.",
             "Left-sided pacemaker. The lungs are clear."]
    result = prevalence(texts)
    assert result["n_reports"] == 4 and result["classes"]["Cardiomegaly"] == {"positive": 2, "share": 0.5}
    assert result["classes"]["No Finding"]["positive"] == 2 and result["classes"]["Support Devices"]["positive"] == 1
    assert result["abnormal_share"] == 0.5  # a device is not an abnormal finding
    assert [names_abnormal(t) for t in texts] == [True, False, True, False]
    table = prevalence_markdown(result)
    assert "| Cardiomegaly | 2 | 50.0% |" in table and "Pneumothorax" not in table
    assert "| *any abnormal finding* | | 50.0% |" in table
    assert prevalence([])["n_reports"] == 0


def test_agreement_summary_keeps_the_numbers_not_the_examples() -> None:
    predicted = [frozenset({"Cardiomegaly"}), frozenset()]
    reference = [frozenset({"Cardiomegaly"}), frozenset({"Cardiomegaly"})]
    result = agreement(predicted, reference, min_support=1)
    result.update(half="odd", confusions={"Cardiomegaly": {"fp_examples": ["long text"]}})
    summary = agreement_summary(result)
    assert "confusions" not in summary and summary["half"] == "odd"
    assert summary["classes"]["Cardiomegaly"] == {"support": 2, "precision": 1.0, "recall": 0.5,
                                                  "f1": pytest.approx(2 / 3), "included": True}
