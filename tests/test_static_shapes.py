"""Training levers' plumbing: batches padded to one shape (for CUDA graphs) compute the same loss and
gradients; checkpointing can skip some decoder layers; the dequantized weights can be made up front."""

from __future__ import annotations

import pytest
import torch

from medcap_helpers import budget, frozen_weights
from medcap_helpers.model import checkpoint_decoder_layers, enable_gradient_checkpointing, unwrap_model
from medcap_helpers.processing import CaptionCollator, pad_to_static_shape
from tests.test_attention import lora_model, loss_logits_and_gradients  # noqa: F401 - the fixture
from tests.test_train import synthetic_rows


def cached_batch(model, processor, config, rows):
    """A collated batch with the vision tower's tokens in place of pixels, as the vision cache feeds it."""
    batch = CaptionCollator(processor, config.max_target_tokens)(rows)
    with torch.no_grad():
        batch["image_embeds"] = unwrap_model(model).vision_model(pixel_values=batch.pop("pixel_values"))[0]
    return batch


def test_a_batch_padded_to_one_shape_gives_the_same_loss_and_gradients(lora_model) -> None:  # noqa: F811
    model, processor, config = lora_model
    batch = cached_batch(model, processor, config, synthetic_rows()[:5])
    rows, length = batch["input_ids"].shape
    tokens = batch["image_embeds"].shape[1]
    model.train()
    plain = loss_logits_and_gradients(model, batch)

    padded = pad_to_static_shape(batch, rows=8, length=length + 7, pad_token_id=processor.tokenizer.pad_token_id,
                                 view_tokens=tokens)
    assert padded["input_ids"].shape == padded["labels"].shape == padded["attention_mask"].shape == (8, length + 7)
    assert padded["image_embeds"].shape == (8, 2 * tokens, batch["image_embeds"].shape[2])  # one view: twice
    assert (padded["labels"][rows:] == -100).all() and (padded["labels"][:, length:] == -100).all()
    assert (padded["attention_mask"][rows:, 0] == 1).all(), "a filler attends to its start token (no empty row)"
    same_shape = loss_logits_and_gradients(model, padded)

    torch.testing.assert_close(same_shape[0], plain[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(same_shape[1][:rows, :length], plain[1], rtol=1e-4, atol=1e-4)
    assert same_shape[2].keys() == plain[2].keys() and len(plain[2]) > 0
    for name, gradient in plain[2].items():
        torch.testing.assert_close(same_shape[2][name], gradient, rtol=1e-4, atol=1e-6, msg=name)


def test_padding_leaves_what_already_has_the_shape_and_refuses_a_larger_batch(lora_model) -> None:  # noqa: F811
    model, processor, config = lora_model
    batch = cached_batch(model, processor, config, synthetic_rows()[:4])
    rows, length = batch["input_ids"].shape
    two_views = dict(batch, image_embeds=torch.cat([batch["image_embeds"]] * 2, dim=1))
    padded = pad_to_static_shape(two_views, rows, length, processor.tokenizer.pad_token_id,
                                 view_tokens=batch["image_embeds"].shape[1])
    for key, tensor in two_views.items():
        assert torch.equal(padded[key], tensor), key
    one_view = pad_to_static_shape(batch, rows, length, processor.tokenizer.pad_token_id, view_tokens=None)
    assert torch.equal(one_view["image_embeds"], batch["image_embeds"]), "views=single: one view stays one"
    with pytest.raises(ValueError, match="larger than"):
        pad_to_static_shape(batch, rows - 1, length, processor.tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="larger than"):
        pad_to_static_shape(batch, rows, length - 1, processor.tokenizer.pad_token_id)


def test_checkpointing_can_skip_some_decoder_layers_with_the_same_gradients(lora_model) -> None:  # noqa: F811
    model, processor, config = lora_model
    batch = CaptionCollator(processor, config.max_target_tokens)(synthetic_rows()[:4])
    layers = unwrap_model(model).text_decoder.bert.encoder.layer
    model.train()
    enable_gradient_checkpointing(model)
    every_layer = loss_logits_and_gradients(model, batch)
    assert checkpoint_decoder_layers(model, 1) == 1
    assert [layer.gradient_checkpointing for layer in layers] == [True] + [False] * (len(layers) - 1)
    first_only = loss_logits_and_gradients(model, batch)
    torch.testing.assert_close(first_only[0], every_layer[0])
    for name, gradient in every_layer[2].items():
        torch.testing.assert_close(first_only[2][name], gradient, msg=name)
    assert checkpoint_decoder_layers(model, None) == len(layers)
    assert all(layer.gradient_checkpointing for layer in layers)
    with pytest.raises(ValueError, match="between 0 and"):
        checkpoint_decoder_layers(model, len(layers) + 1)
    candidate = budget.TrainingCandidate(4, 1, True, checkpointed_layers=1)
    assert candidate.describe() == "batch 4 × accumulation 1, checkpointing in 1 decoder layers"


def test_the_dequantized_weights_can_be_made_before_the_first_call(lora_model) -> None:  # noqa: F811
    model, _, _ = lora_model
    assert frozen_weights.make_dequantized_weights(model) == 0, "nothing is made before the layers use copies"
    layers = frozen_weights.dequantize_frozen_weights(model)
    assert frozen_weights.dequantized_bytes(model) == 0
    assert frozen_weights.make_dequantized_weights(model) == layers > 0
    held = frozen_weights.dequantized_bytes(model)
    assert held > 0 and frozen_weights.make_dequantized_weights(model) == 0, "made once, then read"
    assert frozen_weights.release_dequantized_weights(model) == held
    assert frozen_weights.make_dequantized_weights(model) == layers
