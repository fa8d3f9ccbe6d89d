"""``dequantize_frozen_weights``: the text decoder's 4-bit layers multiply by a weight dequantized once, with
the loss, logits and LoRA gradients of bitsandbytes' own 4-bit matmuls; the 4-bit weights stay the model's,
and the copy is released for generation and after training."""

from __future__ import annotations

import pytest
import torch

from medcap_helpers import frozen_weights, generation
from medcap_helpers.model import unwrap_model
from medcap_helpers.processing import CaptionCollator
from medcap_helpers.train import train
from tests.test_attention import lora_model, loss_logits_and_gradients  # noqa: F401 - the fixture
from tests.test_multiview import two_view_rows
from tests.test_train import qlora_model, smoke_config, synthetic_rows


def four_bit_layers(model):
    return frozen_weights._frozen_4bit_layers(model)


@pytest.mark.parametrize("rows", [synthetic_rows(), two_view_rows()], ids=["one view", "two views"])
def test_dequantized_weights_give_the_same_loss_logits_and_gradients(lora_model, rows, monkeypatch) -> None:  # noqa: F811
    model, processor, config = lora_model
    batch = CaptionCollator(processor, config.max_target_tokens)(rows)
    model.train()  # checkpointing recomputes the layers in the backward pass
    four_bit = loss_logits_and_gradients(model, batch)

    layers = four_bit_layers(model)
    assert frozen_weights.dequantize_frozen_weights(model) == len(layers) > 0
    import bitsandbytes

    four_bit_matmuls = []  # the layers' weights that went through a 4-bit matmul
    original = bitsandbytes.matmul_4bit
    monkeypatch.setattr(bitsandbytes, "matmul_4bit",
                        lambda A, B, *a, **k: four_bit_matmuls.append(id(B)) or original(A, B, *a, **k))
    dequantized = loss_logits_and_gradients(model, batch)

    decoder_weights = {id(m.weight) for m in layers}
    assert four_bit_matmuls, "the vision tower (from pixels here) still multiplies in 4 bits"
    assert not decoder_weights & set(four_bit_matmuls), "a 4-bit matmul ran in the text decoder"
    torch.testing.assert_close(dequantized[0], four_bit[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dequantized[1], four_bit[1], rtol=1e-5, atol=1e-5)
    assert dequantized[2].keys() == four_bit[2].keys() and len(four_bit[2]) > 0
    for name, gradient in four_bit[2].items():
        torch.testing.assert_close(dequantized[2][name], gradient, rtol=1e-5, atol=1e-6, msg=name)
    # one weight per layer, in the dtype the layer computes in, as bitsandbytes dequantizes it
    held = frozen_weights.dequantized_bytes(model)
    assert held == sum(m.out_features * m.in_features * torch.finfo(m.compute_dtype).bits // 8 for m in layers)
    from bitsandbytes.functional import dequantize_4bit

    layer = layers[0]
    torch.testing.assert_close(vars(layer)[frozen_weights.WEIGHT],
                               dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(layer.compute_dtype),
                               rtol=0, atol=0)


def test_the_model_keeps_its_4bit_weights_and_releases_the_copy(lora_model) -> None:  # noqa: F811
    model, processor, config = lora_model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    frozen_weights.dequantize_frozen_weights(model)
    batch = CaptionCollator(processor, config.max_target_tokens)(synthetic_rows()[:4])
    model.train()
    loss_logits_and_gradients(model, batch)
    assert frozen_weights.dequantized_bytes(model) > 0
    assert model.state_dict().keys() == state.keys()  # the copy is no parameter nor buffer
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(type(m.weight).__name__ == "Params4bit" for m in four_bit_layers(model))

    held = frozen_weights.dequantized_bytes(model)
    assert frozen_weights.release_dequantized_weights(model) == held
    assert frozen_weights.dequantized_bytes(model) == 0
    loss_logits_and_gradients(model, batch)  # made again at the next call
    assert frozen_weights.dequantized_bytes(model) == held

    assert frozen_weights.use_4bit_matmuls(model) == len(four_bit_layers(model))
    assert not frozen_weights.uses_dequantized_weights(model) and frozen_weights.dequantized_bytes(model) == 0
    loss_logits_and_gradients(model, batch)
    assert frozen_weights.dequantized_bytes(model) == 0


def test_generation_gives_the_same_reports_with_the_setting(lora_model) -> None:  # noqa: F811
    model, processor, config = lora_model
    images = [row["image"] for row in synthetic_rows()[:3]]
    settings = dict(max_new_tokens=8, num_beams=2, progress=False)
    before = {copy: generation.generate_reports(model, processor, images, decoder_copy=copy, **settings)
              for copy in (True, False)}
    frozen_weights.dequantize_frozen_weights(model)
    for copy in (True, False):
        assert generation.generate_reports(model, processor, images, decoder_copy=copy, **settings) == before[copy]


def test_attach_lora_applies_the_setting_and_training_releases_the_copy(tmp_path) -> None:
    assert not frozen_weights.uses_dequantized_weights(qlora_model(smoke_config(tmp_path / "a"))[0])
    config = smoke_config(tmp_path / "b", dequantize_frozen_weights=True, num_train_epochs=1.0)
    model, processor = qlora_model(config)
    assert frozen_weights.uses_dequantized_weights(model)
    assert all(type(unwrap_model(m).weight).__name__ == "Params4bit" for m in four_bit_layers(model))

    made = []
    real_forward = frozen_weights._dequantized_forward

    def recording_forward(self, x):
        out = real_forward(self, x)
        made.append(frozen_weights.dequantized_bytes(model))
        return out

    for layer in four_bit_layers(model):  # record what is held while the Trainer trains
        layer.forward = recording_forward.__get__(layer)
    rows = synthetic_rows()
    result = train(config, model, processor, {"train": rows, "validation": rows[:4]})
    assert result.global_step > 0 and max(made) > 0
    assert frozen_weights.dequantized_bytes(model) == 0, "training must release the copy when it ends"


def test_a_model_that_is_not_quantized_is_left_alone(tmp_path) -> None:
    config = smoke_config(tmp_path, load_in_4bit=False, dequantize_frozen_weights=True)
    model, _ = qlora_model(config)
    assert four_bit_layers(model) == [] and not frozen_weights.uses_dequantized_weights(model)
