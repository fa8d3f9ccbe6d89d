"""What a run's numbers mean, in words written from the numbers: the notebooks' interpretation cells.

Every function returns markdown that starts with :data:`READING`, so a reader (and the notebook hygiene
test) can tell an interpretation from a table. The text is computed from the run's own results, so it
stays true for the smoke run and the full run alike: what a number means, whether a difference is
inside the noise (paired bootstrap intervals of differences, :func:`medcap_helpers.metrics.paired_difference_ci`),
and what to conclude. Also here: readable descriptions of the QLoRA settings a model was built with.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medcap_helpers import findings
from medcap_helpers.metrics import CE_MICRO_F1

READING = "**Reading the result.**"
"""How every interpretation starts."""
BLIP_LARGE_TRAINABLE_SHARE = 0.0037
"""Trainable share of BLIP-large with the default LoRA settings (README, benchmarks/results/training.json)."""


def _reading(*sentences: str) -> str:
    return " ".join([READING, *(s for s in sentences if s)])


def _pct(share: float) -> str:
    return f"{100 * share:.1f}%"


def _interval(difference: Mapping[str, Any]) -> str:
    return f"{difference['point']:+.3f} [{difference['low']:+.3f}, {difference['high']:+.3f}]"


def established(difference: Mapping[str, Any]) -> bool:
    """Whether a paired difference's interval excludes 0 (the test set establishes the difference)."""
    return difference["low"] > 0 or difference["high"] < 0


def verdict(difference: Mapping[str, Any]) -> str:
    """"better", "worse" or "inside the noise", from a paired difference's interval."""
    if difference["low"] > 0:
        return "better"
    if difference["high"] < 0:
        return "worse"
    return "inside the noise"


def differences_markdown(differences: Sequence[Mapping[str, Any]]) -> str:
    """Paired differences as a table: system, against, metric, difference with its 95% interval, verdict."""
    lines = ["| system | against | metric | difference [95% paired interval] | verdict |", "|---|---|---|---:|---|"]
    lines += [f"| {d['system']} | {d['baseline']} | {d['metric']} | {_interval(d)} | {verdict(d)} |"
              for d in differences]
    return "\n".join(lines)


def _find(differences: Sequence[Mapping[str, Any]], system: str, baseline: str, metric: str) -> Mapping[str, Any] | None:
    return next((d for d in differences if d["system"] == system and d["baseline"] == baseline
                 and d["metric"] == metric), None)


def difference_sentence(difference: Mapping[str, Any]) -> str:
    """One sentence on one paired difference: the number, its interval, and whether it is established."""
    what = (f"{difference['system']} against {difference['baseline']}: {difference['metric']} "
            f"{_interval(difference)}")
    if difference["low"] == difference["high"] == 0:
        return f"{what}: the two score the same on every resample (they name the same findings, or none)."
    if established(difference):
        return f"{what}, an interval that excludes 0: a real {'gain' if difference['low'] > 0 else 'loss'}."
    return f"{what}, an interval that includes 0: this split cannot tell the two apart."


# ----------------------------------------------------------------------------------------------- 01
def dataset_splits(split_sizes: Mapping[str, Mapping[str, int]], is_smoke_sample: bool) -> str:
    """What the split sizes mean for every later comparison."""
    test, validation = split_sizes["test"]["studies"], split_sizes["validation"]["studies"]
    return _reading(
        f"Every test score later is an average over {test:,} studies, every model choice (epoch, sweep trial, "
        f"merge) a comparison over {validation:,} validation studies: one validation study moves a mean by "
        f"1/{validation} of its range.",
        "So each comparison below comes with a bootstrap interval over studies, and choices whose differences "
        "sit inside that interval are said to be made on noise.",
        "The smoke sample's placeholder images make its numbers a pipeline check, not a quality measure."
        if is_smoke_sample else "")


