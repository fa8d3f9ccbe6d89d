"""Baselines: the most frequent training report, and nearest-neighbour retrieval on BLIP vision embeddings."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from medcap_helpers.baselines import (
    constant_baseline,
    image_embeddings,
    most_frequent_report,
    nearest_neighbour_baseline,
    vision_model_of,
)

# ------------------------------------------------------------------------------------ constant
TRAIN_TEXTS = [
    "Heart size normal. Lungs clear.",
    "Heart size normal. Lungs clear.",            # the most frequent raw string (2) ...
    "No acute cardiopulmonary abnormality.",
    "no acute cardiopulmonary abnormality",
    "NO ACUTE CARDIOPULMONARY ABNORMALITY!",
    "No acute cardiopulmonary abnormality.",      # ... but this report, normalised, occurs 4 times
    "Stable cardiomegaly.",
]


def test_most_frequent_report_counts_normalised_text_and_returns_an_original():
    assert most_frequent_report(TRAIN_TEXTS) == "No acute cardiopulmonary abnormality."


def test_most_frequent_report_ignores_order_and_breaks_ties_deterministically():
    shuffled = list(TRAIN_TEXTS)
    random.Random(1).shuffle(shuffled)
    assert most_frequent_report(shuffled) == most_frequent_report(TRAIN_TEXTS)
    # A tie (one each): the smaller normalised text wins, whatever the order.
    assert most_frequent_report(["Lungs clear.", "Heart normal."]) == "Heart normal."
    assert most_frequent_report(["Heart normal.", "Lungs clear."]) == "Heart normal."


def test_constant_baseline_repeats_the_mode():
    predictions = constant_baseline(TRAIN_TEXTS, 5)
    assert predictions == ["No acute cardiopulmonary abnormality."] * 5
    assert constant_baseline(TRAIN_TEXTS, 0) == []


@pytest.mark.parametrize("texts, n, error", [
    ([], 3, ValueError), (["...", "  "], 3, ValueError), (TRAIN_TEXTS, -1, ValueError), ([None], 1, TypeError),
])
def test_constant_baseline_rejects_bad_inputs(texts, n, error):
    with pytest.raises(error):
        constant_baseline(texts, n)


# ------------------------------------------------------------------------------------ nearest neighbour
def test_nearest_neighbour_uses_cosine_not_dot_product():
    train = np.array([[100.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    texts = ["right", "diagonal", "up"]
    queries = np.array([[3.0, 2.9], [0.1, 5.0], [7.0, 0.5]])
    assert nearest_neighbour_baseline(train, texts, queries) == ["diagonal", "up", "right"]
    assert nearest_neighbour_baseline(torch.tensor(train), texts, torch.tensor(queries)) == ["diagonal", "up", "right"]


def test_nearest_neighbour_ties_go_to_the_earlier_training_row():
    assert nearest_neighbour_baseline(np.array([[1.0, 0.0], [2.0, 0.0]]), ["first", "second"],
                                      np.array([[5.0, 0.0]])) == ["first"]


@pytest.mark.parametrize("train, texts, query", [
    (np.ones((3, 4)), ["a", "b"], np.ones((1, 4))),
    (np.ones((2, 4)), ["a", "b"], np.ones((1, 5))),
    (np.ones(4), ["a"], np.ones((1, 4))),
    (np.ones((0, 4)), [], np.ones((1, 4))),
])
def test_nearest_neighbour_rejects_mismatched_shapes(train, texts, query):
    with pytest.raises(ValueError):
        nearest_neighbour_baseline(train, texts, query)


# ------------------------------------------------------------------------------------ tiny BLIP
@pytest.fixture(scope="module")
def tiny_blip():
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
    )

    torch.manual_seed(0)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    # BLIP's vision init range defaults to 1e-10, which makes every random image embed alike;
    # 0.5 is the project's tiny-model setting (MedcapConfig.tiny_init_range).
    config = BlipConfig(text_config=dict(vocab_size=64, max_position_embeddings=32, **small),
                        vision_config=dict(image_size=32, patch_size=8, initializer_range=0.5, **small),
                        projection_dim=32)
    model = BlipForConditionalGeneration(config)
    processor = BlipImageProcessor(size={"height": 32, "width": 32})
    return model, processor


def random_images(count: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)) for _ in range(count)]


def test_image_embeddings_are_normalised_float32_cpu_and_batch_independent(tiny_blip):
    model, processor = tiny_blip
    model.train()
    images = random_images(5, seed=1)
    embeddings = image_embeddings(model, processor, images, batch_size=2, progress=False)
    assert embeddings.shape == (5, 32) and embeddings.dtype == torch.float32 and embeddings.device.type == "cpu"
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(image_embeddings(model, processor, images, batch_size=8, progress=False),
                               embeddings, atol=1e-5, rtol=1e-5)
    assert model.training  # mode restored
    assert image_embeddings(model, processor, [], progress=False).shape == (0, 32)


def test_nearest_neighbour_finds_the_same_image(tiny_blip):
    model, processor = tiny_blip
    train_images = random_images(6, seed=2)
    train_texts = [f"Report number {i}." for i in range(6)]
    train_embeddings = image_embeddings(model, processor, train_images, batch_size=4, progress=False)
    similarity = train_embeddings @ train_embeddings.T
    assert similarity.fill_diagonal_(0).max() < 0.99  # distinct images embed distinctly
    queries = [train_images[3], train_images[0], train_images[5]]
    query_embeddings = image_embeddings(model, processor, queries, progress=False)
    assert nearest_neighbour_baseline(train_embeddings, train_texts, query_embeddings) == \
        [train_texts[3], train_texts[0], train_texts[5]]


def test_image_embeddings_of_a_peft_model_match_the_base_model(tiny_blip):
    peft = pytest.importorskip("peft")
    model, processor = tiny_blip
    images = random_images(3, seed=3)
    base = image_embeddings(model, processor, images, progress=False)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["qkv"]))
    try:
        assert vision_model_of(wrapped) is model.vision_model
        # LoRA's B matrices start at zero, so the adapted vision tower gives the same embeddings.
        torch.testing.assert_close(image_embeddings(wrapped, processor, images, progress=False), base)
    finally:
        wrapped.unload()


def test_vision_model_of_rejects_models_without_a_vision_tower():
    with pytest.raises(TypeError, match="vision_model"):
        vision_model_of(torch.nn.Linear(2, 2))


def test_image_embeddings_of_a_4bit_model_retrieve_the_same_image():
    pytest.importorskip("bitsandbytes")
    from transformers import BlipConfig, BlipImageProcessor

    from medcap_helpers.model import is_quantized, random_model

    # hidden 64: bitsandbytes' CPU 4-bit kernels need layers at least one quantisation block (64) wide.
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    config = BlipConfig(text_config=dict(vocab_size=64, max_position_embeddings=32, **small),
                        vision_config=dict(image_size=32, patch_size=8, initializer_range=0.5, **small),
                        projection_dim=64)
    model = random_model(config, quantize=True, dtype=torch.bfloat16, device="cpu")
    assert is_quantized(model)
    processor = BlipImageProcessor(size={"height": 32, "width": 32})
    images = random_images(4, seed=4)
    embeddings = image_embeddings(model, processor, images, batch_size=3, progress=False)
    assert embeddings.shape == (4, 64) and embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(4))
    texts = ["a.", "b.", "c.", "d."]
    queries = image_embeddings(model, processor, [images[2], images[1]], progress=False)
    assert nearest_neighbour_baseline(embeddings, texts, queries) == ["c.", "b."]
