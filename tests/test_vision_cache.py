"""The vision-tower cache (``cache_vision_embeddings``): the same loss and logits as reading the images,
rebuilt when the model or the processor changes, skipped when the vision tower trains."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from datasets import Dataset, Features, Image, Value

from medcap_helpers import multiview, vision_cache
from medcap_helpers.processing import CaptionCollator
from medcap_helpers.train import train
from tests.test_multiview import two_view_rows
from tests.test_train import REPORTS, qlora_model, smoke_config, synthetic_rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """The 4-bit tiny BLIP with LoRA as training sees it, with non-zero LoRA B (the adapters take part)."""
    config = smoke_config(tmp_path_factory.mktemp("vision_cache"), cache_vision_embeddings=True)
    model, processor = qlora_model(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model.eval(), processor, config


def cached_collator(config, model, processor, rows, root: Path):
    cache = vision_cache.cache_for(config.replace(vision_cache_dir=str(root)), model, processor)
    assert cache is not None
    computed = vision_cache.fill_cache(cache, model, processor, [rows], progress=False)
    return vision_cache.CachedEmbeddingCollator(processor, config.max_target_tokens, cache), cache, computed


@pytest.mark.parametrize("rows", [synthetic_rows(), two_view_rows()], ids=["one view", "two views"])
def test_cached_tokens_give_the_same_loss_and_logits_as_the_images(tiny, rows, tmp_path: Path) -> None:
    model, processor, config = tiny
    collator, _, computed = cached_collator(config, model, processor, rows, tmp_path)
    assert computed == sum(1 + (row.get("image_2") is not None) for row in rows)
    from_images = CaptionCollator(processor, config.max_target_tokens)(rows)
    from_cache = collator(rows)
    assert "pixel_values" not in from_cache
    with torch.no_grad():
        expected = multiview.caption_outputs(model, from_images)
        cached = multiview.caption_outputs(model, from_cache)
    torch.testing.assert_close(cached.logits, expected.logits)
    torch.testing.assert_close(cached.loss, expected.loss)


def test_images_are_found_by_their_encoded_bytes_without_decoding(tiny, tmp_path: Path) -> None:
    """A saved dataset's rows come as PNG bytes: they are keyed without decoding and give the same loss."""
    model, processor, config = tiny
    rows = two_view_rows()
    features = Features({"image": Image(), "image_2": Image(), "text": Value("string")})
    dataset = Dataset.from_list([{k: r[k] for k in ("image", "image_2", "text")} for r in rows], features=features)
    encoded = vision_cache.without_image_decoding(dataset)
    assert isinstance(encoded[0]["image"], dict) and encoded[0]["image"]["bytes"]
    collator, cache, computed = cached_collator(config, model, processor, encoded, tmp_path)
    assert computed == 14 and len(list(cache.folder.rglob("*.npy"))) == 14
    assert vision_cache.fill_cache(cache, model, processor, [dataset], progress=False) == 0  # all reused
    batch = collator([encoded[i] for i in range(len(encoded))])
    with torch.no_grad():
        expected = multiview.caption_outputs(model, CaptionCollator(processor, config.max_target_tokens)(rows))
        torch.testing.assert_close(multiview.caption_outputs(model, batch).loss, expected.loss)


def test_the_cache_fills_window_by_window(tiny, tmp_path: Path, monkeypatch) -> None:
    """Images are read, decoded and encoded a window at a time (the next window decoding while the tower
    runs), never a whole split first: the tower has run before the last images are even looked up."""
    model, processor, config = tiny
    events: list[str] = []
    image_hash = vision_cache.image_hash
    monkeypatch.setattr(vision_cache, "image_hash", lambda image: events.append("hash") or image_hash(image))
    vision = vision_cache.unwrap_model(model).vision_model
    hook = vision.register_forward_hook(lambda *_: events.append("tower"))
    try:
        cache = vision_cache.cache_for(config.replace(vision_cache_dir=str(tmp_path)), model, processor)
        computed = vision_cache.fill_cache(cache, model, processor, [synthetic_rows()], batch_size=2,
                                           progress=False, window=2)
    finally:
        hook.remove()
    assert computed == 8 and events.count("tower") == 4
    assert events.index("tower") < len(events) - 1 - events[::-1].index("hash"), events  # before the last lookup
    assert len(list(cache.folder.rglob("*.npy"))) == 8 and not list(cache.folder.rglob("*.tmp.npy"))