def report_lengths(token_lengths: Sequence[int], max_target_tokens: int, max_new_tokens: int) -> str:
    """Report length in tokens against the training cut (``max_target_tokens``) and the generation cap."""
    tokens = np.asarray(token_lengths, dtype=float)
    if tokens.size == 0:
        return _reading("There are no training reports to measure.")
    median, p95 = float(np.median(tokens)), float(np.percentile(tokens, 95))
    cut = float((tokens > max_target_tokens).mean())
    capped = float((tokens > max_new_tokens).mean())
    training = (f"{_pct(cut)} of the training reports are longer than `max_target_tokens` = {max_target_tokens} "
                "and lose their ends in training (the model never learns how they finish)" if cut else
                f"no training report is longer than `max_target_tokens` = {max_target_tokens}, so none is cut")
    generation = (f"{_pct(capped)} are longer than `max_new_tokens` = {max_new_tokens}, so generated reports are "
                  "capped below the references' length, which BLEU's brevity penalty and CIDEr-D's length penalty "
                  "charge" if capped else f"`max_new_tokens` = {max_new_tokens} leaves room for every report")
    return _reading(f"The median report has {median:.0f} tokens and the 95th percentile {p95:.1f}.",
                    f"{training[0].upper()}{training[1:]}; {generation}.")


def template_sentences(top: Sequence[tuple[str, int, float]]) -> str:
    """How dominant the normal template is, from the most frequent sentences
    (:func:`medcap_helpers.data.top_sentences`: sentence, reports containing it, share)."""
    if not top:
        return _reading("No sentences to count.")
    sentence, _, share = top[0]
    normal = [s for s, _, _ in top if not findings.positive_classes(s) - {"No Finding"}]
    return _reading(
        f"The most frequent sentence, \"{sentence}\", is in {_pct(share)} of all reports, and "
        f"{len(normal)} of the top {len(top)} sentences name no abnormal finding.",
        "A report stitched from them matches the n-grams of most normal studies, so n-gram metrics reward "
        "the template; clinical efficacy (CE), which asks for the findings, does not.")


def labeler_agreement(agreement: Mapping[str, Any]) -> str:
    """How far the CE labeler can be trusted, from its agreement with the MeSH labels."""
    weak = [c for c, row in agreement["classes"].items() if row.get("included") and row["f1"] < 0.9]
    left_out = [c for c, row in agreement["classes"].items() if not row.get("included")]
    return _reading(
        f"On {agreement['n_reports']:,} held-out reports the labeler agrees with the human MeSH labels at micro-F1 "
        f"{agreement['micro']['f1']:.3f} (macro {agreement['macro']['f1']:.3f}) over the "
        f"{len(agreement['included'])} findings with at least {agreement['min_support']} examples.",
        f"Weaker findings: {', '.join(weak)}." if weak else "Every finding in the average agrees at F1 ≥ 0.9.",
        f"Too rare to judge, and left out of the average: {', '.join(left_out)}." if left_out else "",
        "CE scores inherit this error, so CE differences much smaller than the labeler's own error rate mean little.")


def finding_prevalence(prevalence: Mapping[str, Any]) -> str:
    """What the training reports give a model to learn, finding by finding."""
    classes = {c: row for c, row in prevalence["classes"].items() if c != "No Finding"}
    ranked = sorted(classes.items(), key=lambda item: -item[1]["share"])
    rare = [c for c, row in ranked if 0 < row["positive"] < 10]
    absent = [c for c, row in ranked if row["positive"] == 0]
    common = ", ".join(f"{c} ({_pct(row['share'])})" for c, row in ranked[:3] if row["positive"])
    return _reading(
        f"Of {prevalence['n_reports']:,} training reports, {_pct(prevalence.get('abnormal_share', 0.0))} name an "
        f"abnormal finding; the commonest are {common}." if common else "No training report names a finding.",
        f"{len(rare)} findings appear fewer than 10 times ({', '.join(rare)}): too few to learn, so expect CE "
        "macro-F1, which weighs each finding equally, to stay far below micro-F1." if rare else "",
        f"Never named here: {', '.join(absent)}." if absent else "")


