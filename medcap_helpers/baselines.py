"""Baselines a fine-tuned captioner has to beat.

* :func:`constant_baseline`: the most frequent training report for every image. IU X-Ray is full
  of near-identical normal studies, so this scores surprisingly well on n-gram metrics.
* :func:`nearest_neighbour_baseline`: the training report of the most similar training image,
  similarity = cosine of the base model's vision-encoder embeddings (:func:`image_embeddings`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from medcap_helpers.config import MedcapConfig
from medcap_helpers.generation import generate_for_split, generation_inputs
from medcap_helpers.images import open_rgb
from medcap_helpers.metrics import normalize_report, paired_differences
from medcap_helpers.pipeline import progress_bars_enabled
from medcap_helpers.vision_cache import StudyTokens

CONSTANT_SYSTEM = "constant (most frequent report)"
"""The baseline every model is compared with: the same report for every image."""


def most_frequent_report(train_texts: Sequence[str]) -> str:
    """The training report whose normalised text (:func:`normalize_report`) is the most frequent.

    Returns an original (un-normalised) text: the most common spelling among the reports in the
    winning group. Ties are broken by the smaller normalised text, then the smaller original
    text, so the answer does not depend on the order of ``train_texts``.
    """
    texts = [t for t in train_texts if isinstance(t, str)]
    if len(texts) != len(train_texts):
        raise TypeError("train_texts must all be strings.")
    spellings: dict[str, Counter[str]] = {}
    for text in texts:
        key = normalize_report(text)
        if key:
            spellings.setdefault(key, Counter())[text] += 1
    if not spellings:
        raise ValueError("No training reports to choose from (train_texts is empty or all blank).")
    best_key = min(spellings, key=lambda k: (-sum(spellings[k].values()), k))
    return min(spellings[best_key], key=lambda t: (-spellings[best_key][t], t))


def constant_baseline(train_texts: Sequence[str], n: int) -> list[str]:
    """:func:`most_frequent_report` of ``train_texts`` repeated ``n`` times (one per test image)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a whole number >= 0, got {n!r}.")
    return [most_frequent_report(train_texts)] * int(n)