def test_a_changed_processor_or_model_gets_a_new_cache(tiny, tmp_path: Path) -> None:
    model, processor, config = tiny
    key = vision_cache.cache_key(model, processor, torch.float32)
    assert vision_cache.cache_key(model, processor, torch.float32) == key  # stable
    assert vision_cache.cache_key(model, processor, torch.float16) != key
    other_processor = copy.deepcopy(processor)
    other_processor.image_processor.image_mean = [0.5, 0.5, 0.5]
    assert vision_cache.cache_key(model, other_processor, torch.float32) != key
    weight = next(vision_cache.unwrap_model(model).vision_model.parameters())
    with torch.no_grad():
        weight.add_(1e-3)
        try:
            assert vision_cache.cache_key(model, processor, torch.float32) != key
            rows = synthetic_rows()
            _, cache, computed = cached_collator(config, model, processor, rows, tmp_path)
        finally:
            weight.sub_(1e-3)
    assert computed == len(rows)
    _, fresh, recomputed = cached_collator(config, model, processor, rows, tmp_path)  # the original weights
    assert fresh.folder != cache.folder and recomputed == len(rows)


def test_the_weights_are_hashed_once_while_they_stay_the_same(tiny, monkeypatch) -> None:
    """4-bit layers pack a new quantization-state tensor at every ``state_dict()``: the memo must not
    depend on those, or every lookup rehashes the tower."""
    model, processor, _ = tiny
    vision = vision_cache.unwrap_model(model).vision_model
    key = vision_cache.cache_key(model, processor, torch.float32)
    hashed = []
    tensors = vision_cache.effective_tensors
    monkeypatch.setattr(vision_cache, "effective_tensors", lambda tower: hashed.append(1) or tensors(tower))
    assert vision_cache.cache_key(model, processor, torch.float32) == key and hashed == []
    weight = next(vision.parameters())
    with torch.no_grad():
        weight.mul_(1.0)  # the same values, changed in place: hashed again, same key
    assert vision_cache.cache_key(model, processor, torch.float32) == key and hashed == [1]


def test_the_key_follows_the_values_the_tower_computes_with_not_their_storage(tiny) -> None:
    """A 4-bit weight counts by its dequantized value, any other tensor by its value: a LayerNorm cast to
    float64 with the same values keeps the key, one changed value does not."""
    model, processor, _ = tiny
    vision = vision_cache.unwrap_model(model).vision_model
    quantized = [n for n, p in vision.named_parameters() if type(p).__name__ == "Params4bit"]
    assert quantized, "the tiny tower should have 4-bit layers"
    dequantized = dict(vision_cache.effective_tensors(vision))
    assert all(dequantized[n].is_floating_point() and dequantized[n].dim() == 2 for n in quantized)
    key = vision_cache.cache_key(model, processor, torch.float32)
    norm = vision.post_layernorm
    original = norm.weight.data
    try:
        norm.weight.data = original.to(torch.float64)
        assert vision_cache.cache_key(model, processor, torch.float32) == key
        norm.weight.data = original.to(torch.float64) + 1e-3
        assert vision_cache.cache_key(model, processor, torch.float32) != key
    finally:
        norm.weight.data = original
    assert vision_cache.cache_key(model, processor, torch.float32) == key


