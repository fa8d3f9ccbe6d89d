"""Saved weights: training checkpoints, the LoRA adapter, merged and NF4 models, and their folder checks.

Everything is safetensors (no pickle, no remote code) and every folder is written through
:func:`medcap_helpers.atomic.atomic_folder`, so a run killed while saving leaves the old complete
folder (or none), never half of one.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medcap_helpers.atomic import atomic_folder, folder_ready
from medcap_helpers.config import MedcapConfig
from medcap_helpers.errors import AdapterNotFound, StageNotRun
from medcap_helpers.model import load_base_model, quiet_deprecations

if TYPE_CHECKING:  # pragma: no cover
    from transformers import BlipProcessor

SAFETENSORS_SUFFIXES = (".safetensors",)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


# --- Trainer checkpoints ------------------------------------------------------------------------
def _is_complete_checkpoint(folder: Path) -> bool:
    """The Trainer writes ``trainer_state.json`` last (and not atomically): complete = it exists and parses."""
    try:
        return isinstance(json.loads((folder / "trainer_state.json").read_text()), dict)
    except (OSError, ValueError):
        return False


def last_complete_checkpoint(folder: str | Path) -> Path | None:
    """The highest-step ``checkpoint-N`` in ``folder`` whose ``trainer_state.json`` is complete (written last)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = []
    for child in folder.iterdir():
        match = _CHECKPOINT_RE.match(child.name)
        if match and child.is_dir() and _is_complete_checkpoint(child):
            found.append((int(match.group(1)), child))
    return max(found)[1] if found else None


def remove_incomplete_checkpoints(folder: str | Path) -> list[Path]:
    """Delete the ``checkpoint-N`` folders a killed run left half-written; return them.

    A rerun must neither resume from one nor let the Trainer's checkpoint rotation (which sorts by
    modification time) count it as the newest checkpoint.
    """
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for child in sorted(folder.iterdir()):
            if _CHECKPOINT_RE.match(child.name) and child.is_dir() and not _is_complete_checkpoint(child):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed



# --- the LoRA adapter ---------------------------------------------------------------------------
def check_adapter_dir(adapter_dir: str | Path) -> Path:
    """``adapter_dir`` when it holds a complete safetensors adapter, else :class:`AdapterNotFound`."""
    adapter_dir = Path(adapter_dir)
    folder_ready(adapter_dir, ADAPTER_WEIGHTS)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise AdapterNotFound(f"No LoRA adapter in '{adapter_dir.resolve()}' (adapter_config.json is missing): "
                              "run 03_qlora_train first, or point at the folder save_pretrained wrote.")
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise AdapterNotFound(f"'{adapter_dir.resolve()}' has no {ADAPTER_WEIGHTS}: only safetensors "
                              "adapters are loaded (no pickle files).")
    return adapter_dir


def save_adapter(model: Any, processor: BlipProcessor, adapter_dir: str | Path) -> Path:
    """Save the LoRA adapter (safetensors) and the processor; the folder is replaced only when complete."""
    with atomic_folder(adapter_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
    return Path(adapter_dir)


def load_adapter_model(config: MedcapConfig, adapter_dir: str | Path, model_path: str | Path | None = None,
                       is_trainable: bool = False) -> Any:
    """The base model (4-bit per ``config``) with the LoRA adapter in ``adapter_dir`` applied."""
    from peft import PeftModel

    adapter_dir = check_adapter_dir(adapter_dir)
    base = load_base_model(config, model_path=model_path)
    with quiet_deprecations():
        return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=is_trainable)


# --- merged and NF4 models ----------------------------------------------------------------------
@dataclass
class MergedCheckpoint:
    path: Path
    kind: str  # "merged-16bit" | "merged-dequantized-16bit" | "merged-nf4"
    size_bytes: int


def checkpoint_size(path: str | Path) -> int:
    """Bytes of the weight files in a checkpoint folder (what a download or the disk holds)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.suffix in SAFETENSORS_SUFFIXES)


def save_checkpoint(model: Any, processor: Any, out_dir: str | Path, kind: str) -> MergedCheckpoint:
    """Save a whole model (safetensors) with its processor; the folder is replaced only when complete."""
    out_dir = Path(out_dir)
    with atomic_folder(out_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        if processor is not None:
            processor.save_pretrained(staging)
    return MergedCheckpoint(out_dir, kind, checkpoint_size(out_dir))


def saved_checkpoint(out_dir: str | Path, kind: str) -> MergedCheckpoint | None:
    """The checkpoint already in ``out_dir`` (from an earlier run), or None."""
    out_dir = Path(out_dir)
    if folder_ready(out_dir, "config.json") and checkpoint_size(out_dir) > 0:
        return MergedCheckpoint(out_dir, kind, checkpoint_size(out_dir))
    return None


def load_captioner(folder: str | Path, device_map: Any = None) -> tuple[Any, Any]:
    """Model and processor from a saved (merged or NF4) folder; 4-bit settings come from its config.

    Loaded as a user would load it (``from_pretrained(folder)``, the saved dtype): a 4-bit folder
    computes its 4-bit layers in the saved compute dtype and keeps the other weights in 16-bit.
    (Asking for another ``dtype`` when loading a pre-quantized checkpoint is not safe in
    transformers 5.24: it casts the biases but not the weights of unquantized layers, and the patch
    convolution then fails with "Input type (c10::Half) and bias type (float) should be the same".)
    """
    from transformers import BlipForConditionalGeneration, BlipProcessor

    folder = Path(folder)
    if not folder_ready(folder, "config.json"):
        raise StageNotRun(f"No model in '{folder.resolve()}' (config.json is missing): run 05_merge_requant first.")
    model = BlipForConditionalGeneration.from_pretrained(str(folder), device_map=device_map, use_safetensors=True,
                                                         dtype="auto")
    processor = BlipProcessor.from_pretrained(str(folder))
    return model.eval(), processor


def is_adapter_dir(folder: str | Path) -> bool:
    """Whether ``folder`` holds a LoRA adapter (``adapter_config.json``) rather than a whole model."""
    return (Path(folder) / "adapter_config.json").is_file()


def load_final_model(config: MedcapConfig, folder: str | Path, device_map: Any = None) -> tuple[Any, Any]:
    """Model and processor of a run's final model, whichever kind 05 chose: an adapter folder loads on the
    4-bit base (:func:`load_adapter_model`), a merged folder as a whole model (:func:`load_captioner`)."""
    if is_adapter_dir(folder):
        return load_adapter_model(config, folder).eval(), load_processor_from(folder)
    return load_captioner(folder, device_map=device_map)


def load_processor_from(folder: str | Path) -> Any:
    """The processor saved beside a model or adapter."""
    from transformers import BlipProcessor

    return BlipProcessor.from_pretrained(str(folder))
