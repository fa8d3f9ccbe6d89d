"""medcap caption metrics as an ``evaluate`` module (load it offline by path).

    import evaluate
    metric = evaluate.load("/path/to/medcap_helpers/metrics_module/caption_metrics.py")
    # or: medcap_helpers.metrics.load_caption_metric()
    metric.add_batch(predictions=[...], references=[...])   # as many batches as you like
    metric.compute()                                         # scores the whole set at once

``compute`` calls :func:`medcap_helpers.metrics.caption_scores` once on everything added, so
CIDEr's document frequencies come from the whole evaluated reference set, never from one batch.
"""

from __future__ import annotations

import datasets
import evaluate

import medcap_helpers.metrics as medcap_metrics

_DESCRIPTION = """BLEU-1..4 (corpus-level), ROUGE-L, CIDEr-D and METEOR (when Java is installed) from
pycocoevalcap, on radiology reports normalised with R2Gen's IU X-Ray cleaning (lower-case, punctuation
removed, sentences joined by " . ") applied to predictions and references alike."""

_CITATION = """@inproceedings{vedantam2015cider, title={CIDEr: Consensus-based image description evaluation},
author={Vedantam, Ramakrishna and Zitnick, C. Lawrence and Parikh, Devi}, booktitle={CVPR}, year={2015}}
@inproceedings{chen-emnlp-2020-r2gen, title={Generating Radiology Reports via Memory-driven Transformer},
author={Chen, Zhihong and Song, Yan and Chang, Tsung-Hui and Wan, Xiang}, booktitle={EMNLP}, year={2020}}"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated reports (str); empty strings score 0.
    references: per prediction, one reference report (str) or a list of them.
    meteor: None (default) computes METEOR when `java` is on the PATH; True asks for it; False skips it.
Returns:
    dict with "BLEU-1".."BLEU-4", "ROUGE-L", "CIDEr" and, when computed, "METEOR".
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CaptionMetrics(evaluate.Metric):
    """BLEU/ROUGE-L/CIDEr/METEOR of generated radiology reports, scored over the whole set."""

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

    def _compute(self, predictions, references, meteor=None):
        return medcap_metrics.caption_scores(predictions, references, meteor=meteor)