def test_a_missing_image_says_to_fill_the_cache(tiny, tmp_path: Path) -> None:
    model, processor, config = tiny
    collator, _, _ = cached_collator(config, model, processor, synthetic_rows()[:2], tmp_path)
    with pytest.raises(FileNotFoundError, match="prepare_cache"):
        collator(synthetic_rows()[2:4])


def test_the_cache_is_skipped_when_the_vision_tower_trains(tmp_path: Path) -> None:
    config = smoke_config(tmp_path, cache_vision_embeddings=True, load_in_4bit=False, lora_vision=True,
                          num_train_epochs=1.0)
    model, processor = qlora_model(config)
    assert vision_cache.vision_tower_trains(model)
    assert vision_cache.cache_for(config, model, processor) is None
    rows = synthetic_rows()
    train(config, model, processor, {"train": rows, "validation": rows})
    assert not (tmp_path / vision_cache.CACHE_FOLDER).exists()


def test_the_base_model_of_02_and_a_merged_model_use_the_cache(tiny, tmp_path: Path) -> None:
    """Only a peft model whose vision parameters take gradients skips it: a freshly loaded base model has
    every requires_grad flag on and trains nothing (02 used to skip the cache for that reason)."""
    from medcap_helpers.model import load_model_and_processor

    _, processor, config = tiny
    config = config.replace(run_dir=str(tmp_path))
    base, _ = load_model_and_processor(config, texts=REPORTS)
    assert any(p.requires_grad for p in base.vision_model.parameters())  # as loaded
    assert not vision_cache.vision_tower_trains(base)
    assert vision_cache.cache_for(config, base, processor) is not None
    assert not vision_cache.vision_tower_trains(tiny[0])  # LoRA in the decoder only


def test_training_on_cached_tokens_follows_the_same_loss_curve(tmp_path: Path) -> None:
    """Stage 03 with and without the cache, on two-view studies from a saved-style dataset."""
    rows = two_view_rows()
    features = Features({"image": Image(), "image_2": Image(), "text": Value("string"), "image_id": Value("string")})
    dataset = Dataset.from_list([{k: r[k] for k in ("image", "image_2", "text", "image_id")} for r in rows],
                                features=features)
    curves, scores = {}, {}
    for cached in (False, True):
        config = smoke_config(tmp_path / str(cached), views="both", num_train_epochs=3.0,
                              cache_vision_embeddings=cached, load_in_4bit=False)
        model, processor = qlora_model(config)
        result = train(config, model, processor, {"train": dataset, "validation": dataset})
        curves[cached] = [e["loss"] for e in result.log_history if "loss" in e]
        scores[cached] = [(e["val_cider"], e["val_ce_micro_f1"]) for e in result.history]  # reports from tokens
    assert scores[True] == scores[False] and len(scores[True]) == 3
    assert len(list((tmp_path / "True" / vision_cache.CACHE_FOLDER).rglob("*.npy"))) == 14
    assert not (tmp_path / "False" / vision_cache.CACHE_FOLDER).exists()
    assert len(curves[True]) == len(curves[False]) >= 3
    torch.testing.assert_close(torch.tensor(curves[True]), torch.tensor(curves[False]), rtol=1e-4, atol=1e-4)


def test_the_budget_probe_trains_on_what_training_reads(tiny, tmp_path: Path) -> None:
    """With the cache, the probe's costliest batch is made of cached tokens (no vision-tower activations,
    as in training); without it, of pixels."""
    from medcap_helpers import budget

    model, processor, config = tiny
    rows = two_view_rows()
    features = Features({"image": Image(), "image_2": Image(), "text": Value("string")})
    dataset = Dataset.from_list([{k: r[k] for k in ("image", "image_2", "text")} for r in rows], features=features)
    cached_config = config.replace(vision_cache_dir=str(tmp_path))
    collator, probe_rows = budget.probe_inputs(cached_config, model, processor, dataset)
    batch = collator(budget.costliest_rows(probe_rows, 4))
    assert set(batch) == {"image_embeds", "input_ids", "attention_mask", "labels"}
    vision = vision_cache.unwrap_model(model).config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    assert batch["image_embeds"].shape == (4, 2 * tokens, vision.hidden_size)  # both views' tokens
    assert len(list(tmp_path.rglob("*.npy"))) == 14, "the probe cached the training images for training"
    collator, probe_rows = budget.probe_inputs(config.replace(cache_vision_embeddings=False), model, processor, dataset)
    assert collator(budget.costliest_rows(probe_rows, 4))["pixel_values"].shape[:2] == (4, 2)