def sample_images(is_smoke_sample: bool, n_images: int) -> str:
    """What the image grid is (and is not)."""
    if is_smoke_sample:
        return _reading(f"These {n_images} pictures are the smoke sample's placeholders, drawn from each report's "
                        "text: a model can learn them, but they say nothing about real radiographs.")
    return _reading(f"These are the first {n_images} training images, not picked: frontal and lateral views "
                    "vary in exposure and framing, which the model has to absorb.")


# ----------------------------------------------------------------------------------------------- 02, 06
def _row_metric(table: Mapping[str, Mapping[str, Any]], metric: str) -> str:
    """The name of the row with the highest ``metric``."""
    return max(table, key=lambda name: table[name].get(metric, float("-inf")))


def baselines(table: Mapping[str, Mapping[str, Any]], differences: Sequence[Mapping[str, Any]],
              constant: str) -> str:
    """02's baselines: who wins which metric, and whether any beats the constant report beyond noise."""
    best_cider, best_ce = _row_metric(table, "CIDEr"), _row_metric(table, CE_MICRO_F1)
    sentences = [(f"The highest CIDEr is the {best_cider}'s ({table[best_cider]['CIDEr']:.3f}), the highest CE "
                  f"micro-F1 the {best_ce}'s ({table[best_ce][CE_MICRO_F1]:.3f}).")]
    if best_cider == constant:
        sentences.append("A report that is the same for every image tops CIDEr because CIDEr-D's tf-idf comes from "
                         "the test references, and the normal template's sentences are in most of them: matching "
                         "the majority is rewarded, naming a finding is not. That is why CE sits beside it.")
    against = [d for d in differences if d["baseline"] == constant]
    real = [f"{d['system']} on {d['metric']} ({verdict(d)}, {_interval(d)})" for d in against if established(d)]
    noise = [f"{d['system']} on {d['metric']}" for d in against if not established(d)]
    if real:
        sentences.append("Against the constant report the paired intervals establish: " + "; ".join(real) + ".")
    if noise:
        sentences.append("Inside the noise (interval includes 0): " + ", ".join(noise) + ".")
    sentences.append("A fine-tuned model has to beat the constant report with an interval of the difference above "
                     "0, on CE at least, before it has learned more than the template.")
    return _reading(*sentences)


def collapse(signals: Mapping[str, Any]) -> str:
    """The collapse table in words: which systems write one report for everything."""
    reference = signals["reference_abnormal_share"]
    rows = signals["systems"]
    collapsed = [name for name, row in rows.items() if row["distinct_share"] < 0.25]
    silent = [name for name, row in rows.items() if row["abnormal_share"] < reference / 2]
    closest = min(rows, key=lambda name: abs(rows[name]["abnormal_share"] - reference))
    return _reading(
        f"The references name an abnormal finding in {_pct(reference)} of studies.",
        f"Mostly one report for every image (under 25% distinct): {', '.join(collapsed)}." if collapsed else
        "No system writes one report for everything.",
        f"Naming findings less than half as often as the references: {', '.join(silent)}: such a system can score "
        "well on n-grams while missing most findings." if silent else "",
        f"Closest to the references' share: {closest} ({_pct(rows[closest]['abnormal_share'])}).")


def examples(columns: Mapping[str, Sequence[str]]) -> str:
    """The side-by-side examples in words: the first images of the split, not picked."""
    references = columns.get("reference", [])
    n = len(references)
    parts = []
    for name, reports in columns.items():
        if name == "reference":
            continue
        named = sum(findings.names_abnormal(r) for r in reports)
        parts.append(f"{name}: {len(set(reports))} distinct, {named} naming a finding")
    reference_named = sum(findings.names_abnormal(r) for r in references)
    return _reading(f"These are the first {n} images of the split, not chosen to flatter anyone. "
                    f"Of their {n} reference reports {reference_named} name a finding; " + "; ".join(parts) + ".",
                    "A handful of examples shows the style of each system; the tables above, over all studies, "
                    "measure it.")


