"""Processor (image processor + tokenizer) and the training collator.

* :func:`build_offline_processor` builds a BLIP processor without a download: the real image
  settings (bicubic resize, 1/255 rescale, CLIP mean/std) and a BERT-style WordPiece tokenizer
  (``tokenizers`` WordPiece model, vocabulary built deterministically from the given report texts),
  with BLIP's ``[DEC]`` (bos) and ``[ENC]`` tokens added.
* :func:`load_processor` picks that offline processor for the tiny model, else the hub/folder one.
* :class:`CaptionCollator` turns ``{"image", "text"}`` rows into model inputs whose first token is
  ``[DEC]``, the token ``BlipForConditionalGeneration.generate`` starts every caption from.

Facts about BLIP's loss in transformers 5 (``BlipTextLMHeadModel.forward``): the labels are shifted
inside the model (logits ``[:, :-1]`` against labels ``[:, 1:]``), so the first label (the ``[DEC]``
position) is never a target and position 0 learns to predict the report's first word; the loss
uses ``reduction="mean"`` over non ``-100`` labels and ``label_smoothing=config.text_config.label_smoothing``,
which is 0.0 in transformers 5 (transformers 4.x hard-coded 0.1).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from medcap_helpers.config import LOCAL_MODELS, TINY_MODEL, MedcapConfig
from medcap_helpers.errors import ProcessorLoadError
from medcap_helpers.images import open_rgb

if TYPE_CHECKING:  # pragma: no cover
    from transformers import BlipProcessor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BLIP_IMAGE_SIZE = 384
TINY_IMAGE_SIZE = 64
"""Input size of the tiny model's image processor (small for CPU speed)."""
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
DECODER_BOS_TOKEN = "[DEC]"
ENCODER_TOKEN = "[ENC]"
PROCESSOR_FILES = ("processor_config.json", "tokenizer.json")


def blip_image_processor(image_size: int = BLIP_IMAGE_SIZE) -> Any:
    """BLIP's image processor with the real settings (bicubic, 1/255, CLIP mean/std, RGB).

    transformers 5 serves the Pillow implementation when torchvision is missing; both are accepted
    by :class:`~transformers.BlipProcessor`.
    """
    kwargs = dict(do_resize=True, size={"height": image_size, "width": image_size}, resample=3,
                  do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(CLIP_MEAN),
                  image_std=list(CLIP_STD), do_convert_rgb=True)
    try:
        from transformers import BlipImageProcessorPil

        return BlipImageProcessorPil(**kwargs)
    except ImportError:  # older transformers: a single class
        from transformers import BlipImageProcessor

        return BlipImageProcessor(**kwargs)


def wordpiece_vocabulary(texts: Iterable[str], vocab_size: int = 4000) -> dict[str, int]:
    """A deterministic WordPiece vocabulary for ``texts`` (BERT normalisation and pre-tokenisation).

    ``[PAD]``=0, ``[UNK]``=1, ``[CLS]``=2, ``[SEP]``=3, ``[MASK]``=4, then every character seen (as a
    word start and as a ``##`` continuation, so any word of the corpus can be spelled), then whole
    words by frequency (ties alphabetical) up to ``vocab_size`` entries. The ``tokenizers`` trainer is
    not used because it breaks ties in hash order: two runs would give different ids.
    """
    from collections import Counter

    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        words = pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(str(text)))
        counts.update(word for word, _ in words)
    if not counts:
        raise ValueError("Cannot build a tokenizer from no text: pass the report texts of the dataset.")
    if vocab_size < 64:
        raise ValueError(f"vocab_size={vocab_size} is too small for a WordPiece vocabulary (use >= 64).")
    chars = sorted({c for word in counts for c in word})
    pieces = list(BERT_SPECIAL_TOKENS) + chars + [f"##{c}" for c in chars]
    known = set(pieces)
    for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if len(pieces) >= vocab_size:
            break
        if word not in known:
            pieces.append(word)
            known.add(word)
    return {piece: index for index, piece in enumerate(pieces)}


