"""Offline BLIP processor, processor loading and the caption collator."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from medcap_helpers.config import MedcapConfig
from medcap_helpers.processing import (
    CLIP_MEAN,
    CLIP_STD,
    CaptionCollator,
    ProcessorLoadError,
    build_offline_processor,
    load_processor,
    wordpiece_vocabulary,
)

REPORTS = [
    "The heart size is normal. The lungs are clear.",
    "Small left pleural effusion.",
    "No acute cardiopulmonary disease.",
    "Mild cardiomegaly with clear lungs and no pneumothorax.",
]


@pytest.fixture(scope="module")
def processor():
    return build_offline_processor(REPORTS, image_size=64)


def test_image_processor_has_blip_large_settings(blip_large_reference):
    reference = json.loads(blip_large_reference.read_text())["image_processor"]
    image_processor = build_offline_processor(REPORTS).image_processor  # default size = BLIP-large's
    assert dict(image_processor.size)["height"] == reference["size"]["height"] == 384
    assert dict(image_processor.size)["width"] == reference["size"]["width"]
    assert int(image_processor.resample) == reference["resample"] == 3  # bicubic
    assert image_processor.rescale_factor == pytest.approx(reference["rescale_factor"])
    assert list(image_processor.image_mean) == pytest.approx(reference["image_mean"])
    assert list(image_processor.image_std) == pytest.approx(reference["image_std"])
    assert list(CLIP_MEAN) == pytest.approx(reference["image_mean"]) and list(CLIP_STD) == pytest.approx(reference["image_std"])
    assert image_processor.do_convert_rgb and image_processor.do_normalize and image_processor.do_rescale


def test_image_size_is_configurable_and_grey_images_become_rgb(processor):
    grey = Image.new("L", (120, 90), 128)
    pixels = processor.image_processor(images=[grey], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 64, 64)
    # mid-grey 128/255 normalised with CLIP statistics, channel by channel
    expected = (torch.tensor([128 / 255] * 3) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert pixels[0, :, 32, 32] == pytest.approx(expected.tolist(), abs=1e-3)


def test_tokenizer_special_tokens_follow_blip(processor, blip_large_reference):
    reference = json.loads(blip_large_reference.read_text())["tokenizer"]
    tokenizer = processor.tokenizer
    assert tokenizer.pad_token_id == 0
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 1, 2, 3, 4]
    assert tokenizer.bos_token == reference["bos_token"] == "[DEC]"
    # like BLIP's tokenizer, [DEC] and [ENC] are the last two ids
    assert tokenizer.bos_token_id == len(tokenizer) - 2
    assert tokenizer.convert_tokens_to_ids("[ENC]") == len(tokenizer) - 1
    encoded = tokenizer("The Heart is NORMAL.")["input_ids"]
    assert encoded[0] == tokenizer.cls_token_id and encoded[-1] == tokenizer.sep_token_id
    assert tokenizer.unk_token_id not in encoded
    assert tokenizer.decode(encoded, skip_special_tokens=True) == "the heart is normal."


def test_vocabulary_is_deterministic_and_capped():
    first = wordpiece_vocabulary(REPORTS * 3, vocab_size=70)
    assert first == wordpiece_vocabulary(list(REPORTS * 3), vocab_size=70)
    assert len(first) == 70
    assert wordpiece_vocabulary(REPORTS)["[PAD]"] == 0
    with pytest.raises(ValueError, match="no text"):
        wordpiece_vocabulary(["", "  "])


def test_processor_round_trips_offline(processor, tmp_path):
    from transformers import BlipProcessor

    processor.save_pretrained(tmp_path)
    loaded = BlipProcessor.from_pretrained(str(tmp_path))
    assert loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert loaded.tokenizer.bos_token_id == processor.tokenizer.bos_token_id
    assert dict(loaded.image_processor.size)["height"] == 64
    text = REPORTS[3] + " unseenword"
    assert loaded.tokenizer(text)["input_ids"] == processor.tokenizer(text)["input_ids"]
    image = Image.new("RGB", (70, 50), (10, 200, 30))
    assert torch.allclose(loaded.image_processor(images=[image], return_tensors="pt")["pixel_values"],
                          processor.image_processor(images=[image], return_tensors="pt")["pixel_values"], atol=1e-6)


def test_load_processor_tiny_and_errors(tmp_path):
    config = MedcapConfig.from_profile("smoke", run_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="texts="):
        load_processor(config)
    tiny = load_processor(config, REPORTS)
    assert tiny.tokenizer.bos_token == "[DEC]"

    missing = MedcapConfig.from_profile("smoke", run_dir=str(tmp_path / "run"), model_name=str(tmp_path / "nope"))
    with pytest.raises(ProcessorLoadError, match="does not exist"):
        load_processor(missing)
    offline = MedcapConfig.from_profile("full", run_dir=str(tmp_path / "run"))  # hub id; the hub is offline
    with pytest.raises(ProcessorLoadError, match="internet connection"):
        load_processor(offline)


def _rows(texts):
    colours = [(255, 0, 0), (0, 0, 255), (0, 160, 0), (255, 255, 255)]
    return [{"image": Image.new("RGB", (80, 80), colours[i % 4]), "text": t, "study_id": str(i)}
            for i, t in enumerate(texts)]


def test_collator_labels_padding_and_first_token(processor):
    collator = CaptionCollator(processor, max_length=64)
    batch = collator(_rows(REPORTS))
    tokenizer = processor.tokenizer
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert batch["pixel_values"].shape == (4, 3, 64, 64)
    assert ids.shape == mask.shape == labels.shape
    # the first token is [DEC], what BLIP's generate() starts from (not the tokenizer's [CLS])
    assert (ids[:, 0] == tokenizer.bos_token_id).all()
    # attention mask = real tokens; labels = ids there and -100 on padding
    lengths = [len(tokenizer(t)["input_ids"]) for t in REPORTS]
    assert mask.sum(1).tolist() == lengths
    assert (labels[mask == 1] == ids[mask == 1]).all()
    assert (labels[mask == 0] == -100).all() and (ids[mask == 0] == tokenizer.pad_token_id).all()
    assert (mask == 0).any(), "reports of different lengths must produce padding"
    # every report ends with [SEP], the token generate() stops on
    for row, length in enumerate(lengths):
        assert ids[row, length - 1] == tokenizer.sep_token_id


def test_collator_truncates_to_max_length_keeping_the_stop_token(processor):
    long_report = " ".join(["the lungs are clear and the heart is normal."] * 20)
    batch = CaptionCollator(processor, max_length=12)(_rows([long_report, "no acute disease."]))
    assert batch["input_ids"].shape[1] == 12
    assert batch["input_ids"][0, -1] == processor.tokenizer.sep_token_id
    assert batch["attention_mask"][0].all()
    assert batch["input_ids"][0, 0] == processor.tokenizer.bos_token_id


def test_collator_reports_bad_rows(processor):
    collator = CaptionCollator(processor, max_length=16)
    with pytest.raises(KeyError, match="text"):
        collator([{"image": Image.new("RGB", (8, 8))}])
    with pytest.raises(ValueError, match="empty"):
        collator([])