def _verdicts(differences: Sequence[Mapping[str, Any]], label: str) -> list[str]:
    """Two sentences: which of ``differences`` the paired intervals establish, which are inside the noise."""
    real = [f"{d['metric']} {_interval(d)} ({verdict(d)})" for d in differences if established(d)]
    noise = [f"{d['metric']} {_interval(d)}" for d in differences if not established(d)]
    return ([f"{label}, established: " + "; ".join(real) + "."] if real else []) + \
        ([f"{label}, inside the noise (interval includes 0): " + "; ".join(noise) + "."] if noise else [])


def final_results(table: Mapping[str, Mapping[str, Any]], differences: Sequence[Mapping[str, Any]],
                  final_system: str, constant: str, metric: str) -> str:
    """06's verdict: the final model against the constant report and against the other fine-tuned row, with
    paired intervals, and whether the test split confirms 05's validation choice."""
    sentences = [f"The final model is the row \"{final_system}\", chosen in 05 on validation {metric}."]
    sentences += _verdicts([d for d in differences if d["system"] == final_system and d["baseline"] == constant],
                           "Against the constant report")
    between = [d for d in differences if d["baseline"] != constant and final_system in (d["system"], d["baseline"])]
    if between:
        other = next(d["baseline"] if d["system"] == final_system else d["system"] for d in between)
        sentences += _verdicts(between, f"Against \"{other}\"")
        on_metric = next((d for d in between if d["metric"] == metric), None)
        if on_metric is not None:
            final_better = on_metric["low"] > 0 if on_metric["system"] == final_system else on_metric["high"] < 0
            if not established(on_metric):
                sentences.append(f"On {metric} the test split does not separate the two fine-tuned rows: whichever "
                                 "05 preferred, the choice between them was made on noise.")
            elif final_better:
                sentences.append(f"The test split confirms 05's choice on {metric}.")
            else:
                sentences.append(f"The test split reverses 05's choice on {metric}: the validation difference "
                                 "was noise, a lesson in selecting on small validation sets.")
    below = [name for name, row in table.items()
             if name != constant and "CIDEr" in row and row["CIDEr"] < table.get(constant, {}).get("CIDEr", 0.0)]
    if below:
        sentences.append(f"Below the constant report on CIDEr: {', '.join(below)}. On this metric writing the "
                         "template is hard to beat, which is why CE decides whether a model learned findings.")
    return _reading(*sentences)


def published_position(table: Mapping[str, Mapping[str, Any]], published: Mapping[str, Any],
                       same_protocol: bool) -> str:
    """Where the run's best row sits beside published results, and whether the comparison is fair."""
    ours = max(table, key=lambda name: table[name].get("BLEU-4", float("-inf")))
    best_published = max(published["systems"], key=lambda s: s.get("BLEU-4") or 0.0)
    return _reading(
        f"This run's best BLEU-4 is the {ours}'s ({table[ours].get('BLEU-4', 0.0):.3f}); the best published one "
        f"listed is {best_published['system']}'s ({best_published['BLEU-4']:.3f}).",
        "Both follow the same protocol, so the gap is real, within the test set's noise." if same_protocol else
        "The protocols differ (split, views or target), so the gap says nothing about which method is better.")


# ----------------------------------------------------------------------------------------------- 03
def quantization_markdown(model: Any) -> str:
    """The ``BitsAndBytesConfig`` a model was actually loaded with, one line per setting (or why there is none)."""
    base = model
    while hasattr(base, "get_base_model") and base is not base.get_base_model():
        base = base.get_base_model()
    config = getattr(getattr(base, "config", None), "quantization_config", None)
    if config is None:
        return "The base model is not quantized: it is held in 16 or 32 bits (`load_in_4bit=False`)."
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    meanings = [("load_in_4bit", "every linear layer's weights stored in 4 bits"),
                ("bnb_4bit_quant_type", "the 16 levels (NF4: placed at a normal distribution's quantiles)"),
                ("bnb_4bit_use_double_quant", "the per-block absmax constants quantized to 8 bits too"),
                ("bnb_4bit_compute_dtype", "the dtype each weight is dequantized to for its matmul"),
                ("llm_int8_skip_modules", "modules left unquantized")]
    lines = ["The `BitsAndBytesConfig` this model was loaded with:", ""]
    lines += [f"- `{key}` = `{values[key]}`: {meaning}" for key, meaning in meanings if key in values]
    return "\n".join(lines)


