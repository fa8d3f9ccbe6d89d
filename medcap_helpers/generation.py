"""Report generation: every system's reports for a split, batch by batch (base, 4-bit, peft, merged).

Generation runs in two parts: the vision tower turns each batch's images into the decoder's memory
(:func:`~medcap_helpers.multiview.view_tokens`), then the text decoder writes the reports token by
token. Writing a token is launch-bound (hundreds of small kernels per step, whatever the batch), and a
4-bit layer with LoRA adds a dequantization and two adapter matmuls to every one of its matmuls. So by
default the decoder generates from a **16-bit copy** of itself (:func:`decoder_for_generation`): the
4-bit weights dequantized to the compute dtype, the adapter merged in. That is the same arithmetic the
4-bit layer does for every matmul, done once per call instead of once per token (a test checks the
logits agree); it costs the copy's memory (about 0.3 GB at BLIP-large size).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from peft.utils.integrations import dequantize_module_weight
from torch import nn
from tqdm.auto import tqdm

from medcap_helpers import vision_cache
from medcap_helpers.config import MedcapConfig
from medcap_helpers.decoding_graph import CACHE_ARGUMENT, StaticDecodingStep
from medcap_helpers.devices import (
    GB,
    OutOfMemory,
    allocator_cap_bytes,
    allocator_state,
    is_out_of_memory,
    model_device,
    out_of_memory,
    private_pool_free_bytes,
    release_memory,
)
from medcap_helpers.model import image_tokens_per_view, unwrap_model
from medcap_helpers.multiview import generate_from_tokens, multiview_generate
from medcap_helpers.processing import pixel_batch

if TYPE_CHECKING:  # pragma: no cover
    from transformers import BlipProcessor


class RowColumn(Sequence[Any]):
    """``rows[i][key]`` as a lazy sequence (no decoding of a dataset's whole image column)."""

    def __init__(self, rows: Any, key: str) -> None:
        self.rows, self.key = rows, key

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: Any) -> Any:  # type: ignore[override]
        if isinstance(index, slice):
            return [self.rows[i][self.key] for i in range(*index.indices(len(self)))]
        return self.rows[index][self.key]


class StudyViews(Sequence[Any]):
    """Each row's views as a list (``image``, then ``image_2`` when present), decoded row by row."""

    def __init__(self, rows: Any) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: Any) -> Any:  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        row = self.rows[index]
        return [row["image"]] + ([row["image_2"]] if row.get("image_2") is not None else [])


def has_second_views(rows: Any) -> bool:
    """True when any row carries a second view (a ``views="both"`` split)."""
    if hasattr(rows, "column_names"):
        return "image_2" in rows.column_names and any(
            v is not None for v in rows.with_format(None).select_columns(["image_2"])["image_2"])
    return any(row.get("image_2") is not None for row in rows)


def study_inputs(rows: Any) -> Sequence[Any]:
    """What :func:`generate_reports` reads for a split: the views of each study, or each row's image."""
    return StudyViews(rows) if has_second_views(rows) else RowColumn(rows, "image")


