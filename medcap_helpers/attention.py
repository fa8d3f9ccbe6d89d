"""The text decoder's attention through PyTorch's fused ``scaled_dot_product_attention`` (``sdpa_attention``).

BLIP's text attention is written out in eager steps (scores, scale, mask, softmax, dropout, product),
and transformers offers no SDPA path for it. Each step is a kernel launch, and training keeps the
softmax's output for the backward pass: per layer and study, 12 heads x report tokens x 1,154 image
tokens for the cross-attention of a two-view study. The fused call computes the same attention in one
kernel on a GPU (memory-efficient attention, which takes BLIP's additive mask) without keeping those
probabilities.

Used only where no key/value cache is passed (training, the teacher-forced validation loss, the
budget probe); a call with a cache, or one asking for the attention maps, runs BLIP's own code.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F

CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value")


def _attention_modules(model: Any) -> list[Any]:
    from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention

    return [m for m in model.modules() if isinstance(m, BlipTextSelfAttention)]  # only the text decoder has them


def use_sdpa_attention(model: Any) -> int:
    """Route the text decoder's cache-free attention calls through SDPA; return how many modules.

    Turns PyTorch's cuDNN attention backend off (process-wide): it builds a cuDNN graph for every new
    input shape, and report lengths change from batch to batch. Profiled on an H200, that took 8 ms of
    CPU per forward call and 14 ms per backward, more than the whole step's GPU time; the
    memory-efficient kernel takes BLIP's additive mask with no such set-up.
    """
    torch.backends.cuda.enable_cudnn_sdp(False)
    modules = _attention_modules(model)
    for module in modules:
        module.forward = types.MethodType(_sdpa_forward, module)
    return len(modules)


def uses_sdpa_attention(model: Any) -> bool:
    return any("forward" in vars(m) and vars(m)["forward"].__func__ is _sdpa_forward for m in _attention_modules(model))


def _sdpa_forward(self: Any, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  encoder_hidden_states: torch.Tensor | None = None,
                  encoder_attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
    if args or kwargs.get("output_attentions") or any(kwargs.get(name) is not None for name in CACHE_ARGUMENTS):
        return type(self).forward(self, hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                  *args, **kwargs)
    cross = encoder_hidden_states is not None
    source = encoder_hidden_states if cross else hidden_states
    mask = encoder_attention_mask if cross else attention_mask
    query = self.query(hidden_states).view(*hidden_states.shape[:-1], -1, self.attention_head_size).transpose(1, 2)
    key = self.key(source).view(*source.shape[:-1], -1, self.attention_head_size).transpose(1, 2)
    value = self.value(source).view(*source.shape[:-1], -1, self.attention_head_size).transpose(1, 2)
    dtype = torch.promote_types(query.dtype, value.dtype)  # LoRA's value may come out in float32 under autocast
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    if mask is not None:  # BLIP's additive mask (0 or the dtype's minimum), precomputed for all layers
        mask = mask.to(device=query.device, dtype=dtype)
    context = F.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                             dropout_p=self.dropout.p if self.training else 0.0)
    context = context.transpose(1, 2).reshape(*hidden_states.shape[:-1], self.all_head_size)
    return context, None