_LAYER_INDEX = re.compile(r"\.\d+\.")


def lora_layers(model: Any) -> list[dict[str, Any]]:
    """The layers LoRA adapted, grouped by name with the layer index as ``N``: count and A/B shapes."""
    groups: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None or not hasattr(lora_a, "keys") or not list(lora_a.keys()):
            continue
        adapter = next(iter(lora_a.keys()))
        a_shape = tuple(module.lora_A[adapter].weight.shape)
        b_shape = tuple(module.lora_B[adapter].weight.shape)
        key = _LAYER_INDEX.sub(".N.", name.removeprefix("base_model.model."))
        group = groups.setdefault(key, {"module": key, "count": 0, "A": a_shape, "B": b_shape})
        group["count"] += 1
    return list(groups.values())


def lora_markdown(model: Any) -> str:
    """The ``LoraConfig`` in use and the layers it matched (A is r × d_in, B is d_out × r)."""
    config = next(iter(model.peft_config.values()))
    layers = lora_layers(model)
    lines = [(f"`LoraConfig`: r = {config.r}, lora_alpha = {config.lora_alpha} (updates scaled by α/r = "
              f"{config.lora_alpha / config.r:g}), dropout = {config.lora_dropout}, bias = `{config.bias}`, "
              f"target_modules = `{config.target_modules}`."), "",
             f"It matched {sum(g['count'] for g in layers)} linear layers (N = layer index):", "",
             "| layer | how many | A (r × d_in) | B (d_out × r) |", "|---|---:|---|---|"]
    lines += [f"| `{g['module']}` | {g['count']} | {g['A'][0]} × {g['A'][1]} | {g['B'][0]} × {g['B'][1]} |"
              for g in layers]
    return "\n".join(lines)


def trainable_share(model: Any, trainable: int, total: int) -> str:
    """Why the trainable share is what it is: LoRA's r·(d_in + d_out) against a layer's d_in·d_out."""
    share = trainable / total if total else 0.0
    layers = lora_layers(model)
    if not layers:
        return _reading(f"{trainable:,} of {total:,} parameters ({_pct(share)}) are trainable; no LoRA layer found.")
    widest = max(layers, key=lambda g: g["A"][1] * g["B"][0])
    r, d_in, d_out = widest["A"][0], widest["A"][1], widest["B"][0]
    return _reading(
        f"{trainable:,} of {total:,} parameters are trainable: {100 * share:.3f}%.",
        f"A LoRA pair adds r·(d_in + d_out) parameters to a layer of d_in·d_out: on this model's widest adapted "
        f"layer ({d_in} → {d_out}, r = {r}) that is {_pct(r * (d_in + d_out) / (d_in * d_out))} of the layer.",
        "The share shrinks as layers widen, and the embeddings and the vision tower add frozen parameters only: "
        f"BLIP-large with the default settings trains {100 * BLIP_LARGE_TRAINABLE_SHARE:.2f}% (README benchmark)."
        if share > 2 * BLIP_LARGE_TRAINABLE_SHARE else
        "That is QLoRA's point: the optimizer state and the gradients cover this share only.")