def _effective_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias a (4-bit, LoRA) linear layer multiplies by: dequantized, active adapters merged."""
    if isinstance(module, LoraLayer):
        base = module.get_base_layer()
        weight = dequantize_module_weight(base).detach().float()
        if not module.merged and not module.disable_adapters:
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    weight = weight + module.get_delta_weight(adapter).float()
        return weight, base.bias
    return dequantize_module_weight(module).detach(), module.bias


SET_MEMORY_STUDIES = 4
"""Studies whose image tokens :meth:`SharedMemoryCrossAttention.set_memory` projects at once."""


class SharedMemoryCrossAttention(nn.Module):
    """A decoder layer's cross-attention whose keys and values are computed once per study and shared by
    the study's beams.

    Beam search copies each study's image tokens once per beam, and BLIP's own cross-attention then keeps
    keys and values for every copy: identical, and most of generation's memory. Here they are computed
    from one copy per study (beams are contiguous rows, and reordering beams never crosses studies) and the
    beams' queries attend to them together. BLIP's cross-attention uses no attention mask, and neither
    does this one; the arithmetic is the same.
    """

    def __init__(self, attention: nn.Module, num_beams: int) -> None:
        super().__init__()
        self.attention, self.num_beams = attention, num_beams
        self.rows = 0
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget the last batch's keys and values: call before generating for another batch (transformers
        hands the image tokens over anew at every step, so a new batch cannot be told by its tensor)."""
        self.keys = self.values = None

    def set_memory(self, encoder_hidden_states: torch.Tensor) -> None:
        """Keys and values of a batch's image tokens (one copy per study), written into the last batch's
        tensors when the shapes agree: a step recorded as a CUDA graph reads them at fixed addresses.
        Projected a few studies at a time, straight into those tensors: projecting the whole batch at once
        took about 0.35 GB more for a moment at BLIP-large size (37 studies, two views)."""
        attention = self.attention.self
        heads, size = attention.num_attention_heads, attention.attention_head_size
        memory = encoder_hidden_states[:: self.num_beams]
        studies, tokens = memory.shape[:2]
        shape = (studies, heads, tokens, size)
        if self.keys is None or self.values is None or self.keys.shape != shape:
            self.keys = self.values = None  # freed before the next batch's are made
            self.keys = memory.new_empty(shape)
            self.values = memory.new_empty(shape)
        for start in range(0, studies, SET_MEMORY_STUDIES):
            chunk = memory[start:start + SET_MEMORY_STUDIES]
            rows = slice(start, start + len(chunk))
            # stored contiguous: a strided copy would otherwise be made of them at every step
            self.keys[rows] = attention.key(chunk).view(len(chunk), tokens, heads, size).transpose(1, 2)
            self.values[rows] = attention.value(chunk).view(len(chunk), tokens, heads, size).transpose(1, 2)
        self.rows = encoder_hidden_states.shape[0]

    def attend(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The layer's cross-attention output (after its dense layer and layer norm) for ``hidden_states``."""
        assert self.keys is not None and self.values is not None, "set_memory() first"
        attention = self.attention.self
        heads, size = attention.num_attention_heads, attention.attention_head_size
        studies = self.keys.shape[0]
        rows, length = hidden_states.shape[:2]
        beams = rows // studies
        # The beams' queries side by side, as if one longer sequence per study.
        query = attention.query(hidden_states).view(studies, beams, length, heads, size)
        query = query.permute(0, 3, 1, 2, 4).reshape(studies, heads, beams * length, size)
        context = F.scaled_dot_product_attention(query, self.keys, self.values)  # softmax(q k^T / sqrt(size)) v
        context = context.view(studies, heads, beams, length, size).permute(0, 2, 3, 1, 4)
        context = context.reshape(rows, length, heads * size)
        return self.attention.output(context, hidden_states)

    def forward(self, hidden_states: torch.Tensor, *args: Any, encoder_hidden_states: torch.Tensor | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, None]:
        if self.keys is None or self.rows != encoder_hidden_states.shape[0]:  # a new batch (see reset)
            self.set_memory(encoder_hidden_states)
        return self.attend(hidden_states), None


def _generation_dtype(decoder: nn.Module) -> torch.dtype:
    """The dtype the decoder's 4-bit layers compute in (else its parameters' floating dtype)."""
    for module in decoder.modules():
        if getattr(module, "compute_dtype", None) is not None:
            return module.compute_dtype
    return next(p.dtype for p in decoder.parameters() if p.is_floating_point())


def needs_decoder_copy(model: Any) -> bool:
    """True when the text decoder has 4-bit or unmerged LoRA layers (a copy then generates faster)."""
    decoder = unwrap_model(model).text_decoder
    return any(isinstance(m, LoraLayer) or type(getattr(m, "weight", None)).__name__ == "Params4bit"
               for m in decoder.modules())


@torch.no_grad()
def decoder_for_generation(model: Any, num_beams: int = 1) -> nn.Module:
    """A plain 16-bit copy of ``model``'s text decoder, 4-bit weights dequantized and LoRA merged, whose
    cross-attention keeps one set of keys and values per study for its ``num_beams`` beams
    (:class:`SharedMemoryCrossAttention`).

    Every linear layer of the copy holds exactly the weight its source multiplies by, in the dtype
    the source computes in; other parameters and buffers are copied as they are. The model itself is
    not changed.
    """
    source = unwrap_model(model).text_decoder
    with torch.device("meta"):
        copy = type(source)(source.config)
    source_names = {id(module): name for name, module in copy.named_modules()}
    copy.generation_config = source.generation_config
    for layer in copy.bert.encoder.layer:
        if hasattr(layer, "crossattention"):
            layer.crossattention = SharedMemoryCrossAttention(layer.crossattention, num_beams)
    # each module's name in the source (strings: a mapping that held the modules would keep the copy alive)
    copy._medcap_source_names = {name: source_names[id(module)]  # type: ignore[assignment]
                                 for name, module in copy.named_modules() if id(module) in source_names}
    return load_generation_weights(copy, model)


@torch.no_grad()
def load_generation_weights(copy: nn.Module, model: Any) -> nn.Module:
    """Fill ``copy`` (made by :func:`decoder_for_generation`) with ``model``'s decoder weights, in new
    memory on the model's device: dequantized, LoRA merged, in the dtype the source computes in."""
    source = unwrap_model(model).text_decoder
    copy.to(_generation_dtype(source)).to_empty(device=next(source.parameters()).device)
    for copy_name, name in copy._medcap_source_names.items():
        module = copy.get_submodule(copy_name)
        if isinstance(module, nn.Linear):
            weight, bias = _effective_weight(source.get_submodule(name))
            module.weight.copy_(weight)
            if bias is not None:
                module.bias.copy_(bias)
        elif name and module._parameters:
            original = source.get_submodule(name)
            for param_name, param in module.named_parameters(recurse=False):
                param.copy_(getattr(original, param_name))
        for buffer_name, buffer in module.named_buffers(recurse=False):
            buffer.copy_(getattr(source.get_submodule(name), buffer_name))
    copy.tie_weights()
    return copy.eval()


def compile_decoding_step(decoder: nn.Module, backend: str = "inductor") -> nn.Module:
    """``decoder`` with its forward (one decoding step) compiled as one graph (``fullgraph``: a graph break
    raises instead of silently running eager), for one batch shape (``dynamic=False``: another batch size,
    as after an out-of-memory retry, is compiled again for its own static shapes, never for a symbolic
    batch; on an H100 a compiled call that went on after such a retry had not finished after 200 s, cause
    unknown). ``"inductor"`` generates fused kernels in its default mode: ``reduce-overhead`` recorded no
    CUDA graphs (torch skips them, as the static cache's ``index_copy_`` mutates the step's inputs) and its
    graph trees broke the reuse across calls ("Running CUDAGraph after shutdown"). ``"cudagraphs"``
    records the traced step as CUDA graphs without generating code; tests use ``"eager"``, which traces
    only. Needs the static key/value cache (``cache_implementation="static"``), so that every step has the
    same shapes.

    A generation's first step (the prefill, which allocates the static cache) runs uncompiled, as
    transformers' own compiled generation does: allocated inside a traced step, the cache's tensors are
    not marked as static addresses, which makes torch skip the CUDA graphs, and the step would be
    compiled twice, before and after the allocation."""
    eager_step = decoder.forward
    compiled_step = torch.compile(eager_step, backend=backend, fullgraph=True, dynamic=False)

    @functools.wraps(eager_step)  # generate() reads the step's signature to check its arguments
    def decoding_step(*args: Any, **kwargs: Any) -> Any:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # its name differs between transformers 5.x
        return (compiled_step if getattr(cache, "is_initialized", False) else eager_step)(*args, **kwargs)

    decoder.forward = decoding_step
    return decoder


_compiled_decoders: dict[tuple[Any, ...], nn.Module] = {}
"""The compiled decoding step's decoder, one per process (see :func:`compiled_decoder_for_generation`)."""
_batch_size_after_oom: dict[tuple[Any, ...], int] = {}
"""The batch size :func:`generate_reports` went on with after a batch ran out of memory, per decoder and
settings: a process's later calls start there. Before this, the first batch of 10 calls in a whole
rehearsal's 03-06 ran out of memory, and each call halved it anew (the measured memory of a batch:
``benchmarks/results/decoding_memory.json``)."""
_compile_failures: list[str] = []
"""Why the compiled decoding step failed in this process, if it did: later calls then generate eagerly."""
_graph_failures: list[str] = []
"""Why the decoding step could not run as a CUDA graph in this process, if it could not (then not tried again)."""


def compiled_decoder_for_generation(model: Any, num_beams: int, backend: str) -> nn.Module:
    """:func:`decoder_for_generation` with its step compiled (:func:`compile_decoding_step`) once per
    process and reused: a later call (another sweep trial, another split, a merged model of the same
    architecture) refills the same modules with its model's weights, which keeps dynamo's compiled code
    (21 s to compile BLIP-large's step with inductor on an H100, where a call of 64 studies takes about 3 s).
    Between calls the copy holds no GPU memory (:func:`release_generation_decoder`)."""
    source = unwrap_model(model).text_decoder
    key = (source.config.to_json_string(), str(_generation_dtype(source)), num_beams, backend)
    decoder = _compiled_decoders.get(key)
    if decoder is None:
        _compiled_decoders.clear()
        decoder = _compiled_decoders[key] = compile_decoding_step(decoder_for_generation(model, num_beams), backend)
        return decoder
    return load_generation_weights(decoder, model)


def release_generation_decoder(decoder: nn.Module) -> None:
    """Free the GPU memory of a compiled decoder between calls, so that training between two calls has it:
    its weights, refilled by the next call (the compiled code is kept)."""
    decoder.to_empty(device="meta")
    for module in decoder.modules():
        if isinstance(module, SharedMemoryCrossAttention):
            module.reset()


@torch.no_grad()
def generate_reports(model: Any, processor: BlipProcessor, images: Sequence[Any], max_new_tokens: int = 100,
                     num_beams: int = 1, batch_size: int = 8, device: torch.device | str | None = None,
                     progress: bool = True, min_new_tokens: int | None = None,
                     decoder_copy: bool = True, compile_backend: str | None = None,
                     graph_step: bool = False) -> list[str]:
    """Reports for ``images`` (greedy when ``num_beams == 1``), decoded without special tokens.

    ``images`` needs only ``len`` and integer indexing (PIL images, paths, arrays, or a list of a study's
    views), so a :class:`RowColumn` or :class:`StudyViews` over a dataset decodes one batch at a time.
    Works for base, 4-bit and peft models; restores the model's train/eval mode afterwards.
    ``decoder_copy`` generates from :func:`decoder_for_generation` when the decoder is 4-bit or has LoRA;
    ``compile_backend`` then compiles its decoding step (:func:`compile_decoding_step`, static cache);
    ``graph_step`` instead runs the copy's step on fixed buffers, replayed as a CUDA graph on a GPU
    (:class:`~medcap_helpers.decoding_graph.StaticDecodingStep`; eagerly on the CPU). A step that cannot be
    recorded falls back to the plain copy with a warning, for the rest of the process.
    A batch that runs out of memory is retried at three quarters of its size (down to one study), with a
    warning; the smaller batch is kept for the rest of the call and for the process's later calls with the
    same decoder and settings (:data:`_batch_size_after_oom`), which would run out of memory the same way.
    Out of memory at one study raises :class:`~medcap_helpers.devices.OutOfMemory`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    device = torch.device(device) if device is not None else model_device(model)
    requested_batch_size = batch_size
    was_training = model.training
    model.eval()
    base = unwrap_model(model)
    # compile (or record) a copy, not the model
    use_copy = decoder_copy and (needs_decoder_copy(model) or compile_backend is not None or graph_step)
    compiled = compile_backend is not None and use_copy and not _compile_failures
    graphed = graph_step and use_copy and not compiled and not _graph_failures
    static_step: StaticDecodingStep | None = None
    if compiled:
        decoder = compiled_decoder_for_generation(model, num_beams, compile_backend)
    else:
        decoder = decoder_for_generation(model, num_beams) if use_copy else base.text_decoder
    shared_cross_attention = shared_cross_attention_modules(decoder)
    settings: dict[str, Any] = dict(max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
    if compiled:
        settings["cache_implementation"] = "static"
    if min_new_tokens:  # the rehearsal's fixed report length
        settings["min_new_tokens"] = min_new_tokens
    oom_key = (base.text_decoder.config.to_json_string(), str(device), num_beams, max_new_tokens, min_new_tokens,
               compiled, graphed)
    batch_size = min(batch_size, _batch_size_after_oom.get(oom_key, batch_size))
    reports: list[str] = []
    oom: OutOfMemory | None = None
    try:
        with tqdm(total=len(images), desc="Generating reports", unit="img", disable=not progress,
                  leave=False) as bar:
            while len(reports) < len(images) and oom is None:
                start = len(reports)
                batch = [images[i] for i in range(start, min(start + batch_size, len(images)))]
                # A compiled (recorded) step is compiled (recorded) again for every new batch shape:
                # a short last batch is padded with its last study, whose extra reports are dropped
                # (never beyond the call's studies: a call of 5 studies runs a batch of 5).
                padding = min(batch_size, len(images)) - len(batch) if compiled or graphed else 0
                batch += [batch[-1]] * padding
                try:
                    if graphed:  # the step's buffers stay (the image tokens' keys are refilled in place)
                        if static_step is None or static_step.rows != len(batch) * num_beams:
                            _forget_batch(static_step, shared_cross_attention)
                            static_step = StaticDecodingStep(decoder, len(batch) * num_beams, num_beams,
                                                             max_new_tokens, use_graph=device.type == "cuda").install()
                        settings[CACHE_ARGUMENT] = static_step.new_batch()
                    else:
                        _forget_batch(None, shared_cross_attention)
                    if isinstance(batch[0], torch.Tensor):  # cached image tokens (vision_cache.StudyTokens)
                        output = generate_from_tokens(base, torch.stack(batch), decoder=decoder, **settings)
                    else:
                        pixel_values = pixel_batch(processor, batch).to(device)
                        if pixel_values.ndim == 4:
                            pixel_values = pixel_values.unsqueeze(1)
                        output = multiview_generate(base, pixel_values, decoder=decoder, **settings)
                except Exception as err:  # noqa: BLE001 - out of memory and a failed compiled step are handled
                    if graphed and not is_out_of_memory(err):  # e.g. an operator that cannot be recorded
                        _graph_failures.append(f"{type(err).__name__}: {err}")
                        warnings.warn(f"The decoding step could not run as a CUDA graph ({_graph_failures[-1][:300]}); "
                                      "reports are generated without it from now on (graph_generation=False avoids "
                                      "the attempt).", RuntimeWarning, stacklevel=2)
                        _forget_batch(static_step, shared_cross_attention)
                        static_step = None
                        decoder, graphed = decoder_for_generation(model, num_beams), False
                        shared_cross_attention = shared_cross_attention_modules(decoder)
                        settings.pop(CACHE_ARGUMENT, None)
                        continue
                    if compiled and not is_out_of_memory(err):  # e.g. no working Triton: generate eagerly
                        _compile_failures.append(f"{type(err).__name__}: {err}")
                        warnings.warn(f"The compiled decoding step failed ({_compile_failures[-1][:300]}); reports "
                                      "are generated without it from now on (compile_generation=False avoids "
                                      "the attempt).", RuntimeWarning, stacklevel=2)
                        release_generation_decoder(decoder)
                        _compiled_decoders.clear()
                        decoder, compiled = decoder_for_generation(model, num_beams), False
                        shared_cross_attention = shared_cross_attention_modules(decoder)
                        settings.pop("cache_implementation")
                        continue
                    if isinstance(err, OutOfMemory) or not is_out_of_memory(err):
                        raise
                    _forget_batch(static_step, shared_cross_attention)  # a recorded step is made again, smaller
                    static_step = None
                    if len(batch) == 1:
                        oom = _generation_oom(err, requested_batch_size, num_beams, max_new_tokens, len(reports), len(images))
                    batch_size = max(1, len(batch) * 3 // 4)
                    if len(batch) > 1:  # said, not silent; this call's later batches and the process's later calls
                        _batch_size_after_oom[oom_key] = batch_size  # never above what it held: the call started there
                        state = allocator_state(device)  # the error still holds the failed batch's tensors
                        warnings.warn(f"Generating reports: a batch of {len(batch)} studies ran out of GPU memory; "
                                      f"going on with batches of {batch_size}."
                                      + (f" Memory at the failure: {state}." if state else ""),
                                      RuntimeWarning, stacklevel=2)
                    continue
                texts = processor.tokenizer.batch_decode(output, skip_special_tokens=True)[:len(batch) - padding]
                reports.extend(" ".join(t.split()) for t in texts)
                bar.update(len(texts))
    finally:
        _forget_batch(static_step, shared_cross_attention)  # a batch's keys and values: free them now
        settings.pop(CACHE_ARGUMENT, None)
        del static_step
        if compiled:
            release_generation_decoder(decoder)
        del decoder, shared_cross_attention
        model.train(was_training)
    if oom is not None:  # raised here, outside the except block, so the failed batch's tensors are freed
        release_memory()
        raise oom
    return reports


def shared_cross_attention_modules(decoder: nn.Module) -> list[SharedMemoryCrossAttention]:
    """The decoder copy's cross-attention layers that keep one set of image-token keys per study."""
    return [m for m in decoder.modules() if isinstance(m, SharedMemoryCrossAttention)]


def _forget_batch(static_step: StaticDecodingStep | None,
                  shared_cross_attention: list[SharedMemoryCrossAttention]) -> None:
    """Free the recorded step, if any, and the last batch's image-token keys and values."""
    if static_step is not None:
        static_step.release()
    for module in shared_cross_attention:
        module.reset()


def _generation_oom(error: BaseException, batch_size: int, num_beams: int, max_new_tokens: int, done: int,
                    total: int) -> OutOfMemory:
    advice = []
    if batch_size > 1:
        advice.append(f"a smaller batch (eval_batch_size={max(1, batch_size // 2)})")
    if num_beams > 1:
        advice.append("greedy decoding (num_beams=1) or fewer beams")
    advice += [f"shorter reports (max_new_tokens below {max_new_tokens})",
               "free GPU memory held by other models or processes"]
    return out_of_memory("generating reports", error,
                         {"batch_size": batch_size, "num_beams": num_beams, "max_new_tokens": max_new_tokens},
                         advice, note=f"{done} of {total} reports were generated before it failed.")


def study_generation_bytes(model: Any, config: MedcapConfig, dtype_bytes: int = 2,
                           shared_cross_attention: bool = True) -> int:
    """Estimated GPU bytes one study takes while its reports are generated (beams included).

    Dominated by the decoder's key/value caches: each of the decoder's layers keeps the keys and values
    of all image tokens (cross-attention: once per study with :class:`SharedMemoryCrossAttention`, else
    once per beam) and, for every beam, of the tokens written so far (self-attention); with
    BLIP-large, two views and three beams about 0.05 GB per study shared, 0.14 GB per beam. Plus the
    image tokens repeated per beam and the beam scores over the vocabulary. (Checked against measured
    peaks: ``benchmarks/full_profile.py``.)
    """
    base = unwrap_model(model)
    text, vision = base.config.text_config, base.config.vision_config
    views = 2 if config.views == "both" else 1
    image_tokens = views * image_tokens_per_view(base)
    beams = config.num_beams
    layer_bytes = text.num_hidden_layers * 2 * text.hidden_size * dtype_bytes  # keys and values, every layer
    cross = layer_bytes * image_tokens * (1 if shared_cross_attention else beams)
    written = layer_bytes * (config.max_new_tokens + 1) * beams
    memory = image_tokens * vision.hidden_size * dtype_bytes * beams
    scores = 4 * text.vocab_size * 4 * beams
    return cross + written + memory + scores


GENERATION_WORKSPACE_BYTES = int(0.14 * GB)
"""What a generation batch allocates beyond the decoder copy and its studies' share: the intercept of its
peak against the number of studies, 0.12-0.14 GB for BLIP-large on an H100 at 8-40 studies
(``python benchmarks/decoding.py --memory-per-study 8,16,24,32,40``, ``benchmarks/results/decoding_memory.json``)."""


def decoder_copy_bytes(model: Any) -> int:
    """GPU bytes of the 16-bit decoder copy that generation makes for ``model`` (0 when it makes none)."""
    if not needs_decoder_copy(model):
        return 0
    return 2 * sum(p.numel() for p in unwrap_model(model).text_decoder.parameters())


def generation_batch_size(model: Any, config: MedcapConfig, device: torch.device | str | None = None,
                          margin: float = 0.1) -> int:
    """How many studies to generate at once: ``config.eval_batch_size``, or fewer when the GPU budget
    holds fewer (see :func:`study_generation_bytes`; the decoder's 16-bit copy is counted). At least 1.

    The budget is what PyTorch's allocator may hold of ``config.vram_budget_gb`` (its cap, set by
    :func:`~medcap_helpers.devices.cap_gpu_memory`: the budget less the CUDA context and library
    workspaces), less ``margin``, what is allocated already, what CUDA graphs' private pools hold unused
    (compiled training's, between epochs: :func:`~medcap_helpers.devices.private_pool_free_bytes`, 0.58 GB
    in a compiled rehearsal run on an H100) and :data:`GENERATION_WORKSPACE_BYTES`. Beside those training
    graphs the estimate still fell 0.3-0.5 GB short there (a batch of 20 retried at 15, then 11). Sized
    against the whole budget instead, the first batch of every call ran out of memory on an H100 and was
    retried at half the size."""
    device = torch.device(device) if device is not None else model_device(model)
    if config.vram_budget_gb is None or device.type != "cuda":
        return config.eval_batch_size
    copy_bytes = decoder_copy_bytes(model)
    free = (min(config.vram_budget_gb * GB, allocator_cap_bytes(device)) * (1 - margin)
            - torch.cuda.memory_allocated(device) - private_pool_free_bytes(device) - copy_bytes
            - GENERATION_WORKSPACE_BYTES)
    per_study = study_generation_bytes(model, config, shared_cross_attention=copy_bytes > 0)
    return max(1, min(config.eval_batch_size, int(free // per_study)))


def generation_inputs(model: Any, processor: Any, rows: Any, config: MedcapConfig) -> Sequence[Any]:
    """What :func:`generate_reports` reads for ``rows``: with ``cache_vision_embeddings``, the studies'
    cached image tokens (cached now where missing: the key follows ``model``'s vision tower, so a merged or
    re-quantized model gets its own); else their images (:func:`study_inputs`)."""
    cache = vision_cache.prepare_cache(config, model, processor, [rows], progress=False)
    if cache is None:
        return study_inputs(rows)
    return vision_cache.StudyTokens(rows, cache, has_second_views(rows))


def generate_for_split(model: Any, processor: Any, split: Any, config: MedcapConfig) -> list[str]:
    """A report for every row (study or image) of ``split`` with the config's generation settings."""
    inputs = generation_inputs(model, processor, split, config)
    return generate_reports(model, processor, inputs, max_new_tokens=config.max_new_tokens,
                            num_beams=config.num_beams, batch_size=generation_batch_size(model, config),
                            min_new_tokens=config.min_new_tokens, compile_backend=compile_backend(model, config),
                            graph_step=graph_step(model, config))


def compile_backend(model: Any, config: MedcapConfig) -> str | None:
    """``"inductor"`` when ``config.compile_generation`` asks for it and the model is on a GPU, else None."""
    return "inductor" if config.compile_generation and model_device(model).type == "cuda" else None


def graph_step(model: Any, config: MedcapConfig) -> bool:
    """True when ``config.graph_generation`` asks for the recorded decoding step and the model is on a GPU."""
    return config.graph_generation and model_device(model).type == "cuda"
