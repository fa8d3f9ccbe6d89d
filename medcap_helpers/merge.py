"""Merge a LoRA adapter into BLIP and re-quantize the result to NF4.

Two merges are possible and the tutorial compares them:

* **onto the 16-bit base** — the usual ``merge_and_unload()`` on the original weights. The adapter
  was trained against the *quantized* base though, so the merged model differs from what was
  trained by the quantization error of the base;
* **onto the dequantized 4-bit base** — the exact weights the adapter saw in training, so before
  re-quantization this reproduces the trained model.

Either merged model is then loaded in NF4 and saved as a 4-bit checkpoint with its processor, so
``BlipForConditionalGeneration.from_pretrained(folder)`` in a fresh process is ready to caption.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SAFETENSORS_SUFFIXES = (".safetensors",)


class AdapterNotFound(FileNotFoundError):
    """The adapter folder is missing or incomplete."""


@dataclass
class MergedCheckpoint:
    path: Path
    kind: str  # "merged-16bit" | "merged-dequantized-16bit" | "merged-nf4"
    size_bytes: int


def check_adapter_dir(adapter_dir: str | Path) -> Path:
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise AdapterNotFound(f"No LoRA adapter in '{adapter_dir}' (adapter_config.json is missing): "
                              "run 03_qlora_train first, or point at the folder save_pretrained wrote.")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise AdapterNotFound(f"'{adapter_dir}' has no adapter_model.safetensors: only safetensors "
                              "adapters are loaded (no pickle files).")
    return adapter_dir


def checkpoint_size(path: str | Path) -> int:
    """Bytes of the weight files in a checkpoint folder (what a download or the disk holds)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.suffix in SAFETENSORS_SUFFIXES)


def merge_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """16-bit dtype to merge and save in: bf16 when training computed in bf16, else fp16."""
    return torch.bfloat16 if compute_dtype == torch.bfloat16 else torch.float16


def _merge(base_model: Any, adapter_dir: Path) -> Any:
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=False)
    return peft_model.merge_and_unload()


def save_checkpoint(model: Any, processor: Any, out_dir: str | Path, kind: str) -> MergedCheckpoint:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    if processor is not None:
        processor.save_pretrained(out_dir)
    return MergedCheckpoint(out_dir, kind, checkpoint_size(out_dir))


def merge_onto_16bit_base(base_path: str, adapter_dir: str | Path, out_dir: str | Path, processor: Any,
                          dtype: torch.dtype = torch.float16) -> MergedCheckpoint:
    """Reload the base in 16-bit, merge the adapter, save safetensors."""
    from transformers import BlipForConditionalGeneration

    adapter_dir = check_adapter_dir(adapter_dir)
    base = BlipForConditionalGeneration.from_pretrained(base_path, dtype=dtype, use_safetensors=True)
    merged = _merge(base, adapter_dir)
    return save_checkpoint(merged, processor, out_dir, "merged-16bit")


def merge_onto_dequantized_base(quantized_base: Any, adapter_dir: str | Path, out_dir: str | Path,
                                processor: Any, dtype: torch.dtype = torch.float16) -> MergedCheckpoint:
    """Dequantize the 4-bit base the adapter was trained on, merge, save in 16-bit."""
    adapter_dir = check_adapter_dir(adapter_dir)
    base = quantized_base.dequantize(dtype=dtype)
    base = base.to(dtype)
    # dequantize() keeps the quantization bookkeeping; drop it so the result saves as a plain model.
    for attribute in ("hf_quantizer", "is_loaded_in_4bit", "quantization_method"):
        if hasattr(base, attribute):
            try:
                delattr(base, attribute)
            except AttributeError:
                pass
    if hasattr(base.config, "quantization_config"):
        del base.config.quantization_config
    merged = _merge(base, adapter_dir)
    return save_checkpoint(merged, processor, out_dir, "merged-dequantized-16bit")


def requantize_nf4(merged_dir: str | Path, out_dir: str | Path, processor: Any,
                   quantization_config: Any, device_map: Any) -> MergedCheckpoint:
    """Load a merged 16-bit checkpoint in NF4 and save the 4-bit weights with the processor."""
    from transformers import BlipForConditionalGeneration

    model = BlipForConditionalGeneration.from_pretrained(
        str(merged_dir), quantization_config=quantization_config, device_map=device_map, use_safetensors=True)
    return save_checkpoint(model, processor, out_dir, "merged-nf4")


def load_captioner(folder: str | Path, device_map: Any = None) -> tuple[Any, Any]:
    """Model and processor from a saved (merged or NF4) folder; 4-bit settings come from its config."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"No model in '{folder}' (config.json is missing): run 05_merge_requant first.")
    model = BlipForConditionalGeneration.from_pretrained(str(folder), device_map=device_map, use_safetensors=True)
    processor = BlipProcessor.from_pretrained(str(folder))
    return model.eval(), processor
