"""``sdpa_attention``: the text decoder's attention through ``scaled_dot_product_attention`` computes what
BLIP's eager attention computes (loss, logits, LoRA gradients), and generation is left as it was."""

from __future__ import annotations

import pytest
import torch

from medcap_helpers import attention, generation
from medcap_helpers.multiview import caption_outputs
from medcap_helpers.processing import CaptionCollator
from tests.test_multiview import two_view_rows
from tests.test_train import qlora_model, smoke_config, synthetic_rows


@pytest.fixture
def lora_model(tmp_path):
    """The 4-bit tiny BLIP with LoRA (checkpointing on, as the full profile trains), non-zero LoRA B."""
    config = smoke_config(tmp_path)
    model, processor = qlora_model(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model, processor, config


def loss_logits_and_gradients(model, batch):
    model.zero_grad(set_to_none=True)
    outputs = caption_outputs(model, batch)
    outputs.loss.backward()
    gradients = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return outputs.loss.detach(), outputs.logits.detach(), gradients


@pytest.mark.parametrize("rows", [synthetic_rows(), two_view_rows()], ids=["one view", "two views"])
def test_sdpa_attention_gives_the_same_loss_logits_and_gradients(lora_model, rows, monkeypatch) -> None:
    model, processor, config = lora_model
    batch = CaptionCollator(processor, config.max_target_tokens)(rows)  # reports of different lengths: padded
    assert (batch["attention_mask"] == 0).any(), "the batch must be padded for the mask to matter"
    model.train()  # checkpointing recomputes the layers in the backward pass
    eager = loss_logits_and_gradients(model, batch)

    assert attention.use_sdpa_attention(model) == len(attention._attention_modules(model)) > 0
    fused_calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention",
                        lambda *a, **k: fused_calls.append(1) or sdpa(*a, **k))
    fused = loss_logits_and_gradients(model, batch)

    assert fused_calls, "the fused path was not taken"
    torch.testing.assert_close(fused[0], eager[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[1], eager[1], rtol=1e-4, atol=1e-4)
    assert fused[2].keys() == eager[2].keys() and len(eager[2]) > 0
    for name, gradient in eager[2].items():
        torch.testing.assert_close(fused[2][name], gradient, rtol=1e-4, atol=1e-5, msg=name)


def test_generation_with_a_key_value_cache_runs_blips_own_attention(lora_model, monkeypatch) -> None:
    model, processor, config = lora_model
    images = [row["image"] for row in synthetic_rows()[:3]]
    settings = dict(max_new_tokens=8, num_beams=2, progress=False, decoder_copy=False)
    before = generation.generate_reports(model, processor, images, **settings)
    attention.use_sdpa_attention(model)
    fused_calls = []
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", lambda *a, **k: fused_calls.append(1))
    assert generation.generate_reports(model, processor, images, **settings) == before
    assert fused_calls == []


def test_attach_lora_applies_the_setting(tmp_path) -> None:
    assert not attention.uses_sdpa_attention(qlora_model(smoke_config(tmp_path / "a"))[0])
    assert attention.uses_sdpa_attention(qlora_model(smoke_config(tmp_path / "b", sdpa_attention=True))[0])
