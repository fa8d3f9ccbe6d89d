"""Both views as one input: the concatenated memory reproduces BLIP exactly for one view, and a study
with fewer views reads the same alone as padded in a batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medcap_helpers import multiview
from medcap_helpers.processing import CaptionCollator, stack_views
from tests.test_train import qlora_model, smoke_config, synthetic_rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    config = smoke_config(tmp_path_factory.mktemp("multiview"), load_in_4bit=False, gradient_checkpointing=False)
    model, processor = qlora_model(config)
    with torch.no_grad():  # non-zero LoRA B, so the adapters take part in every comparison
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model.eval(), processor, config


def pixels(processor, rows) -> torch.Tensor:
    return processor.image_processor(images=[r["image"] for r in rows], return_tensors="pt")["pixel_values"]


def test_one_view_is_exactly_blips_own_forward_and_generate(tiny) -> None:
    model, processor, config = tiny
    rows = synthetic_rows()[:3]
    batch = CaptionCollator(processor, config.max_target_tokens)(rows)
    with torch.no_grad():
        reference = model(**batch)
        ours = multiview.multiview_forward(model, batch["pixel_values"][:, None],
                                           batch["input_ids"], batch["attention_mask"], batch["labels"])
    torch.testing.assert_close(ours.loss, reference.loss)
    torch.testing.assert_close(ours.logits, reference.logits)
    expected = model.generate(pixel_values=batch["pixel_values"], max_new_tokens=12, num_beams=2)
    generated = multiview.multiview_generate(model, batch["pixel_values"][:, None],
                                             max_new_tokens=12, num_beams=2)
    assert generated.tolist() == expected.tolist()


def test_two_views_make_twice_the_memory_and_both_are_read(tiny) -> None:
    model, processor, _ = tiny
    rows = synthetic_rows()
    both = torch.stack([pixels(processor, rows[:2]), pixels(processor, rows[2:4])])  # 2 studies x 2 views
    with torch.no_grad():
        memory = multiview.view_tokens(model, both)
        single = multiview.view_tokens(model, both[:, :1])
        assert memory.shape[1] == 2 * single.shape[1]
        torch.testing.assert_close(memory[:, :single.shape[1]], single)
        loss_a = multiview.multiview_forward(model, both, *_ids(processor))
        loss_b = multiview.multiview_forward(model, both[:, [0, 0]], *_ids(processor))
    assert not torch.allclose(loss_a.loss, loss_b.loss), "the second view changes nothing: it is not read"


def _ids(processor):
    encoded = processor.tokenizer(["Heart size is normal.", "Small left pleural effusion."], padding=True,
                                  return_tensors="pt")
    ids = encoded["input_ids"].clone()
    ids[:, 0] = processor.tokenizer.bos_token_id
    return ids, encoded["attention_mask"], ids.masked_fill(encoded["attention_mask"] == 0, -100)


def test_a_one_view_study_reads_the_same_alone_and_padded_in_a_batch(tiny) -> None:
    model, processor, _ = tiny
    rows = synthetic_rows()
    alone = pixels(processor, rows[:1])[None]                              # 1 study x 1 view
    padded, counts = stack_views([pixels(processor, rows[:1]), pixels(processor, rows[1:3])])
    assert counts.tolist() == [1, 2] and padded.shape[:2] == (2, 2)
    torch.testing.assert_close(padded[0, 1], padded[0, 0])                 # padded with its own view
    ids, attention, labels = _ids(processor)
    with torch.no_grad():
        one = multiview.multiview_forward(model, alone, ids[:1], attention[:1], labels[:1])
        two = multiview.multiview_forward(model, padded, ids, attention, labels)
    torch.testing.assert_close(two.logits[:1], one.logits, rtol=1e-4, atol=1e-4)
    generated_alone = multiview.multiview_generate(model, alone, max_new_tokens=10)
    generated_padded = multiview.multiview_generate(model, padded, max_new_tokens=10)
    assert generated_alone.tolist()[0] == generated_padded.tolist()[0][:len(generated_alone.tolist()[0])]


def test_blips_decoder_still_ignores_a_cross_attention_mask(tiny) -> None:
    """Why short studies are padded by repetition: transformers' BLIP drops ``encoder_attention_mask``.
    If this starts failing, transformers fixed it and a mask could be used instead."""
    model, processor, _ = tiny
    rows = synthetic_rows()
    both = torch.stack([pixels(processor, rows[:2])])
    memory = multiview.view_tokens(model, both)
    half = torch.ones(memory.shape[:2], dtype=torch.long)
    half[:, memory.shape[1] // 2:] = 0
    ids, attention, _ = _ids(processor)
    decoder = model.get_base_model().text_decoder
    with torch.no_grad():
        masked = decoder(input_ids=ids[:1], attention_mask=attention[:1], encoder_hidden_states=memory,
                         encoder_attention_mask=half).logits
        unmasked = decoder(input_ids=ids[:1], attention_mask=attention[:1], encoder_hidden_states=memory).logits
    torch.testing.assert_close(masked, unmasked)


def two_view_rows() -> list[dict]:
    """Synthetic studies: the second view is another rendering of the same study (None for two of them)."""
    rows = synthetic_rows()
    for i, row in enumerate(rows):
        row["image_2"] = None if i in (2, 5) else row["image"].rotate(90)
    return rows


def test_the_collator_stacks_both_views(tiny) -> None:
    _, processor, config = tiny
    rows = two_view_rows()[:4]
    batch = CaptionCollator(processor, config.max_target_tokens)(rows)
    assert batch["pixel_values"].shape[:2] == (4, 2)
    torch.testing.assert_close(batch["pixel_values"][2, 1], batch["pixel_values"][2, 0])  # one-view study
    single = CaptionCollator(processor, config.max_target_tokens)([{**r, "image_2": None} for r in rows])
    assert single["pixel_values"].ndim == 4


def test_qlora_trains_and_generates_on_two_view_studies(tmp_path: Path) -> None:
    from medcap_helpers.train import train

    config = smoke_config(tmp_path, views="both", num_train_epochs=6.0)
    model, processor = qlora_model(config)
    rows = two_view_rows()
    result = train(config, model, processor, {"train": rows, "validation": rows})
    losses = [e["train_loss"] for e in result.history]
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(e["val_cider"] is not None for e in result.history)
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


def test_caption_outputs_takes_one_view_or_several(tiny) -> None:
    """The loss the Trainer and the budget probe compute: BLIP's own for one view, the views' joint memory
    for a (batch, views, ...) batch — the probe once called BLIP directly and failed on two views."""
    model, processor, config = tiny
    rows = synthetic_rows()[:2]
    batch = CaptionCollator(processor, config.max_target_tokens)(rows)
    two_views = dict(batch, pixel_values=torch.stack([batch["pixel_values"], batch["pixel_values"].flip(0)], dim=1))
    with torch.no_grad():
        torch.testing.assert_close(multiview.caption_outputs(model, batch).loss, model(**batch).loss)
        expected = multiview.multiview_forward(model, **two_views).loss
        torch.testing.assert_close(multiview.caption_outputs(model, two_views).loss, expected)
        assert not torch.allclose(expected, model(**batch).loss)


def test_a_frozen_vision_tower_runs_in_chunks_without_autograd_and_a_trained_one_keeps_its_gradients(
        tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    model, processor, _ = tiny
    rows = synthetic_rows()
    both = torch.stack([pixels(processor, rows[:2]), pixels(processor, rows[2:4]), pixels(processor, rows[:2])])
    calls: list[int] = []
    vision = multiview.unwrap_model(model).vision_model
    hook = vision.register_forward_pre_hook(lambda _, args, kwargs: calls.append(len(kwargs["pixel_values"])),
                                            with_kwargs=True)
    try:
        monkeypatch.setattr(multiview, "FROZEN_VISION_CHUNK", 4)
        chunked = multiview.view_tokens(model, both)  # 6 images: chunks of 4 and 2
        assert calls == [4, 2] and not chunked.requires_grad
        monkeypatch.setattr(multiview, "FROZEN_VISION_CHUNK", 64)
        torch.testing.assert_close(multiview.view_tokens(model, both), chunked)
        assert calls[2:] == [6]
        first = next(vision.parameters())
        first.requires_grad_(True)  # lora_vision: the tower trains, so gradients must reach it
        try:
            multiview.view_tokens(model, both).sum().backward()
            assert calls[3:] == [6] and first.grad is not None and first.grad.abs().sum() > 0
        finally:
            first.requires_grad_(False)
            first.grad = None
    finally:
        hook.remove()
