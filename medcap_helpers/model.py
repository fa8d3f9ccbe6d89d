"""BLIP models: real (hub/folder), tiny random and random real-size; 4-bit NF4 loading; LoRA.

The tiny model (``model_name="tiny"``) is a randomly initialised ``BlipForConditionalGeneration``
with the same classes as BLIP-large. It is saved to ``<run_dir>/tiny_model`` (safetensors, with its
processor) and loaded back through the same ``from_pretrained(..., quantization_config=...)`` path
as the real model, so a smoke run exercises real bitsandbytes 4-bit loading (on CPU too).

Gradient checkpointing + LoRA on BLIP: peft registers a forward hook on the input embeddings that
calls ``output.requires_grad_(True)`` (``enable_input_require_grads``; done by
``prepare_model_for_kbit_training`` and by ``get_peft_model`` when checkpointing is already on). It
turns the word-embedding output into a leaf that requires grad, and ``BlipTextEmbeddings.forward``
then does ``embeddings += position_embeddings`` in place: "a leaf Variable that requires grad is
being used in an in-place operation". The hook only exists for *reentrant* checkpointing, which
needs an input that requires grad; :func:`attach_lora` uses non-reentrant checkpointing
(``use_reentrant=False``, PyTorch's recommended mode), never registers the hook and removes any
that was registered (:func:`remove_input_grad_hooks`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from medcap_helpers.attention import use_sdpa_attention
from medcap_helpers.atomic import atomic_folder, folder_ready
from medcap_helpers.config import (
    LOCAL_MODELS,
    TEXT_LORA_TARGETS,
    TINY_MODEL,
    VISION_LORA_TARGETS,
    MedcapConfig,
)
from medcap_helpers.devices import cap_gpu_memory, compute_dtype, device_map_for, pick_device
from medcap_helpers.errors import ConfigError, ModelLoadError
from medcap_helpers.frozen_weights import dequantize_frozen_weights
from medcap_helpers.pretrain import (
    PRETRAINING_FILE,
    pretrain_text_decoder,
    pretraining_settings,
)
from medcap_helpers.processing import (
    has_saved_processor,
    load_processor,
    local_model_dir,
)
from medcap_helpers.sources import tokenizer_training_texts

if TYPE_CHECKING:  # pragma: no cover
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor

WEIGHTS_FILE = "model.safetensors"


def _safetensors_error() -> tuple[type[BaseException], ...]:
    """The error type safetensors raises for a damaged file (not an OSError/ValueError)."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - older safetensors
        return ()
    return (SafetensorError,)


# --------------------------------------------------------------------------------------- configs
@lru_cache(maxsize=1)
def blip_large_values() -> dict[str, Any]:
    """The architecture, image-processor and tokenizer facts of Salesforce/blip-image-captioning-large."""
    text = resources.files("medcap_helpers").joinpath("blip_large_config.json").read_text()
    return json.loads(text)


def blip_large_config() -> BlipConfig:
    """BLIP-large's :class:`~transformers.BlipConfig` (446.3 M parameters with the LM head tied)."""
    from transformers import BlipConfig

    values = blip_large_values()
    top = {k: values[k] for k in ("projection_dim", "image_text_hidden_size", "initializer_factor",
                                  "initializer_range", "logit_scale_init_value")}
    return BlipConfig(text_config=dict(values["text_config"]), vision_config=dict(values["vision_config"]), **top)


def tiny_blip_config(vocab_size: int, image_size: int = 64, init_range: float = 0.5, *,
                     bos_token_id: int | None = None, pad_token_id: int = 0, sep_token_id: int = 3,
                     hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                     max_positions: int = 256) -> BlipConfig:
    """A tiny BLIP (hidden 64, 2+2 layers, patch 16) initialised with std ``init_range``.

    ``bos_token_id`` defaults to ``vocab_size - 2``, where :func:`~medcap_helpers.processing.build_offline_processor`
    puts ``[DEC]``. ``eos_token_id`` is set to the ``[SEP]`` id, the token BLIP's generate stops on.
    """
    from transformers import BlipConfig

    if image_size % 16:
        raise ValueError(f"image_size={image_size} must be a multiple of the patch size 16.")
    bos = vocab_size - 2 if bos_token_id is None else bos_token_id
    text = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=num_layers, num_attention_heads=num_heads, max_position_embeddings=max_positions,
                bos_token_id=bos, eos_token_id=sep_token_id, pad_token_id=pad_token_id, sep_token_id=sep_token_id,
                initializer_range=init_range, is_decoder=True)
    vision = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, image_size=image_size, patch_size=16, initializer_range=init_range)
    return BlipConfig(text_config=text, vision_config=vision, projection_dim=hidden_size,
                      image_text_hidden_size=hidden_size, initializer_range=init_range)


