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
from medcap_helpers.images import open_rgb

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


@torch.no_grad()
def generate_reports(model: Any, processor: BlipProcessor, images: Sequence[Any], max_new_tokens: int = 100,
                     num_beams: int = 1, batch_size: int = 8, device: torch.device | str | None = None,
                     progress: bool = True) -> list[str]:
    """Reports for ``images`` (greedy when ``num_beams == 1``), decoded without special tokens.

    ``images`` needs only ``len`` and integer indexing (PIL images, paths, arrays), so a
    :class:`RowColumn` over a dataset decodes one batch at a time. Works for base, 4-bit and peft
    models; restores the model's train/eval mode afterwards.
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
                batch = [open_rgb(images[i]) for i in range(start, min(start + batch_size, len(images)))]
                pixel_values = processor.image_processor(images=batch, return_tensors="pt")["pixel_values"]
                try:
                    output = model.generate(pixel_values=pixel_values.to(device), max_new_tokens=max_new_tokens,
                                            num_beams=num_beams, do_sample=False)
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


def split_images(split: Any) -> Any:
    """The split's images in row order, decoded lazily batch by batch (a full split of radiographs
    would not fit in memory); generation and embedding convert each batch to RGB."""
    return split["image"]


def generate_for_split(model: Any, processor: Any, split: Any, config: MedcapConfig) -> list[str]:
    """Reports for every image of ``split`` with the config's generation settings."""
    return generate_reports(model, processor, split_images(split), max_new_tokens=config.max_new_tokens,
                            num_beams=config.num_beams, batch_size=config.eval_batch_size)
