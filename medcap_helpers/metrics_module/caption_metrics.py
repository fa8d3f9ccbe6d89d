"""medcap caption metrics as an ``evaluate`` module (load it offline by path).

    import evaluate
    metric = evaluate.load("/path/to/medcap_helpers/metrics_module/caption_metrics.py")
    # or: medcap_helpers.metrics.load_caption_metric()
    metric.add_batch(predictions=[...], references=[...])   # as many batches as you like
    metric.compute()                                         # scores the whole set at once

``compute`` calls :func:`medcap_helpers.metrics.caption_scores` once on everything added, so
CIDEr's document frequencies come from the whole evaluated reference set, never from one batch; and
:func:`medcap_helpers.metrics.clinical_efficacy_scores` for the clinical efficacy (CE) of the reports:

    metric.compute(study_ids=[...], bootstrap_samples=1000)  # CE micro-F1 with its 95% interval over studies
"""

from __future__ import annotations

import datasets
import evaluate

import medcap_helpers.metrics as medcap_metrics

_DESCRIPTION = """BLEU-1..4 (corpus-level), ROUGE-L, CIDEr-D and METEOR (when Java is installed) from
pycocoevalcap, on radiology reports normalised with R2Gen's IU X-Ray cleaning (lower-case, punctuation
removed, sentences joined by " . ") applied to predictions and references alike; and clinical efficacy
(CE): the 14 CheXpert observations each report names as present (medcap's rule-based labeler) against its
reference's, micro (all classes) and macro (classes the references name) precision/recall/F1, with an
optional bootstrap interval of micro-F1 over studies."""

_CITATION = """@inproceedings{vedantam2015cider, title={CIDEr: Consensus-based image description evaluation},
author={Vedantam, Ramakrishna and Zitnick, C. Lawrence and Parikh, Devi}, booktitle={CVPR}, year={2015}}
@inproceedings{chen-emnlp-2020-r2gen, title={Generating Radiology Reports via Memory-driven Transformer},
author={Chen, Zhihong and Song, Yan and Chang, Tsung-Hui and Wan, Xiang}, booktitle={EMNLP}, year={2020}}"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated reports (str); empty strings score 0.
    references: per prediction, one reference report (str) or a list of them.
    meteor: None (default) computes METEOR when `java` is on the PATH; True asks for it; False skips it.
    clinical_efficacy: True (default) adds the CE scores; False leaves them out.
    study_ids: per prediction, its study (the bootstrap resamples studies); None: each report alone.
    bootstrap_samples: 0 (default) gives no interval; N > 0 adds "CE micro-F1_ci_low"/"_ci_high".
    seed: the bootstrap's seed.
    per_class: True adds "CE per class" (support/tp/fp/fn/precision/recall/F1 per observation).
Returns:
    dict with "BLEU-1".."BLEU-4", "ROUGE-L", "CIDEr", when computed "METEOR", and "CE micro-F1",
    "CE macro-F1", "CE micro-precision", "CE micro-recall", "CE macro-precision", "CE macro-recall".
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CaptionMetrics(evaluate.Metric):
    """BLEU/ROUGE-L/CIDEr/METEOR and clinical efficacy of generated radiology reports, scored over the whole set."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": datasets.Value("string"),
                                   "references": datasets.Sequence(datasets.Value("string"))}),
                datasets.Features({"predictions": datasets.Value("string"),
                                   "references": datasets.Value("string")}),
            ],
            reference_urls=["https://github.com/salaniz/pycocoevalcap", "https://github.com/cuhksz-nlp/R2Gen"],
        )

    def _compute(self, predictions, references, meteor=None, clinical_efficacy=True, study_ids=None,
                 bootstrap_samples=0, seed=0, per_class=False):
        scores = medcap_metrics.caption_scores(predictions, references, meteor=meteor)
        if clinical_efficacy:
            scores.update(medcap_metrics.clinical_efficacy_scores(
                predictions, references, groups=study_ids, n_samples=bootstrap_samples, seed=seed,
                per_class=per_class))
        return scores