def memory(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    """Memory before and after loading, as a sentence (GB = 10⁹ bytes)."""
    def describe(snapshot: Mapping[str, Any]) -> str:
        parts = [f"{key.replace('_gb', '').replace('_', ' ')} {value:.2f} GB"
                 for key, value in snapshot.items() if isinstance(value, (int, float))]
        return ", ".join(parts) or "not measured"
    return f"Memory before loading the model: {describe(before)}; after: {describe(after)}."


def _selection_scores(history: Sequence[Mapping[str, Any]], metric: str) -> list[float]:
    return [float(epoch["val_scores"][metric]) for epoch in history]


def epoch_noise(history: Sequence[Mapping[str, Any]], metric: str) -> float:
    """How much the validation ``metric`` moves between consecutive epochs once learning has slowed (mean
    absolute change over the second half of training): a difference below it cannot be told from noise.
    0 with fewer than two epochs."""
    changes = np.abs(np.diff(_selection_scores(history, metric)))
    return float(np.mean(changes[len(changes) // 2:])) if changes.size else 0.0


def training_history(history: Sequence[Mapping[str, Any]], best_epoch: float, metric: str) -> str:
    """The training table and curves in words: losses, the chosen epoch, and whether it was chosen on noise."""
    if not history:
        return _reading("No epoch finished.")
    scores = _selection_scores(history, metric)
    epochs = [epoch["epoch"] for epoch in history]
    best_index = epochs.index(best_epoch) if best_epoch in epochs else int(np.argmax(scores))
    losses = [epoch.get("eval_loss") for epoch in history]
    sentences = []
    if all(loss is not None for loss in losses):
        lowest = int(np.argmin(losses))
        if lowest == len(losses) - 1:
            sentences.append("Validation loss was still falling at the last epoch: more epochs may help.")
        else:
            sentences.append(f"Validation loss was lowest at epoch {epochs[lowest]:g} and rose afterwards while "
                             "training loss kept falling: the model fits the training reports' wording ever more "
                             "closely (overfitting the loss), even where generated reports still change.")
    noise = epoch_noise(history, metric)
    runner_up = max((s for i, s in enumerate(scores) if i != best_index), default=scores[best_index])
    margin = scores[best_index] - runner_up
    tied = sum(abs(s - scores[best_index]) <= noise for s in scores) - 1
    sentences.append(f"The kept epoch, {best_epoch:g}, has the best validation {metric}, {scores[best_index]:.3f}, "
                     f"{margin:.3f} above the next best epoch.")
    if len(scores) > 1 and margin <= noise:
        sentences.append(f"The metric moves by {noise:.3f} between consecutive epochs on average, and {tied} other "
                         f"epoch(s) lie within that of the best: the choice of epoch is made on noise. Any of them "
                         "would do as well on new studies.")
    elif len(scores) > 1:
        sentences.append(f"That margin exceeds the metric's typical epoch-to-epoch change ({noise:.3f}), "
                         "so the choice is more than noise, though one validation split cannot prove it.")
    return _reading(*sentences)


def before_after(before: Sequence[str], after: Sequence[str], references: Sequence[str]) -> str:
    """The before/after examples in words."""
    n = len(after)
    named_before = sum(findings.names_abnormal(r) for r in before)
    named_after = sum(findings.names_abnormal(r) for r in after)
    named_reference = sum(findings.names_abnormal(r) for r in references)
    return _reading(
        f"Before training the {n} reports are {len(set(before))} distinct and {named_before} name a finding; after "
        f"training {len(set(after))} distinct and {named_after} name a finding, against {named_reference} of the "
        f"{n} references.",
        f"{n} examples show the change of style (report-like text instead of a caption); whether the findings are "
        "right is what the validation CE in the table above measures.")


# ----------------------------------------------------------------------------------------------- 04
def trial_key(metric: str) -> str:
    """The key a sweep trial record keeps ``metric`` under: ``CIDEr`` -> ``val_cider``, ``CE micro-F1`` ->
    ``val_ce_micro_f1``."""
    return "val_" + re.sub(r"[^a-z0-9]+", "_", metric.lower()).strip("_")


def sweep_choice(trials: Sequence[Mapping[str, Any]], chosen: Mapping[str, Any] | None, metric: str,
                 noise: float) -> str:
    """The sweep in words: the spread of the trials' validation ``metric`` against the noise, and the choice.

    ``trials`` are the sweep's trial records (validation scores under :func:`trial_key`); ``noise`` is how
    much the metric moves between epochs of one training run in 03 (:func:`epoch_noise`).
    """
    metric_key = trial_key(metric)
    if not chosen or chosen.get(metric_key) is None:
        return _reading("No trial finished, so nothing was chosen.")
    # Compare like with like: a successive-halving sweep's last rung (trials record their "rung"); a grid's
    # trials all have none, so all of them.
    scored = [t for t in trials if t.get(metric_key) is not None and t.get("rung") == chosen.get("rung")]
    values = [float(t[metric_key]) for t in scored] or [float(chosen[metric_key])]
    best = float(chosen[metric_key])
    close = max(0, sum(abs(v - best) <= noise for v in values) - 1)
    label = ", ".join(f"{k}={chosen[k]}" for k in ("lora_r", "lora_alpha") if k in chosen)
    stage = "in the final rung" if chosen.get("rung") is not None else "in the sweep"
    spread = (f"all score {best:.3f}" if max(values) == min(values) else
              f"score between {min(values):.3f} and {max(values):.3f}")
    sentences = [(f"{len(values)} trials {stage} {spread} on validation {metric}; the chosen one ({label}) has "
                  f"{best:.3f}.")]
    if max(values) - min(values) <= noise or close > 0:
        sentences.append(f"{close} other trial(s) lie within {noise:.3f} of it, the amount this metric moves "
                         "between two epochs of one training run (03): the ranking is made on noise. Prefer the "
                         "cheapest of the tied settings (smallest r) rather than the top of the table.")
    else:
        sentences.append(f"It leads the others by more than the metric's epoch-to-epoch change ({noise:.3f}).")
    sentences.append("Short trials rank settings on a small budget; they do not replace the full training run.")
    return _reading(*sentences)


# ----------------------------------------------------------------------------------------------- 05
def checkpoint_sizes(sizes_bytes: Mapping[str, int]) -> str:
    """The NF4 saving in words, and why a tiny model saves less."""
    base = sizes_bytes.get("base-16bit")
    nf4 = [v for k, v in sizes_bytes.items() if k.endswith("nf4")]
    if not base or not nf4:
        return _reading("The sizes could not be compared.")
    ratio = min(nf4) / base
    sentences = [f"The NF4 checkpoint is {ratio:.2f}× the 16-bit one."]
    if ratio > 0.4:
        sentences.append("Only linear layers are quantized; embeddings, norms and the patch convolution stay in "
                         "16 bits, and in a small model they are a large part of the weights, so the saving is far "
                         "from the 4× of the linear layers (BLIP-large: 0.89 GB → 0.27 GB, README).")
    else:
        sentences.append("Close to the 4× that 4-bit linear layers promise: the rest (embeddings, norms) is small.")
    return _reading(*sentences)


def merge_choice(differences: Sequence[Mapping[str, Any]], final_label: str, rule: str) -> str:
    """05's choice in words: the paired validation differences against the default, the rule, the outcome."""
    sentences = [f"The rule: {rule[0].lower()}{rule[1:]}"]
    for system in dict.fromkeys(d["system"] for d in differences):
        mine = [d for d in differences if d["system"] == system]
        sentences += _verdicts(mine, f"\"{system}\" against \"{mine[0]['baseline']}\"")
    noise_only = all(not established(d) for d in differences)
    sentences.append(f"Final model: **{final_label}**." + (
        " No candidate differs from the default beyond the noise, so the cheapest one to serve is kept: picking the "
        "highest point estimate here would be choosing on noise (06 shows whether the ranking holds on the test "
        "split)." if noise_only else ""))
    return _reading(*sentences)


def inference_cost(inference: Mapping[str, Any], final_label: str) -> str:
    """05's inference measurement as a sentence."""
    peak = inference.get("memory_peak_generation", {})
    memory_text = ", ".join(f"{k.replace('_gb', '').replace('_', ' ')} {v:.2f} GB" for k, v in peak.items()
                            if isinstance(v, (int, float)))
    latency = inference.get("latency_s_median")
    return _reading(
        f"The final model ({final_label}) writes one report in {latency:.3f} s (median over {inference['images']} "
        f"images, {inference['device']}, beam {inference['num_beams']}, up to {inference['max_new_tokens']} new "
        f"tokens); memory while generating: {memory_text or 'not measured'}." if latency is not None else
        "No image was timed.")