@pytest.mark.parametrize("views", ["one", "two"])
def test_reports_generated_from_cached_tokens_are_the_images_reports(tiny, views: str, tmp_path: Path) -> None:
    """generate_for_split with the cache: every study's tokens read from disk (none computed for a second
    split call), the same reports as from the images, one-view studies padded as the images are."""
    from medcap_helpers import generation

    model, processor, config = tiny
    rows = two_view_rows() if views == "two" else synthetic_rows()
    columns = {"image": Image(), "text": Value("string")} | ({"image_2": Image()} if views == "two" else {})
    split = Dataset.from_list([{k: r[k] for k in columns} for r in rows], features=Features(columns))
    settings = dict(max_new_tokens=8, num_beams=2, eval_batch_size=3)
    from_images = generation.generate_for_split(model, processor, split, config.replace(
        cache_vision_embeddings=False, **settings))
    cached_config = config.replace(vision_cache_dir=str(tmp_path), **settings)
    inputs = generation.generation_inputs(model, processor, split, cached_config)
    assert isinstance(inputs, vision_cache.StudyTokens) and len(list(tmp_path.rglob("*.npy"))) == \
        sum(1 + (r.get("image_2") is not None) for r in rows)
    vision = vision_cache.unwrap_model(model).vision_model
    calls: list[int] = []
    hook = vision.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        from_cache = generation.generate_for_split(model, processor, split, cached_config)
    finally:
        hook.remove()
    assert calls == [], "the vision tower ran although every study's tokens were cached"
    assert from_cache == from_images and len(set(from_images)) > 1


@pytest.mark.parametrize("views", ["one", "two"])
def test_the_nearest_neighbour_embeds_studies_from_cached_tokens_as_from_images(tiny, views: str,
                                                                                 tmp_path: Path) -> None:
    from medcap_helpers import baselines, generation

    model, processor, config = tiny
    rows = two_view_rows() if views == "two" else synthetic_rows()
    columns = {"image": Image(), "text": Value("string")} | ({"image_2": Image()} if views == "two" else {})
    split = Dataset.from_list([{k: r[k] for k in columns} for r in rows], features=Features(columns))
    norm = vision_cache.unwrap_model(model).vision_model.post_layernorm
    saved = [p.detach().clone() for p in norm.parameters()]
    with torch.no_grad():  # trained-like: BLIP's pooler applies it a second time, idempotent only at 1 and 0
        norm.weight.normal_(1.0, 0.3, generator=torch.Generator().manual_seed(0))
        norm.bias.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(1))
    try:
        from_images = baselines.image_embeddings(model, processor, generation.study_inputs(split), batch_size=3,
                                                 progress=False)
        from_cache = baselines.study_embeddings(model, processor, split,
                                                config.replace(vision_cache_dir=str(tmp_path)), 3)
    finally:
        with torch.no_grad():
            for param, original in zip(norm.parameters(), saved):
                param.copy_(original)
    assert len(list(tmp_path.rglob("*.npy"))) == sum(1 + (r.get("image_2") is not None) for r in rows)
    torch.testing.assert_close(from_cache, from_images, rtol=1e-5, atol=1e-5)
    assert from_cache.shape[0] == len(rows) and not torch.allclose(from_cache[0], from_cache[1])