def vision_model_of(model: Any) -> torch.nn.Module:
    """BLIP's vision encoder inside a plain, 4-bit or peft-wrapped ``BlipForConditionalGeneration``."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    vision = getattr(base, "vision_model", None)
    if vision is None:
        raise TypeError(f"{type(model).__name__} has no vision_model: pass a BlipForConditionalGeneration "
                        "(or a peft model wrapping one).")
    return vision


@torch.no_grad()
def image_embeddings(model: Any, processor: Any, images: Sequence[Any], batch_size: int = 8,
                     device: torch.device | str | None = None, progress: bool | None = None) -> torch.Tensor:
    """L2-normalised vision embeddings, one row per image: float32, on the CPU.

    Runs the vision encoder under ``torch.no_grad()`` on ``processor(images=...)`` pixel values
    and takes its ``pooler_output``: the [CLS] token of ``last_hidden_state`` (which BLIP's text
    decoder cross-attends to along with the patch tokens), passed once more through
    ``post_layernorm`` as transformers' ``BlipVisionModel`` does. [CLS] rather than a mean over
    patches: it is the vision tower's own global summary. ``processor`` is a ``BlipProcessor`` or
    a ``BlipImageProcessor``; images are PIL images, paths or arrays, or lists of a study's views,
    whose normalised embeddings are averaged into the study's. ``progress=None`` shows a bar except under
    ``medcap run`` (:func:`medcap_helpers.pipeline.progress_bars_enabled`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    vision = vision_model_of(model)
    weights = [p for p in vision.parameters() if p.is_floating_point()]
    device = torch.device(device) if device is not None else weights[0].device
    patch = getattr(getattr(vision, "embeddings", None), "patch_embedding", None)
    dtype = patch.weight.dtype if patch is not None else weights[0].dtype
    image_processor = getattr(processor, "image_processor", processor)

    was_training = vision.training
    vision.eval()
    rows: list[torch.Tensor] = []
    try:
        for start in tqdm(range(0, len(images), batch_size), desc="Image embeddings", unit="batch",
                          disable=not (progress_bars_enabled() if progress is None else progress), leave=False):
            items = [item if isinstance(item, (list, tuple)) else [item] for item in images[start:start + batch_size]]
            batch = [open_rgb(view) for views in items for view in views]
            pixel_values = image_processor(images=batch, return_tensors="pt")["pixel_values"]
            output = vision(pixel_values=pixel_values.to(device=device, dtype=dtype))
            pooled = torch.nn.functional.normalize(output.pooler_output.float().cpu(), dim=-1)
            # a study's views: the mean of their normalised embeddings
            rows += [views.mean(dim=0, keepdim=True) for views in torch.split(pooled, [len(v) for v in items])]
    finally:
        vision.train(was_training)
    if not rows:
        hidden = getattr(getattr(vision, "config", None), "hidden_size", 0)
        return torch.empty((0, hidden), dtype=torch.float32)
    return torch.nn.functional.normalize(torch.cat(rows), dim=-1)


@torch.no_grad()
def embeddings_from_tokens(model: Any, studies: Sequence[torch.Tensor], views: int) -> torch.Tensor:
    """:func:`image_embeddings` from cached image tokens (:class:`~medcap_helpers.vision_cache.StudyTokens`):
    each view's [CLS] token through ``post_layernorm`` (BLIP's ``pooler_output``), normalised, the views
    averaged. A one-view study's padding repeats its view, so the average is that view's embedding."""
    vision = vision_model_of(model)
    norm = vision.post_layernorm
    weight = next(norm.parameters())
    rows = []
    for study in studies:
        cls = study.reshape(views, -1, study.shape[-1])[:, 0].to(device=weight.device, dtype=weight.dtype)
        pooled = torch.nn.functional.normalize(norm(cls).float().cpu(), dim=-1)
        rows.append(pooled.mean(dim=0, keepdim=True))
    if not rows:
        return torch.empty((0, vision.config.hidden_size), dtype=torch.float32)
    return torch.nn.functional.normalize(torch.cat(rows), dim=-1)


def study_embeddings(model: Any, processor: Any, split: Any, config: MedcapConfig, batch_size: int) -> torch.Tensor:
    """The nearest neighbour's embedding of every study of ``split``: from the vision cache when
    ``cache_vision_embeddings`` is on (filled here where missing; training reuses it), else from the images."""
    inputs = generation_inputs(model, processor, split, config)
    if isinstance(inputs, StudyTokens):
        return embeddings_from_tokens(model, inputs, 2 if inputs.two_views else 1)
    return image_embeddings(model, processor, inputs, batch_size)


def nearest_neighbour_baseline(train_embeddings: np.ndarray | torch.Tensor, train_texts: Sequence[str],
                               query_embeddings: np.ndarray | torch.Tensor) -> list[str]:
    """For each query, the report of the training image with the highest cosine similarity.

    Embeddings need not be normalised (they are normalised here). Ties go to the earlier training row.
    """
    train = torch.as_tensor(np.asarray(train_embeddings) if not torch.is_tensor(train_embeddings)
                            else train_embeddings).float().cpu()
    query = torch.as_tensor(np.asarray(query_embeddings) if not torch.is_tensor(query_embeddings)
                            else query_embeddings).float().cpu()
    if train.ndim != 2 or query.ndim != 2:
        raise ValueError(f"Embeddings must be 2-D (rows = images), got train {tuple(train.shape)} and "
                         f"query {tuple(query.shape)}.")
    if train.shape[0] == 0:
        raise ValueError("No training embeddings to search.")
    if train.shape[0] != len(train_texts):
        raise ValueError(f"{train.shape[0]} training embeddings but {len(train_texts)} training texts.")
    if train.shape[1] != query.shape[1]:
        raise ValueError(f"Embedding sizes differ: train {train.shape[1]}, query {query.shape[1]} "
                         "(embed both with the same model).")
    train = torch.nn.functional.normalize(train, dim=-1)
    query = torch.nn.functional.normalize(query, dim=-1)
    nearest: list[int] = []
    for start in range(0, query.shape[0], 1024):  # bounded memory for large query sets
        nearest.extend(torch.argmax(query[start:start + 1024] @ train.T, dim=1).tolist())
    return [train_texts[i] for i in nearest]


EMBEDDING_BATCH = 16
"""Studies per batch through the vision tower for the nearest neighbour: the tower is compute-bound, so a
bigger batch gains nothing, while its activations grow with it (``eval_batch_size`` sizes generation)."""


def baseline_systems(base_model: Any, processor: Any, train_split: Any, test_split: Any,
                     config: MedcapConfig) -> dict[str, list[str]]:
    """Zero-shot base captions, the constant most-frequent report and nearest-neighbour retrieval."""
    train_texts = list(train_split["text"])
    zero_shot = generate_for_split(base_model, processor, test_split, config)
    embed_batch = min(config.eval_batch_size, EMBEDDING_BATCH)
    train_embeddings = study_embeddings(base_model, processor, train_split, config, embed_batch)
    test_embeddings = study_embeddings(base_model, processor, test_split, config, embed_batch)
    return {
        "zero-shot base": zero_shot,
        CONSTANT_SYSTEM: constant_baseline(train_texts, len(test_split)),
        "nearest neighbour (base vision embedding)": nearest_neighbour_baseline(
            train_embeddings, train_texts, test_embeddings),
    }


def differences_from_constant(systems: Mapping[str, Sequence[str]], split: Any,
                              config: MedcapConfig) -> list[dict[str, Any]]:
    """Paired-bootstrap differences (:func:`medcap_helpers.metrics.paired_differences`) of every other system
    against the constant report, on ``split``'s studies."""
    return paired_differences(systems, split, config, [(name, CONSTANT_SYSTEM) for name in systems
                                                       if name != CONSTANT_SYSTEM])