def train_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int = 4000) -> Any:
    """A lower-casing BERT WordPiece fast tokenizer for ``texts`` with BLIP's ``[DEC]``/``[ENC]`` tokens.

    Vocabulary from :func:`wordpiece_vocabulary`; ``[DEC]`` (the bos token) and ``[ENC]`` are added
    last, the order BLIP's tokenizer has them in. Encodes as ``[CLS] text [SEP]`` like BERT.
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers import BertTokenizerFast

    vocab = wordpiece_vocabulary(texts, vocab_size)
    tokenizer = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    fast = BertTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                             cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", model_max_length=512,
                             do_lower_case=True)
    fast.add_special_tokens({"bos_token": DECODER_BOS_TOKEN, "additional_special_tokens": [ENCODER_TOKEN]})
    return fast


def build_offline_processor(texts: Iterable[str], vocab_size: int = 4000,
                            image_size: int = BLIP_IMAGE_SIZE) -> BlipProcessor:
    """A :class:`~transformers.BlipProcessor` built without a download (see module docstring)."""
    from transformers import BlipProcessor

    return BlipProcessor(image_processor=blip_image_processor(image_size),
                         tokenizer=train_wordpiece_tokenizer(texts, vocab_size))


def local_model_dir(config: MedcapConfig) -> Path:
    """Where a run keeps the model it builds itself (weights + processor): ``tiny_model`` for the tiny
    BLIP, ``random_blip_large`` for the rehearsal's random BLIP-large."""
    return Path(config.run_dir) / ("tiny_model" if config.model_name == TINY_MODEL else "random_blip_large")


def has_saved_processor(folder: str | Path) -> bool:
    return all((Path(folder) / name).is_file() for name in PROCESSOR_FILES)


def load_processor(config: MedcapConfig, texts: Iterable[str] | None = None) -> BlipProcessor:
    """The processor for ``config.model_name``.

    A model the run builds itself (``"tiny"``, ``"random-blip-large"``): the processor saved beside it
    when there is one (so a resumed run keeps its vocabulary), else a new offline processor trained on
    ``texts`` (64 px for the tiny model, BLIP-large's 384 px for the random one). Otherwise
    ``BlipProcessor.from_pretrained(model_name)`` (a hub id or a local folder).
    """
    from transformers import BlipProcessor

    if config.model_name in LOCAL_MODELS:
        folder = local_model_dir(config)
        if has_saved_processor(folder):
            return BlipProcessor.from_pretrained(str(folder))
        if texts is None:
            raise ValueError("A locally built model's tokenizer is trained on the report texts: pass texts= "
                             "(e.g. the training reports).")
        size = TINY_IMAGE_SIZE if config.model_name == TINY_MODEL else BLIP_IMAGE_SIZE
        return build_offline_processor(texts, image_size=size)
    return load_pretrained_processor(config.model_name)


def load_pretrained_processor(name_or_path: str) -> BlipProcessor:
    """``BlipProcessor.from_pretrained`` with an error that says what to do when it fails."""
    from transformers import BlipProcessor

    local = Path(name_or_path).expanduser()
    looks_local = local.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local and not local.is_dir():
        raise ProcessorLoadError(f"Processor folder '{name_or_path}' does not exist: give a folder holding "
                                 "processor_config.json and tokenizer files, or a hub id such as "
                                 "'Salesforce/blip-image-captioning-large'.")
    try:
        return BlipProcessor.from_pretrained(str(local) if looks_local else name_or_path)
    except (OSError, ValueError) as err:
        raise ProcessorLoadError(
            f"Could not load the BLIP processor '{name_or_path}': {err}. If this is a hub id, check the "
            "internet connection (or that HF_HUB_OFFLINE is unset) and the spelling; or download it once "
            "with `huggingface-cli download` and pass the local folder; model_name='tiny' needs no download."
        ) from err


def caption_start_token_id(processor: BlipProcessor) -> int:
    """The id training puts first in every caption: the tokenizer's bos token, BLIP's ``[DEC]``."""
    bos = processor.tokenizer.bos_token_id
    if bos is None:
        raise ValueError("The tokenizer has no bos token: BLIP captions start with [DEC]; use BLIP's "
                         "processor or build_offline_processor().")
    return int(bos)


