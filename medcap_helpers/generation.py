"""Report generation: every system's reports for a split, batch by batch (base, 4-bit, peft, merged)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from medcap_helpers.config import MedcapConfig
from medcap_helpers.devices import (
    OutOfMemory,
    is_out_of_memory,
    model_device,
    out_of_memory,
    release_memory,
)
from medcap_helpers.multiview import multiview_generate
from medcap_helpers.processing import pixel_batch

if TYPE_CHECKING:  # pragma: no cover
    from transformers import BlipProcessor


class RowColumn(Sequence[Any]):
    """``rows[i][key]`` as a lazy sequence (no decoding of a dataset's whole image column)."""

    def __init__(self, rows: Any, key: str) -> None:
        self.rows, self.key = rows, key

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: Any) -> Any:  # type: ignore[override]
        if isinstance(index, slice):
            return [self.rows[i][self.key] for i in range(*index.indices(len(self)))]
        return self.rows[index][self.key]


class StudyViews(Sequence[Any]):
    """Each row's views as a list (``image``, then ``image_2`` when present), decoded row by row."""

    def __init__(self, rows: Any) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: Any) -> Any:  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        row = self.rows[index]
        return [row["image"]] + ([row["image_2"]] if row.get("image_2") is not None else [])


def has_second_views(rows: Any) -> bool:
    """True when any row carries a second view (a ``views="both"`` split)."""
    if hasattr(rows, "column_names"):
        return "image_2" in rows.column_names and any(
            v is not None for v in rows.with_format(None).select_columns(["image_2"])["image_2"])
    return any(row.get("image_2") is not None for row in rows)


def study_inputs(rows: Any) -> Sequence[Any]:
    """What :func:`generate_reports` reads for a split: the views of each study, or each row's image."""
    return StudyViews(rows) if has_second_views(rows) else RowColumn(rows, "image")


@torch.no_grad()
def generate_reports(model: Any, processor: BlipProcessor, images: Sequence[Any], max_new_tokens: int = 100,
                     num_beams: int = 1, batch_size: int = 8, device: torch.device | str | None = None,
                     progress: bool = True, min_new_tokens: int | None = None) -> list[str]:
    """Reports for ``images`` (greedy when ``num_beams == 1``), decoded without special tokens.

    ``images`` needs only ``len`` and integer indexing (PIL images, paths, arrays, or a list of a study's
    views), so a :class:`RowColumn` or :class:`StudyViews` over a dataset decodes one batch at a time.
    Works for base, 4-bit and peft models; restores the model's train/eval mode afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    device = torch.device(device) if device is not None else model_device(model)
    was_training = model.training
    model.eval()
    reports: list[str] = []
    oom: OutOfMemory | None = None
    try:
        with tqdm(total=len(images), desc="Generating reports", unit="img", disable=not progress,
                  leave=False) as bar:
            for start in range(0, len(images), batch_size):
                batch = [images[i] for i in range(start, min(start + batch_size, len(images)))]
                pixel_values = pixel_batch(processor, batch).to(device)
                settings = dict(max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
                if min_new_tokens:  # the rehearsal's fixed report length
                    settings["min_new_tokens"] = min_new_tokens
                try:
                    if pixel_values.ndim == 5:
                        output = multiview_generate(model, pixel_values, **settings)
                    else:
                        output = model.generate(pixel_values=pixel_values, **settings)
                except Exception as err:  # noqa: BLE001 - only out-of-memory is translated
                    if isinstance(err, OutOfMemory) or not is_out_of_memory(err):
                        raise
                    oom = _generation_oom(err, len(batch), num_beams, max_new_tokens, len(reports), len(images))
                    break
                texts = processor.tokenizer.batch_decode(output, skip_special_tokens=True)
                reports.extend(" ".join(t.split()) for t in texts)
                bar.update(len(batch))
    finally:
        model.train(was_training)
    if oom is not None:  # raised here, outside the except block, so the failed batch's tensors are freed
        release_memory()
        raise oom
    return reports


def _generation_oom(error: BaseException, batch_size: int, num_beams: int, max_new_tokens: int, done: int,
                    total: int) -> OutOfMemory:
    advice = []
    if batch_size > 1:
        advice.append(f"a smaller batch (eval_batch_size={max(1, batch_size // 2)})")
    if num_beams > 1:
        advice.append("greedy decoding (num_beams=1) or fewer beams")
    advice += [f"shorter reports (max_new_tokens below {max_new_tokens})",
               "free GPU memory held by other models or processes"]
    return out_of_memory("generating reports", error,
                         {"batch_size": batch_size, "num_beams": num_beams, "max_new_tokens": max_new_tokens},
                         advice, note=f"{done} of {total} reports were generated before it failed.")


def generate_for_split(model: Any, processor: Any, split: Any, config: MedcapConfig) -> list[str]:
    """A report for every row (study or image) of ``split`` with the config's generation settings."""
    return generate_reports(model, processor, study_inputs(split), max_new_tokens=config.max_new_tokens,
                            num_beams=config.num_beams, batch_size=config.eval_batch_size,
                            min_new_tokens=config.min_new_tokens)
