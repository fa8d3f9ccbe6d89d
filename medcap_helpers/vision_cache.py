"""The frozen vision tower's image tokens, computed once per image and reused (``cache_vision_embeddings``).

With LoRA on the text decoder only (the default), training never changes the vision tower: an image's
tokens are the same in every epoch and every sweep trial, yet each step decodes the PNG, resizes it and
runs the tower again. The cache computes each image's tokens once and keeps them on disk, one ``.npy``
per image (BLIP-large: 577 x 1024 in float16, 1.2 MB), read memory-mapped; training batches then carry
``image_embeds`` instead of ``pixel_values`` (:class:`CachedEmbeddingCollator`).

* Keyed by the vision tower's weights, the image processor's settings and the stored dtype
  (:func:`cache_key`): a different model or processor gets its own folder, so nothing stale is read.
* An image is found by a hash of its encoded bytes (no decoding needed to look it up).
* Not used when the vision tower trains (``lora_vision``): its tokens change with every step.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from medcap_helpers.config import MedcapConfig
from medcap_helpers.devices import compute_dtype, pick_device
from medcap_helpers.images import open_rgb
from medcap_helpers.model import unwrap_model
from medcap_helpers.multiview import FROZEN_VISION_CHUNK
from medcap_helpers.processing import CaptionCollator

IMAGE_COLUMNS = ("image", "image_2")
CACHE_FOLDER = "vision_cache"


def vision_tower_trains(model: Any) -> bool:
    """Whether training changes the vision tower's tokens: some of its parameters take gradients inside a
    peft model (``lora_vision``). A model outside peft (02's base model, 05's merged and re-quantized ones)
    is only run: a freshly loaded model has every ``requires_grad`` flag on, and judged by those flags 02
    skipped the cache, generating its 590 zero-shot reports and its nearest-neighbour embeddings from the
    images (the rehearsal's 02 notebook printed the skip four times)."""
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    if getattr(inner, "peft_config", None) is None:
        return False
    return any(p.requires_grad for p in unwrap_model(model).vision_model.parameters())


def weights_digest(vision_model: Any) -> str:
    """A digest of what the vision tower computes with: every parameter and buffer by name, shape and
    value (as float32), a 4-bit weight by its dequantized value (:func:`effective_tensors`).

    Values, not storage: 4-bit layers pack their quantization state anew at every ``state_dict()``, and
    on the GPU that packing changed after the first forward pass, so a digest of the state dict gave one
    run two keys for one tower (03 cached 4,729 images twice; a sweep trial cached its training and its
    validation studies under different keys). A dtype change that keeps the values (a LayerNorm cast to
    float32) keeps the key too.

    Remembered on the tower while no parameter or buffer has been replaced or changed in place (torch
    counts every in-place change in ``_version``), so the sweep's trials, which share one base model,
    hash its weights once."""
    versions = tuple((name, tensor.data_ptr(), tensor._version)
                     for name, tensor in [*vision_model.named_parameters(), *vision_model.named_buffers()])
    remembered = getattr(vision_model, "_medcap_weights_digest", None)
    if remembered is not None and remembered[0] == versions:
        return remembered[1]
    digest = hashlib.blake2b(digest_size=12)
    for name, tensor in sorted(effective_tensors(vision_model), key=lambda item: item[0]):
        tensor = tensor.detach()
        tensor = tensor.float() if tensor.is_floating_point() else tensor
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-dim too
    vision_model._medcap_weights_digest = (versions, digest.hexdigest())
    return digest.hexdigest()


def effective_tensors(vision_model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """The tower's parameters and buffers as it computes with them: a 4-bit weight dequantized."""
    for name, param in vision_model.named_parameters():
        if type(param).__name__ == "Params4bit" and getattr(param, "quant_state", None) is not None:
            import bitsandbytes.functional as bnb_functional

            yield name, bnb_functional.dequantize_4bit(param.data, param.quant_state)
        else:
            yield name, param
    yield from vision_model.named_buffers()


def cache_key(model: Any, processor: Any, dtype: torch.dtype) -> str:
    """A digest of the vision tower's weights, the image processor's settings and the stored dtype: a
    cache folder holds tokens of exactly one such combination."""
    digest = hashlib.blake2b(digest_size=12)
    digest.update(weights_digest(unwrap_model(model).vision_model).encode())
    image_processor = getattr(processor, "image_processor", processor)
    settings = image_processor.to_dict()
    settings.pop("processor_class", None)
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(str(dtype).encode())
    return digest.hexdigest()


def image_hash(image: Any) -> str:
    """A digest of an image as stored: its encoded bytes (a ``datasets`` row read without decoding, or a
    file), or for a decoded PIL image its mode, size and pixels."""
    digest = hashlib.blake2b(digest_size=16)
    if isinstance(image, dict) and image.get("bytes"):
        digest.update(image["bytes"])
    elif isinstance(image, dict) and image.get("path"):
        digest.update(Path(image["path"]).read_bytes())
    elif isinstance(image, (str, Path)):
        digest.update(Path(image).read_bytes())
    elif isinstance(image, Image.Image):
        digest.update(f"{image.mode}{image.size}".encode())
        digest.update(image.tobytes())
    else:
        raise TypeError(f"Cannot key an image of type {type(image).__name__} (expected encoded bytes, a path "
                        "or a PIL image).")
    return digest.hexdigest()


class VisionEmbeddingCache:
    """Image tokens under ``root/<key>/<hash[:2]>/<hash>.npy``."""

    def __init__(self, root: str | Path, key: str, dtype: torch.dtype,
                 autocast_dtype: torch.dtype | None = None) -> None:
        self.folder = Path(root) / key
        self.dtype = dtype
        self.autocast_dtype = autocast_dtype
        """The mixed precision training runs the tower under (None: none), which filling must match."""
        self.numpy_dtype = np.float16 if dtype == torch.float16 else np.float32

    def path(self, digest: str) -> Path:
        return self.folder / digest[:2] / f"{digest}.npy"

    def __contains__(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def store(self, digest: str, tokens: torch.Tensor) -> None:
        """Write atomically (a temporary file renamed), so a crash or a second process never leaves half a file."""
        path = self.path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
        np.save(temporary, tokens.detach().float().cpu().numpy().astype(self.numpy_dtype))
        os.replace(temporary, path)

    def load(self, digest: str) -> torch.Tensor:
        path = self.path(digest)
        if not path.is_file():
            raise FileNotFoundError(f"Image {digest} is not in the vision cache {self.folder}: cache every split "
                                    "before training (vision_cache.prepare_cache).")
        return torch.from_numpy(np.array(np.load(path, mmap_mode="r")))


def cache_for(config: MedcapConfig, model: Any, processor: Any) -> VisionEmbeddingCache | None:
    """The run's cache, or None when it is off or the vision tower trains (its tokens change every step)."""
    if not config.cache_vision_embeddings:
        return None
    if vision_tower_trains(model):
        print("cache_vision_embeddings is skipped: the vision tower trains (lora_vision), so its tokens change.")
        return None
    device = pick_device(config)
    mixed = compute_dtype(config, device) if device.type == "cuda" else None  # the Trainer's autocast
    mixed = mixed if mixed in (torch.float16, torch.bfloat16) else None
    dtype = torch.float16 if mixed is not None else torch.float32  # half the disk; the tokens are half already
    key = cache_key(model, processor, mixed or dtype)
    return VisionEmbeddingCache(cache_root(config), key, dtype, autocast_dtype=mixed)


def cache_root(config: MedcapConfig) -> Path:
    """The folder of the run's cache keys: ``vision_cache_dir``, else ``<run_dir>/vision_cache``."""
    return Path(config.vision_cache_dir) if config.vision_cache_dir else Path(config.run_dir) / CACHE_FOLDER


def images_of(rows: Any, chunk_rows: int = 256) -> Iterator[Any]:
    """Every image of ``rows`` (both columns), as stored: ``datasets`` columns are read without decoding,
    ``chunk_rows`` rows at a time (a whole split's images never sit in memory together)."""
    if hasattr(rows, "column_names"):
        columns = [c for c in IMAGE_COLUMNS if c in rows.column_names]
        encoded = without_image_decoding(rows.with_format(None).select_columns(columns))
        for chunk in encoded.iter(batch_size=chunk_rows):
            for column in columns:
                yield from (image for image in chunk[column] if image is not None)
        return
    yield from (row[c] for row in rows for c in IMAGE_COLUMNS if row.get(c) is not None)


def without_image_decoding(rows: Any) -> Any:
    """``rows`` whose image columns come as encoded bytes (what the cache is keyed by), not decoded images."""
    if not hasattr(rows, "column_names"):
        return rows
    from datasets import Image as ImageFeature

    for column in IMAGE_COLUMNS:
        if column in rows.column_names:
            rows = rows.cast_column(column, ImageFeature(decode=False))
    return rows


def preparation_threads() -> int:
    """Threads that decode and resize images while the tower runs (Pillow and NumPy release the GIL)."""
    return max(1, min(16, (os.cpu_count() or 1) - 1))


@torch.no_grad()
def fill_cache(cache: VisionEmbeddingCache, model: Any, processor: Any, splits: Iterable[Any],
               batch_size: int = FROZEN_VISION_CHUNK, progress: bool = True, window: int = 256) -> int:
    """Compute the tokens of every image of ``splits`` not cached yet; return how many were computed.

    Images are decoded and resized by :func:`preparation_threads` threads, ``window`` images at a time, the
    next window while the tower runs on this one (one thread decoded 35 images/s on the GPU machine, the
    tower alone runs ~500); the files are written by the same threads."""
    from concurrent.futures import Future, ThreadPoolExecutor

    from tqdm.auto import tqdm

    vision = unwrap_model(model).vision_model
    device = next(vision.parameters()).device
    image_processor = getattr(processor, "image_processor", processor)
    autocast = torch.autocast(device.type, dtype=cache.autocast_dtype or torch.float32,
                              enabled=cache.autocast_dtype is not None)

    def pixels(image: Any) -> torch.Tensor:
        return image_processor(images=[open_rgb(image)], return_tensors="pt")["pixel_values"][0]

    def new_images() -> Iterator[tuple[str, Any]]:
        seen: set[str] = set()
        for image in (image for rows in splits for image in images_of(rows)):
            digest = image_hash(image)
            if digest not in seen and digest not in cache:
                seen.add(digest)
                yield digest, image

    def windows() -> Iterator[list[tuple[str, Any]]]:
        group: list[tuple[str, Any]] = []
        for item in new_images():
            group.append(item)
            if len(group) == window:
                yield group
                group = []
        if group:
            yield group

    computed = 0
    was_training = vision.training
    vision.eval()  # deterministic tokens; BLIP's vision tower has no dropout, so training computes the same
    try:
        with ThreadPoolExecutor(preparation_threads()) as pool, \
                tqdm(desc="Caching image tokens", unit="img", disable=not progress, leave=False) as bar:
            writes: list[Future] = []
            upcoming: list[tuple[str, Future]] | None = None
            for group in itertools.chain(windows(), [None]):  # one window ahead: its images decode while this one computes
                current = upcoming
                upcoming = None if group is None else [(digest, pool.submit(pixels, image)) for digest, image in group]
                if current is None:
                    continue
                for start in range(0, len(current), batch_size):
                    chunk = current[start:start + batch_size]
                    batch = torch.stack([future.result() for _, future in chunk]).to(device)
                    with autocast:
                        tokens = vision(pixel_values=batch)[0].float().cpu()
                    writes += [pool.submit(cache.store, digest, image_tokens)
                               for (digest, _), image_tokens in zip(chunk, tokens)]
                    computed += len(chunk)
                    bar.update(len(chunk))
                for write in writes:
                    write.result()  # a failed write raises here
                writes = []
    finally:
        vision.train(was_training)
    return computed


def prepare_cache(config: MedcapConfig, model: Any, processor: Any, splits: Sequence[Any],
                  progress: bool = True) -> VisionEmbeddingCache | None:
    """:func:`cache_for` with every image of ``splits`` cached (None when the cache is not used)."""
    cache = cache_for(config, model, processor)
    if cache is not None:
        computed = fill_cache(cache, model, processor, splits, progress=progress)
        if computed:
            print(f"Cached the vision tower's tokens of {computed} images in {cache.folder}.")
    return cache


def study_tokens(cache: VisionEmbeddingCache, row: Any, two_views: bool) -> torch.Tensor:
    """A study's cached tokens: its view's, or both views' side by side (a one-view study repeating its
    view, as :func:`~medcap_helpers.processing.pixel_batch` pads it) when ``two_views``."""
    first = cache.load(image_hash(row["image"]))
    if not two_views:
        return first
    second = row.get("image_2")
    return torch.cat([first, cache.load(image_hash(second)) if second is not None else first])


class StudyTokens(Sequence[torch.Tensor]):
    """Each row's cached tokens (:func:`study_tokens`), loaded row by row: what report generation reads
    instead of images (:func:`medcap_helpers.generation.generate_reports`)."""

    def __init__(self, rows: Any, cache: VisionEmbeddingCache, two_views: bool) -> None:
        self.rows, self.cache, self.two_views = without_image_decoding(rows), cache, two_views

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: Any) -> Any:  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return study_tokens(self.cache, self.rows[index], self.two_views)


class CachedEmbeddingCollator(CaptionCollator):
    """:class:`~medcap_helpers.processing.CaptionCollator` with the images' cached tokens instead of pixels:
    ``image_embeds`` of shape (batch, views x tokens, hidden), a one-view study in a two-view batch
    repeating its view (as :func:`~medcap_helpers.processing.pixel_batch` does)."""

    def __init__(self, processor: Any, max_length: int, cache: VisionEmbeddingCache) -> None:
        super().__init__(processor, max_length)
        self.cache = cache

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        two_views = any(row.get("image_2") is not None for row in rows)
        return {"image_embeds": torch.stack([study_tokens(self.cache, row, two_views) for row in rows]),
                **self.text_inputs(rows)}