def create_tiny_model(folder: str | Path, processor: BlipProcessor, init_range: float = 0.5,
                      seed: int = 0, pretrain_texts: Sequence[str] | None = None,
                      pretraining: dict[str, Any] | None = None) -> Path:
    """Build a tiny random BLIP matching ``processor`` and save it (safetensors) with the processor.

    Vocabulary size, image size and the bos/pad/sep ids come from the processor. With ``pretrain_texts``
    and ``pretraining`` (keyword arguments of :func:`pretrain_text_decoder`, ``epochs`` > 0) the text
    decoder is pretrained on those texts before saving, and ``pretraining.json`` records how. Returns ``folder``.
    """
    from transformers import BlipForConditionalGeneration

    tokenizer = processor.tokenizer
    size = processor.image_processor.size
    image_size = int(size["height"] if isinstance(size, dict) or hasattr(size, "__getitem__") else size)
    blip_config = tiny_blip_config(len(tokenizer), image_size, init_range, bos_token_id=tokenizer.bos_token_id,
                                   pad_token_id=tokenizer.pad_token_id, sep_token_id=tokenizer.sep_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(blip_config)
    record = None
    if pretrain_texts and pretraining and pretraining.get("epochs", 0) > 0:
        record = pretrain_text_decoder(model, tokenizer, pretrain_texts, seed=seed, **pretraining)
    with atomic_folder(folder) as staging:  # a killed run never leaves a half-saved tiny model
        model.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
        if record is not None:
            (Path(staging) / PRETRAINING_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return Path(folder)


def create_random_blip_large(folder: str | Path, processor: BlipProcessor, seed: int = 0) -> Path:
    """BLIP-large's architecture (the packaged config) with random weights, saved with ``processor``.

    The real tokenizer can't be downloaded, so the model's special ids point at the offline processor's
    (same vocabulary size, hence the same memory and compute as the real model).
    """
    from transformers import BlipForConditionalGeneration

    blip_config = blip_large_config()
    tokenizer = processor.tokenizer
    for name, value in (("bos_token_id", tokenizer.bos_token_id), ("pad_token_id", tokenizer.pad_token_id),
                        ("sep_token_id", tokenizer.sep_token_id), ("eos_token_id", tokenizer.sep_token_id)):
        setattr(blip_config.text_config, name, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(blip_config)
    with atomic_folder(folder) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
    return Path(folder)


def ensure_local_model(config: MedcapConfig, processor: BlipProcessor, texts: Sequence[str] | None = None) -> Path:
    """Build the run's own model (tiny, or random BLIP-large) unless it is already saved; return its folder.

    The tiny model's text decoder is pretrained on ``texts`` first when ``config.tiny_pretrain_epochs`` > 0
    (:func:`pretrain_text_decoder`).
    """
    folder = local_model_dir(config)
    if not folder_ready(folder, WEIGHTS_FILE):
        if config.model_name == TINY_MODEL:
            create_tiny_model(folder, processor, init_range=config.tiny_init_range, seed=config.seed,
                              pretrain_texts=texts, pretraining=pretraining_settings(config))
        else:
            create_random_blip_large(folder, processor, seed=config.seed)
    return folder


def quantization_config(dtype: torch.dtype) -> Any:
    """The QLoRA quantization: 4-bit NF4 with double quantization, computing in ``dtype``."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


# --------------------------------------------------------------------------------------- loading
def _resolve_model_source(config: MedcapConfig, model_path: str | Path | None) -> str:
    if model_path is not None:
        source = Path(model_path).expanduser()
        if not (source / "config.json").is_file():
            raise ModelLoadError(f"Model folder '{source}' has no config.json: give a folder written by "
                                 "save_pretrained (or create_tiny_model), or a hub id.")
        return str(source)
    if config.model_name in LOCAL_MODELS:
        folder = local_model_dir(config)
        if not folder_ready(folder, WEIGHTS_FILE):
            raise ModelLoadError(f"The run's {config.model_name} model is not built yet ({folder / WEIGHTS_FILE} "
                                 "is missing): call ensure_local_model(config, processor) first.")
        return str(folder)
    name = config.model_name
    local = Path(name).expanduser()
    if local.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"Model folder '{name}' does not exist or has no config.json: give a folder "
                                 "written by save_pretrained, or a hub id such as "
                                 "'Salesforce/blip-image-captioning-large'.")
        return str(local)
    return name


def base_model_source(config: MedcapConfig) -> str:
    """What :func:`load_base_model` loads for ``config``: the run's tiny-model folder, a local folder or a hub id."""
    return _resolve_model_source(config, None)


def load_plain_model(source: str | Path, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None) -> BlipForConditionalGeneration:
    """A non-quantized BLIP from a folder or hub id in ``dtype`` (on CPU unless ``device`` is given)."""
    from transformers import BlipForConditionalGeneration

    kwargs: dict[str, Any] = dict(use_safetensors=True, trust_remote_code=False, dtype=dtype)
    if device is not None:
        kwargs["device_map"] = device_map_for(device)
    try:
        return BlipForConditionalGeneration.from_pretrained(str(source), **kwargs)
    except (OSError, ValueError, *_safetensors_error()) as err:
        raise ModelLoadError(f"Could not load BLIP from '{source}': {err}") from err


def load_model_and_processor(config: MedcapConfig, dataset: Any = None,
                             texts: Sequence[str] | None = None) -> tuple[BlipForConditionalGeneration, BlipProcessor]:
    """The base model (4-bit per config) and its processor, building the tiny model when needed.

    For ``model_name="tiny"`` the tokenizer learns from ``texts``, else from the bundled IU X-Ray
    reports minus the dataset's validation/test reports (:func:`~medcap_helpers.sources.tokenizer_training_texts`),
    and the text decoder is pretrained on the same texts (``tiny_pretrain_epochs``); the tiny model and
    processor are saved to ``<run_dir>/tiny_model`` once and reused afterwards (a resumed run keeps its
    vocabulary and weights).
    """
    prepare_local_model(config, dataset, texts)
    processor = load_processor(config)
    return load_base_model(config), processor


def prepare_local_model(config: MedcapConfig, dataset: Any = None, texts: Sequence[str] | None = None) -> None:
    """Build the run's own model folder (tiny or random BLIP-large, both seeded) when the config names one
    and it is missing, without loading it: a run whose folder lost it (a run carried to another machine
    without its model) gets the same model back. A hub model needs nothing here."""
    folder = local_model_dir(config)
    if config.model_name in LOCAL_MODELS and not (folder_ready(folder, WEIGHTS_FILE) and has_saved_processor(folder)):
        corpus = list(texts) if texts is not None else _tokenizer_corpus(config, dataset)
        ensure_local_model(config, load_processor(config, corpus), texts=corpus)


def _tokenizer_corpus(config: MedcapConfig, dataset: Any) -> list[str]:
    """The tiny tokenizer's texts: bundled reports minus held-out ones, else the dataset's training texts."""
    corpus: list[str] = []
    try:
        corpus = list(tokenizer_training_texts(config, dataset) or [])
    except OSError as err:  # bundled reports (torchxrayvision's data file) are a convenience
        warnings.warn(f"Bundled report texts unavailable ({err}); the tiny tokenizer learns from the dataset only.",
                      RuntimeWarning, stacklevel=3)
    if not corpus and dataset is not None and "train" in dataset:
        train = dataset["train"]
        corpus = list(train["text"] if hasattr(train, "column_names") else [row["text"] for row in train])
    if not corpus:
        raise ValueError("No texts to build the tiny model's tokenizer from: pass texts= or a dataset.")
    return corpus


def load_base_model(config: MedcapConfig, model_path: str | Path | None = None,
                    device: torch.device | None = None) -> BlipForConditionalGeneration:
    """BLIP from ``model_path``, the run's tiny model, or ``config.model_name`` (hub id / folder).

    4-bit NF4 (double quantization, compute dtype per :func:`compute_dtype`) when
    ``config.load_in_4bit``, else the compute dtype. Safetensors only, no remote code. Generation
    defaults (stop on ``[SEP]``, ``config.max_new_tokens``, ``config.num_beams``) are set on the model.
    """
    from transformers import BlipForConditionalGeneration

    source = _resolve_model_source(config, model_path)
    device = device or pick_device(config)
    dtype = compute_dtype(config, device)
    if device.type == "cuda" and config.vram_budget_gb is not None:
        cap_gpu_memory(config.vram_budget_gb, device)
    # The weights that stay unquantized (embeddings, norms, the patch conv) load in the compute
    # dtype too: in fp32 they would make the NF4 model ~20% larger in memory and on disk.
    kwargs: dict[str, Any] = dict(use_safetensors=True, trust_remote_code=False, device_map=device_map_for(device),
                                  dtype=dtype)
    if config.load_in_4bit:
        kwargs["quantization_config"] = quantization_config(dtype)
    try:
        model = BlipForConditionalGeneration.from_pretrained(source, **kwargs)
    except (OSError, ValueError, *_safetensors_error()) as err:
        if Path(source).is_dir():
            hint = ("The folder needs config.json and complete safetensors weights (model.safetensors): copy or "
                    "download a damaged or cut-off file again (a run's tiny_model folder can be deleted: it is "
                    "rebuilt); .bin/pickle weights are never loaded.")
        else:
            hint = ("For a hub id, check the internet connection (HF_HUB_OFFLINE must be unset) and the spelling, "
                    "or download it once and pass the folder; only safetensors weights are accepted. "
                    "model_name='tiny' needs no download.")
        raise ModelLoadError(f"Could not load BLIP from '{source}': {str(err).rstrip('. ')}. {hint}") from err
    if device.type == "cpu":
        keep_cpu_4bit_weights_trainable(model)
    set_generation_defaults(model, config)
    return model


def keep_cpu_4bit_weights_trainable(model: Any) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference; return how many layers.

    On CPUs with AVX512-BF16, ``Linear4bit`` repacks its weights the first time it runs in eval mode
    and keeps that layout, whose kernel adds the bias in place: training after any generation
    (the 'before' captions, each epoch's validation) then fails with "a view of a leaf Variable that
    requires grad is being used in an in-place operation". The plain layout works for both.
    """
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def random_model(config_or_blip_config: MedcapConfig | BlipConfig, quantize: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 seed: int = 0) -> BlipForConditionalGeneration:
    """A random-weight BLIP of real size (benchmarks, shape tests) loaded like a downloaded one.

    A :class:`MedcapConfig` means BLIP-large's architecture (the tiny one for ``model_name="tiny"``);
    a :class:`~transformers.BlipConfig` is used as given. The random model is saved to a temporary
    folder in safetensors and loaded back with ``from_pretrained`` (4-bit NF4 when ``quantize``), the
    only route bitsandbytes quantizes through; works on CPU and CUDA. The folder is deleted afterwards.
    """
    from transformers import BlipConfig, BlipForConditionalGeneration

    if isinstance(config_or_blip_config, BlipConfig):
        blip_config = config_or_blip_config
        medcap = MedcapConfig(device="auto")
    else:
        medcap = config_or_blip_config
        blip_config = (tiny_blip_config(4000, init_range=medcap.tiny_init_range)
                       if medcap.model_name == TINY_MODEL else blip_large_config())
    device = torch.device(device) if device is not None else pick_device(medcap)
    dtype = dtype or compute_dtype(medcap, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(blip_config)
    folder = Path(tempfile.mkdtemp(prefix="medcap_random_blip_"))
    try:
        model.save_pretrained(folder, safe_serialization=True)
        del model
        kwargs: dict[str, Any] = dict(use_safetensors=True, device_map=device_map_for(device), dtype=dtype)
        if quantize:
            kwargs["quantization_config"] = quantization_config(dtype)
        loaded = BlipForConditionalGeneration.from_pretrained(folder, **kwargs)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return loaded


def set_generation_defaults(model: Any, config: MedcapConfig | None = None) -> None:
    """Make ``generate()`` stop on ``[SEP]``, pad with ``[PAD]`` and write reports of full length.

    BLIP's generate passes these to its text decoder, whose own generation config is what applies;
    both are set so that ``model.generate(pixel_values)`` alone is not cut at the 20-token default.
    """
    text = model.config.text_config
    ids = dict(bos_token_id=text.bos_token_id, eos_token_id=text.sep_token_id, pad_token_id=text.pad_token_id)
    for module in (model, getattr(model, "text_decoder", None)):
        generation_config = getattr(module, "generation_config", None)
        if generation_config is None:
            continue
        for key, value in ids.items():
            setattr(generation_config, key, value)
        if config is not None:
            generation_config.max_new_tokens = config.max_new_tokens
            generation_config.num_beams = config.num_beams
            generation_config.max_length = None


def check_tokenizer_matches(model: Any, tokenizer: Any) -> None:
    """Raise when the tokenizer's special ids differ from the model's (a processor of another model)."""
    text = unwrap_model(model).config.text_config
    pairs = {"bos ([DEC])": (tokenizer.bos_token_id, text.bos_token_id),
             "pad": (tokenizer.pad_token_id, text.pad_token_id),
             "sep (stop)": (tokenizer.sep_token_id, text.sep_token_id)}
    wrong = {name: ids for name, ids in pairs.items() if ids[0] != ids[1]}
    if wrong or len(tokenizer) > text.vocab_size:
        raise ValueError(f"Tokenizer and model disagree (tokenizer id, model id): {wrong}; tokenizer size "
                         f"{len(tokenizer)} vs model vocabulary {text.vocab_size}. Use the processor saved "
                         "with the model.")


def unwrap_model(model: Any) -> Any:
    """The BLIP model inside a PeftModel and/or a ``DistributedDataParallel`` wrapper (or the model itself)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def image_tokens_per_view(model: Any) -> int:
    """The vision tower's tokens for one image: one per patch, plus the class token."""
    vision = unwrap_model(model).config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 + 1


def is_quantized(model: Any) -> bool:
    base = unwrap_model(model)
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


# --------------------------------------------------------------------------------------- LoRA
def lora_target_regex(config: MedcapConfig) -> str:
    """peft ``target_modules`` regex: text names inside ``text_decoder`` only; vision names inside
    ``vision_model`` when ``config.lora_vision`` (all four of qkv/projection/fc1/fc2 unless some are listed)."""
    text = [m for m in config.lora_target_modules if m in TEXT_LORA_TARGETS]
    vision = [m for m in config.lora_target_modules if m in VISION_LORA_TARGETS]
    if vision and not config.lora_vision:
        raise ConfigError(f"lora_target_modules lists vision-tower layers {vision}; set lora_vision=True "
                          "to adapt the vision tower.")
    if config.lora_vision and not vision:
        vision = list(VISION_LORA_TARGETS)
    parts = []
    if text:
        parts.append(rf"text_decoder\..*\.({'|'.join(text)})")
    if vision:
        parts.append(rf"vision_model\..*\.({'|'.join(vision)})")
    if not parts:
        raise ConfigError("No LoRA target left: list text-decoder layers (query, key, value, dense) in "
                          "lora_target_modules or set lora_vision=True.")
    return "^(" + "|".join(parts) + ")$"


@contextlib.contextmanager
def quiet_deprecations() -> Iterator[None]:
    """peft still calls transformers' deprecated ``gradient_checkpointing_enable``/``is_gradient_checkpointing``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(gradient_checkpointing|is_gradient_checkpointing).*",
                                category=FutureWarning)
        yield


def remove_input_grad_hooks(model: Any) -> int:
    """Remove the ``enable_input_require_grads`` hooks (the source of BLIP's in-place crash); return how many."""
    removed = 0
    for module in unwrap_model(model).modules():
        hooks = getattr(module, "_require_grads_hooks", None) or []
        single = getattr(module, "_require_grads_hook", None)
        for hook in {id(h): h for h in [*hooks, *([single] if single is not None else [])]}.values():
            hook.remove()
            removed += 1
        for name in ("_require_grads_hooks", "_require_grads_hook"):
            if hasattr(module, name):
                with contextlib.suppress(AttributeError):
                    delattr(module, name)
    return removed


def enable_gradient_checkpointing(model: Any) -> None:
    """Non-reentrant activation checkpointing on BLIP (no input-grad hook needed; see module docstring)."""
    base = unwrap_model(model)
    kwargs = {"use_reentrant": False}
    with quiet_deprecations():
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # transformers < 5.x naming
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    base.config.use_cache = False


def checkpoint_decoder_layers(model: Any, count: int | None = None) -> int:
    """With checkpointing on, recompute only the first ``count`` text-decoder layers in the backward pass
    (None: all of them); the others keep their activations: less recomputation for more memory. Returns
    how many layers are checkpointed."""
    layers = unwrap_model(model).text_decoder.bert.encoder.layer
    count = len(layers) if count is None else count
    if not 0 <= count <= len(layers):
        raise ValueError(f"count must be between 0 and {len(layers)} (the decoder's layers), got {count}")
    checkpointed = 0
    for index, layer in enumerate(layers):
        if hasattr(layer, "_gradient_checkpointing_func"):  # set by enable_gradient_checkpointing
            layer.gradient_checkpointing = index < count
            checkpointed += index < count
    return checkpointed


def attach_lora(model: Any, config: MedcapConfig, gradient_checkpointing: bool | None = None) -> Any:
    """Wrap ``model`` in a peft LoRA model per ``config`` (see :func:`lora_target_regex`).

    k-bit models go through ``prepare_model_for_kbit_training`` (freeze, fp32 norms/embeddings) with
    non-reentrant checkpointing so that no input-grad hook is registered; gradient checkpointing
    defaults to ``config.gradient_checkpointing``. LoRA weights are initialised from ``config.seed``.
    With ``config.sdpa_attention`` the decoder's cache-free attention runs fused (:mod:`medcap_helpers.attention`);
    with ``config.dequantize_frozen_weights`` its 4-bit layers multiply by weights dequantized once
    (:mod:`medcap_helpers.frozen_weights`).
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    checkpointing = config.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    lora_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                             target_modules=lora_target_regex(config), bias="none")
    with quiet_deprecations(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # reproducible LoRA A init without touching the global RNG
        if is_quantized(model):
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
        peft_model = get_peft_model(model, lora_config)
    remove_input_grad_hooks(peft_model)
    if checkpointing:
        enable_gradient_checkpointing(peft_model)
    if config.sdpa_attention:
        use_sdpa_attention(peft_model)
    if config.dequantize_frozen_weights:
        dequantize_frozen_weights(peft_model)
    return peft_model


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int, float]:
    """(trainable, total, trainable share); 4-bit weights count as their unpacked number of values."""
    trainable = total = 0
    for param in model.parameters():
        count = param.numel()
        if param.__class__.__name__ == "Params4bit":
            storage = getattr(param, "quant_storage", None)
            count *= 2 * (storage.itemsize if isinstance(storage, torch.dtype) else 1)
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total, (trainable / total if total else 0.0)


def describe_trainable(model: torch.nn.Module, echo: bool = True) -> str:
    """One line: trainable / total parameters (and print it)."""
    trainable, total, share = trainable_parameters(model)
    line = f"trainable params: {trainable:,} || all params: {total:,} || trainable: {100 * share:.3f}%"
    if echo:
        print(line)
    return line


def count_parameters_meta(blip_config: BlipConfig) -> int:
    """Parameters of ``BlipForConditionalGeneration(blip_config)`` counted on the meta device (no memory)."""
    from transformers import BlipForConditionalGeneration

    with torch.device("meta"):
        model = BlipForConditionalGeneration(blip_config)
    return sum(p.numel() for p in model.parameters())