def stack_views(pixel_values: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-study tensors (views_i, 3, H, W) -> (batch, most views, 3, H, W), short studies padded by
    repeating their own views; and each study's number of real views."""
    most = max(p.shape[0] for p in pixel_values)
    batch = torch.stack([views[torch.arange(most) % views.shape[0]] for views in pixel_values])
    return batch, torch.tensor([p.shape[0] for p in pixel_values])


def pixel_batch(processor: Any, items: Sequence[Any]) -> torch.Tensor:
    """Pixel values of a batch: (batch, 3, H, W) for single images, (batch, views, 3, H, W) when any item
    is a list of views (short studies padded by repeating their views: see :mod:`medcap_helpers.multiview`)."""
    image_processor = getattr(processor, "image_processor", processor)
    if not any(isinstance(item, (list, tuple)) for item in items):
        return image_processor(images=[open_rgb(item) for item in items], return_tensors="pt")["pixel_values"]
    studies = [list(item) if isinstance(item, (list, tuple)) else [item] for item in items]
    flat = image_processor(images=[open_rgb(view) for views in studies for view in views],
                           return_tensors="pt")["pixel_values"]
    per_study = list(torch.split(flat, [len(views) for views in studies]))
    return stack_views(per_study)[0]


class CaptionCollator:
    """Batch ``{"image": PIL image or path, "text": str}`` rows into BLIP training inputs.

    Returns ``pixel_values`` (batch, views, 3, H, W when any row has an ``image_2``: see
    :mod:`medcap_helpers.multiview`), ``input_ids`` (first token replaced by ``[DEC]``), ``attention_mask`` and
    ``labels`` (= ``input_ids`` with padding set to -100; BLIP shifts them inside the model). Texts
    longer than ``max_length`` tokens are truncated, keeping the final ``[SEP]`` (the stop token).
    """

    def __init__(self, processor: BlipProcessor, max_length: int = 128) -> None:
        if max_length < 3:
            raise ValueError(f"max_length={max_length} leaves no room for a report (use >= 3).")
        self.processor = processor
        self.max_length = max_length
        self.bos_token_id = caption_start_token_id(processor)
        self.pad_token_id = processor.tokenizer.pad_token_id

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("CaptionCollator got an empty batch.")
        missing = [key for key in ("image", "text") if key not in rows[0]]
        if missing:
            raise KeyError(f"Rows need 'image' and 'text'; missing {missing} (row keys: {sorted(rows[0])}).")
        images = [[row["image"], row["image_2"]] if row.get("image_2") is not None else row["image"] for row in rows]
        return {"pixel_values": pixel_batch(self.processor, images), **self.text_inputs(rows)}

    def text_inputs(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask`` and ``labels`` of the rows' reports."""
        texts = [str(row["text"]) for row in rows]
        encoded = self.processor.tokenizer(texts, padding="longest", truncation=True,
                                           max_length=self.max_length, return_tensors="pt")
        input_ids = encoded["input_ids"].clone()
        input_ids[:, 0] = self.bos_token_id
        attention_mask = encoded["attention_mask"]
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pad_to_static_shape(batch: dict[str, torch.Tensor], rows: int, length: int, pad_token_id: int,
                        view_tokens: int | None = None) -> dict[str, torch.Tensor]:
    """``batch`` padded to ``rows`` studies of ``length`` tokens (and, with cached image tokens and
    ``view_tokens``, to two views), with the same loss: a compiled step with CUDA graphs then sees one
    shape for every batch instead of compiling again for each new one.

    Text is padded as the collator pads it (pad token, no attention, label -100). The added studies are
    fillers whose labels are all -100: BLIP's loss is the mean over labelled tokens, which they leave
    unchanged. A one-view study becomes two by repeating its view, as two-view batches already pad one-view
    studies: attention over a view's tokens twice weighs each half, so the decoder computes the same.
    """
    input_ids = batch["input_ids"]
    present, present_length = input_ids.shape
    if present > rows or present_length > length:
        raise ValueError(f"a batch of {present} x {present_length} tokens is larger than {rows} x {length}")
    padded = dict(batch)
    extra_tokens = length - present_length
    for key, fill in (("input_ids", pad_token_id), ("attention_mask", 0), ("labels", -100)):
        if key in padded and extra_tokens:
            padded[key] = torch.nn.functional.pad(padded[key], (0, extra_tokens), value=fill)
    embeds = padded.get("image_embeds")
    if embeds is not None and view_tokens is not None and embeds.shape[1] == view_tokens:
        padded["image_embeds"] = torch.cat([embeds, embeds], dim=1)
    fillers = rows - present
    if fillers:
        for key, tensor in padded.items():
            if key == "input_ids":  # the start token and padding, one attended token (no empty attention)
                filler = torch.full((fillers, length), pad_token_id, dtype=tensor.dtype, device=tensor.device)
                filler[:, 0] = tensor[0, 0]
            elif key == "attention_mask":
                filler = torch.zeros((fillers, length), dtype=tensor.dtype, device=tensor.device)
                filler[:, 0] = 1
            elif key == "labels":
                filler = torch.full((fillers, length), -100, dtype=tensor.dtype, device=tensor.device)
            else:  # image tokens or pixels
                filler = torch.zeros((fillers, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
            padded[key] = torch.cat([tensor, filler])
    return padded
