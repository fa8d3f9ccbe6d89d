"""Text-only pretraining of the tiny model's text decoder (the smoke profile's ``tiny_pretrain_epochs``).

BLIP-large's decoder comes pretrained; the tiny model's is random, and a few CPU minutes of fine-tuning
cannot teach it both the language of reports and how to read an image. Pretraining it on training-side
report text first (never validation or test reports) is what lets the smoke run show learning.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch

from medcap_helpers.config import TINY_MODEL, MedcapConfig
from medcap_helpers.processing import local_model_dir

PRETRAINING_FILE = "pretraining.json"
PRETRAIN_BATCH_SIZE = 32
PRETRAIN_MEMORY_NOISE = 0.02
"""Std of the Gaussian noise added to the memory's word embeddings (they are initialised with std
``tiny_init_range``, 0.1 in the smoke profile): the image features fine-tuning puts there are no exact words."""


def pretraining_record(config: MedcapConfig) -> dict[str, Any] | None:
    """What :func:`pretrain_text_decoder` recorded for the run's tiny model (None: not pretrained)."""
    path = local_model_dir(config) / PRETRAINING_FILE
    return json.loads(path.read_text()) if config.model_name == TINY_MODEL and path.is_file() else None


def pretraining_settings(config: MedcapConfig) -> dict[str, Any]:
    """:func:`pretrain_text_decoder`'s settings from ``config`` (``epochs`` 0: no pretraining)."""
    return {"epochs": config.tiny_pretrain_epochs, "learning_rate": config.tiny_pretrain_learning_rate,
            "memory_share": config.tiny_pretrain_memory_share, "max_length": config.max_target_tokens}


def pretrain_text_decoder(model: Any, tokenizer: Any, texts: Sequence[str], epochs: int = 3,
                          learning_rate: float = 1e-2, memory_share: float = 0.3, max_length: int = 64,
                          seed: int = 0, batch_size: int = PRETRAIN_BATCH_SIZE,
                          noise: float = PRETRAIN_MEMORY_NOISE) -> dict[str, Any]:
    """Pretrain a BLIP text decoder, in place, on report text alone (no images); return a record of it.

    BLIP's decoder was pretrained on image-text pairs; the tiny model's is random, and a few CPU minutes
    of LoRA cannot teach a random decoder the language of reports *and* how to read an image. So before
    any image is seen, every weight of the decoder learns language modelling on ``texts`` (teacher
    forcing, the report's first token replaced by ``[DEC]`` as in training). Its cross-attention memory,
    where fine-tuning puts the image, holds a random ``memory_share`` of the report's own words (their
    word embeddings, detached, plus Gaussian ``noise``, layer-normalised like the vision tower's output),
    padded with noise: the decoder learns to read the memory and to write the rest of the report from the
    language (text-only captioning pretraining, as in CapDec, Nukrai et al. 2022). With ``memory_share=0``
    cross-attention is skipped (plain language modelling). AdamW, linear decay to 0, batches of
    ``batch_size`` texts; deterministic for ``seed`` (the global RNG is left untouched). The vision tower
    is not touched. Only texts from the training side may be passed (the pipeline passes the tokenizer's
    corpus, which leaves out every validation and test report).
    """
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError("No texts to pretrain the text decoder on.")
    decoder = model.text_decoder
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    input_ids = encoded["input_ids"].clone()
    input_ids[:, 0] = tokenizer.bos_token_id
    attention_mask = encoded["attention_mask"]
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    special = torch.tensor(sorted({tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id,
                                   tokenizer.bos_token_id} - {None}))
    steps_per_epoch = -(-len(texts) // batch_size)
    total = max(1, epochs * steps_per_epoch)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total))
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # dropout, if the config has any
            for _ in range(epochs):
                order = torch.randperm(len(texts), generator=generator)
                epoch_loss = 0.0
                for start in range(0, len(texts), batch_size):
                    rows = order[start:start + batch_size]
                    length = int(attention_mask[rows].sum(dim=1).max())
                    ids, mask = input_ids[rows, :length], attention_mask[rows, :length]
                    memory = None
                    if memory_share > 0:
                        with torch.no_grad():
                            words = decoder.bert.embeddings.word_embeddings(ids)
                        keep = (torch.rand(ids.shape, generator=generator) < memory_share) & (mask == 1) \
                            & ~torch.isin(ids, special)
                        memory = words * keep[..., None] + noise * torch.randn(words.shape, generator=generator)
                        memory = torch.nn.functional.layer_norm(memory, memory.shape[-1:])
                    output = decoder(input_ids=ids, attention_mask=mask, labels=labels[rows, :length],
                                     encoder_hidden_states=memory, reduction="mean")
                    output.loss.backward()
                    optimizer.step()
                    schedule.step()
                    optimizer.zero_grad(set_to_none=True)
                    epoch_loss += float(output.loss.detach())
                losses.append(round(epoch_loss / steps_per_epoch, 4))
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.train(was_training)
    return {"texts": len(texts), "epochs": epochs, "learning_rate": learning_rate, "memory_share": memory_share,
            "memory_noise": noise, "max_length": max_length, "batch_size": batch_size, "seed": seed,
            "epoch_losses": losses}
