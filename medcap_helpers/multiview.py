"""Both views of a study as one input (``views="both"``), as published IU X-Ray systems read them.

Each image of a study goes through BLIP's frozen vision tower on its own; the image tokens of the
views are concatenated into one cross-attention memory for the text decoder (2 x 577 = 1,154 tokens
at BLIP-large's 384 px), with an attention mask that hides the tokens of a missing view, so a study
with one image works in a batch of studies with two. R2Gen (Chen et al., 2020) concatenates the two
views' visual features the same way. With one view and a full mask this is exactly BLIP's own
``forward``/``generate`` (a test checks it).

Batches carry ``pixel_values`` of shape (batch, views, 3, H, W) and ``view_mask`` (batch, views).
"""

from __future__ import annotations

from typing import Any

import torch

from medcap_helpers.model import unwrap_model

FROZEN_VISION_CHUNK = 8
"""Images per pass through a frozen vision tower. Its attention scores are transient but large
(BLIP-large: 16 heads x 577 x 577 per image, in fp32, scores and softmax both alive): 32 images at once
(16 two-view studies) need 1.4 GB for them alone, a third of a 4 GB budget; 8 at a time need a quarter of
that, for the same tokens."""


def view_tokens(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """The decoder's memory: every view's image tokens side by side, (batch, views x tokens, hidden).

    A frozen vision tower (nothing in it trains) runs without autograd, :data:`FROZEN_VISION_CHUNK`
    images at a time."""
    base = unwrap_model(model)
    batch, views = pixel_values.shape[:2]
    images = pixel_values.reshape(batch * views, *pixel_values.shape[2:])
    if any(p.requires_grad for p in base.vision_model.parameters()):
        embeds = base.vision_model(pixel_values=images)[0]
    else:
        with torch.no_grad():
            embeds = torch.cat([base.vision_model(pixel_values=chunk)[0]
                                for chunk in images.split(FROZEN_VISION_CHUNK)])
    return embeds.reshape(batch, views * embeds.shape[1], embeds.shape[-1])


def multiview_forward(model: Any, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> Any:
    """BLIP's captioning forward (mean loss over the batch) with the views' tokens as memory."""
    return unwrap_model(model).text_decoder(input_ids=input_ids, attention_mask=attention_mask,
                                            encoder_hidden_states=view_tokens(model, pixel_values),
                                            labels=labels, reduction="mean")


def caption_outputs(model: Any, batch: dict[str, torch.Tensor]) -> Any:
    """The model's outputs (``.loss``: mean over the batch) for a collated batch of one or several views.

    Both go through ``model``'s own call, wrappers included: a ``DistributedDataParallel`` wrapper must
    see every forward, or the processes' gradients are not averaged (:func:`accept_views`)."""
    if "image_embeds" in batch or batch["pixel_values"].ndim == 5:
        accept_views(model)
    return model(**batch)


def accept_views(model: Any) -> None:
    """Let the BLIP model inside ``model`` (peft, DDP) take two-view batches (:func:`multiview_forward`) and
    cached image tokens (``image_embeds``) in its own ``forward``; one-view batches of pixels still reach
    BLIP's ``forward`` unchanged. Idempotent."""
    base = unwrap_model(model)
    if getattr(base, "_medcap_accepts_views", False):
        return
    blip_forward = base.forward

    def forward(pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                image_embeds: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if image_embeds is not None:  # the vision tower's tokens, cached (medcap_helpers.vision_cache)
            return base.text_decoder(input_ids=input_ids, attention_mask=attention_mask,
                                     encoder_hidden_states=image_embeds, labels=labels, reduction="mean")
        if pixel_values is not None and pixel_values.ndim == 5:
            return multiview_forward(base, pixel_values, input_ids, attention_mask, labels)
        return blip_forward(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                            labels=labels, **kwargs)

    base.forward = forward
    base._medcap_accepts_views = True


@torch.no_grad()
def multiview_generate(model: Any, pixel_values: torch.Tensor, decoder: Any = None, **generate_kwargs: Any) -> torch.Tensor:
    """BLIP's ``generate`` (start from ``[DEC]``, stop on ``[SEP]``) on the views' tokens; token ids out.

    ``decoder`` writes the reports instead of the model's own text decoder (a faster 16-bit copy of it:
    :func:`medcap_helpers.generation.decoder_for_generation`).
    """
    return generate_from_tokens(model, view_tokens(unwrap_model(model), pixel_values), decoder, **generate_kwargs)


def generate_from_tokens(model: Any, memory: torch.Tensor, decoder: Any = None, **generate_kwargs: Any) -> torch.Tensor:
    """:func:`multiview_generate` from the image tokens themselves, (studies, tokens, hidden): cached ones
    (:mod:`medcap_helpers.vision_cache`) need no vision tower."""
    base = unwrap_model(model)
    decoder = decoder if decoder is not None else base.text_decoder
    memory = memory.to(device=next(decoder.parameters()).device, dtype=decoder.dtype)
    text = base.config.text_config
    start = torch.full((memory.shape[0], 1), text.bos_token_id, dtype=torch.long, device=memory.device)
    return decoder.generate(input_ids=start, eos_token_id=text.sep_token_id, pad_token_id=text.pad_token_id,
                            encoder_hidden_states=memory, **generate_kwargs)
