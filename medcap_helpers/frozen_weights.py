"""The text decoder's frozen 4-bit weights dequantized once while it trains (``dequantize_frozen_weights``).

QLoRA keeps the frozen weights in 4-bit NF4 and dequantizes a layer's weight to the compute dtype at every
matmul: in the forward pass, again when checkpointing recomputes it, and in the backward pass. Each time
goes through bitsandbytes' Python and launches three more kernels (the double-quantized scales, their
offset, the weight): by count, about 1,100 of a step's ~3,900 launches at BLIP-large size (estimated, not
profiled); and at that size a
training step is bound by the CPU issuing kernels, not by the GPU (README, "Training levers").

With this setting each 4-bit linear layer of the text decoder keeps its weight as bitsandbytes dequantizes
it and multiplies by it directly, with the casts bitsandbytes makes (input to the compute dtype, output
back to the input's dtype): the same weights and arithmetic, for the memory of the decoder's weights in
16 bits (0.24 GB more peak at BLIP-large size, held while training and released for generation). Measured
in pairs in one process on an H100: 83.5 against 52.0 samples/s (``benchmarks/training_step.py``). The 4-bit weights
stay the model's weights: saving, merging, checkpoints and generation's own decoder copy are unchanged.
The vision tower is left alone (frozen, and not run at all when its tokens are cached).
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT = "_medcap_dequantized_weight"


def _frozen_4bit_layers(model: Any) -> list[nn.Module]:
    """The text decoder's bitsandbytes 4-bit linear layers (inside LoRA wrappers too, not the wrappers), in
    ``model`` or in whatever wraps it (peft, DDP)."""
    from peft.tuners.lora import LoraLayer

    return [m for name, m in model.named_modules()
            if "text_decoder." in name and type(getattr(m, "weight", None)).__name__ == "Params4bit"
            and not isinstance(m, LoraLayer)]


def dequantize_frozen_weights(model: Any) -> int:
    """Make the text decoder's 4-bit linear layers multiply by their dequantized weight, made at their next
    call and kept until :func:`release_dequantized_weights`; return how many layers. Idempotent."""
    layers = _frozen_4bit_layers(model)
    for layer in layers:
        layer.forward = types.MethodType(_dequantized_forward, layer)
    return len(layers)


def use_4bit_matmuls(model: Any) -> int:
    """Undo :func:`dequantize_frozen_weights`: bitsandbytes' own 4-bit matmuls again, the copy released;
    return how many layers changed."""
    release_dequantized_weights(model)
    layers = [m for m in _frozen_4bit_layers(model) if "forward" in vars(m)]
    for layer in layers:
        del layer.forward
    return len(layers)


def uses_dequantized_weights(model: Any) -> bool:
    return any(_uses_copy(m) for m in _frozen_4bit_layers(model))


def _uses_copy(layer: nn.Module) -> bool:
    return getattr(vars(layer).get("forward"), "__func__", None) is _dequantized_forward


def release_dequantized_weights(model: Any) -> int:
    """Drop the dequantized weights (generation and other stages get their memory); the next training call
    makes them again. Return how many bytes were held."""
    held = dequantized_bytes(model)
    for layer in _frozen_4bit_layers(model):
        vars(layer).pop(WEIGHT, None)
    return held


def dequantized_bytes(model: Any) -> int:
    """What the dequantized weights hold now (bytes)."""
    return sum(w.numel() * w.element_size() for w in (vars(m).get(WEIGHT) for m in _frozen_4bit_layers(model))
               if w is not None)


def make_dequantized_weights(model: Any) -> int:
    """Dequantize now what the layers' next calls would (those whose compute dtype is known): compiled code
    then only reads the weights. Returns how many were made."""
    made = 0
    for layer in _frozen_4bit_layers(model):
        if _uses_copy(layer) and getattr(layer, "compute_type_is_set", True) and layer.compute_dtype is not None:
            made += _dequantized_weight(layer, layer.compute_dtype)[1]
    return made


def _dequantized_weight(layer: Any, compute_dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """The layer's dequantized weight, and whether it was made now."""
    weight = getattr(layer, WEIGHT, None)  # an instance attribute (not a buffer); getattr is what torch.compile traces
    if weight is not None and weight.dtype == compute_dtype:
        return weight, False
    from bitsandbytes.functional import dequantize_4bit

    with torch.no_grad():
        weight = dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(compute_dtype)
    vars(layer)[WEIGHT] = weight
    return weight, True


def _dequantized_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """``bitsandbytes.nn.Linear4bit.forward`` with the weight dequantized once instead of at every call."""
    if not getattr(self, "compute_type_is_set", True) or x.device.type != self.weight.device.type:
        return type(self).forward(self, x)  # its first call picks the compute dtype
    compute_dtype = self.compute_dtype or x.dtype
    weight, _ = _dequantized_weight(self, compute_dtype)
    bias = None if self.bias is None else self.bias.to(compute_dtype)
    return F.linear(x.to(compute_dtype), weight, bias).to(x.dtype)
