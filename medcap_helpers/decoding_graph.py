"""One decoding step of the 16-bit decoder copy, replayed as a CUDA graph (``graph_generation``).

A beam-search step of BLIP-large issues about 570 small kernels from Python whatever the batch
(``benchmarks/results/decoding_ops.json``), 415 of them in the decoder: on a GPU the step is bound by
the CPU launching them, not by arithmetic. This module runs the decoder's step on fixed buffers: the
self-attention keys and values of every position in one tensor per layer (written in place at the step's
position, masked beyond it), the cross-attention's keys and values of the batch's image tokens
(:class:`~medcap_helpers.generation.SharedMemoryCrossAttention`, refilled in place for each batch), the
step's token ids, position and beam order in small input tensors. Every tensor the step touches then
keeps its address, so the step can be recorded once as a CUDA graph and replayed: one launch instead of
415. transformers' ``generate`` keeps doing the beam search (scores, length penalty, ``min_new_tokens``,
stopping): it calls the step through the copy's ``forward`` and reorders the beams through
:class:`StepCache`, whose reordering the next step applies inside the graph.

The step does the decoder's own arithmetic (the same modules, weights and attention math as
``BlipTextLMHeadModel``; a test compares the reports with transformers' path). It needs what generation in
this project always has: one start token per row and no padding (``attention_mask`` all ones). Without a
GPU the same step runs eagerly (how the tests check it on the CPU).
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions
from transformers.models.blip.modeling_blip_text import BlipTextLMHeadModel

CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(BlipTextLMHeadModel.forward).parameters else "past_key_values"
"""What ``generate`` and the decoder call the key/value cache (``past_key_values`` until transformers 5.2x)."""


class StepCache(DynamicCache):
    """What ``generate`` sees as the key/value cache: the positions written so far, and the beams' new
    order (``reorder_cache``), handed to the step, which keeps the keys and values itself."""

    def __init__(self, step: StaticDecodingStep) -> None:
        super().__init__()
        self.step = step

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.step.position

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.step.beam_order.copy_(beam_idx, non_blocking=True)


class StaticDecodingStep:
    """The decoding step of ``decoder`` (a copy from :func:`~medcap_helpers.generation.decoder_for_generation`)
    on fixed buffers for ``rows`` rows (studies x beams) and at most ``max_length`` positions.

    Install it with :meth:`install` (the copy's ``forward`` becomes the step), then call :meth:`new_batch`
    before each ``generate`` call and pass what it returns as the cache (:data:`CACHE_ARGUMENT`). ``use_graph`` records
    the step as a CUDA graph at its first call and replays it afterwards (CUDA only)."""

    def __init__(self, decoder: nn.Module, rows: int, num_beams: int, max_length: int, use_graph: bool) -> None:
        self.decoder = decoder
        self.rows, self.num_beams, self.max_length = rows, num_beams, max_length
        self.use_graph = use_graph
        parameter = next(decoder.parameters())
        device, dtype = parameter.device, parameter.dtype
        config = decoder.config
        self.heads = config.num_attention_heads
        self.head_size = config.hidden_size // config.num_attention_heads
        shape = (rows, self.heads, max_length, self.head_size)
        layers = decoder.bert.encoder.layer
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in layers]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in layers]
        self.token_ids = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.position_index = torch.zeros(1, dtype=torch.long, device=device)
        self.in_order = torch.arange(rows, device=device)
        self.beam_order = self.in_order.clone()
        self.positions = torch.arange(max_length, device=device)
        self.mask_fill = torch.finfo(dtype).min
        self.logits: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.position = 0
        self.cross_attention = [layer.crossattention for layer in layers]

    def install(self) -> StaticDecodingStep:
        """Make this step the copy's ``forward`` (``generate`` calls it for every token)."""
        original = self.decoder.forward

        @functools.wraps(original)  # generate() reads the step's signature to check its arguments
        def forward(*args: Any, **kwargs: Any) -> CausalLMOutputWithCrossAttentions:
            return self(*args, **kwargs)

        self.decoder.forward = forward
        return self

    def new_batch(self) -> StepCache:
        """Start a batch: position 0, beams in order; the cache handle to pass to ``generate``."""
        self.position = 0
        self.beam_order.copy_(self.in_order)
        return StepCache(self)

    def __call__(self, input_ids: torch.Tensor | None = None, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, **kwargs: Any) -> CausalLMOutputWithCrossAttentions:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if input_ids is None or input_ids.shape != (self.rows, 1) or encoder_hidden_states is None:
            got = None if input_ids is None else tuple(input_ids.shape)
            raise ValueError(f"The static decoding step takes one token for each of its {self.rows} rows and the "
                             f"image tokens; got input_ids of shape {got}.")
        if not isinstance(cache, StepCache) or cache.step is not self:
            raise ValueError(f"Pass the cache from StaticDecodingStep.new_batch() to generate() as {CACHE_ARGUMENT}.")
        if self.position >= self.max_length:
            raise ValueError(f"The static decoding step holds {self.max_length} positions; generation went past them.")
        if self.position == 0:
            if attention_mask is not None and not bool(attention_mask.all()):
                raise ValueError("The static decoding step takes no padding (attention_mask must be all ones).")
            for module in self.cross_attention:  # this batch's image tokens, into the same buffers
                module.set_memory(encoder_hidden_states)
        self.token_ids.copy_(input_ids, non_blocking=True)
        self.position_index.fill_(self.position)
        if self.use_graph:
            self._replay()
        else:
            self.logits = self._step()
        self.position += 1
        return CausalLMOutputWithCrossAttentions(logits=self.logits.clone(), **{CACHE_ARGUMENT: cache})

    def _replay(self) -> None:
        if self.graph is None:  # record once: warm up on a side stream (as torch's docs ask), then capture
            stream = _warm_up_stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._step()  # the same writes the replay makes: this step's keys and values
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # its own memory pool, freed with the graph
                self.logits = self._step()
        self.graph.replay()

    @torch.no_grad()
    def _step(self) -> torch.Tensor:
        """Logits of the next token from the buffers: reorder the beams' keys and values, embed the token at
        its position, then each layer (self-attention over the positions so far, cross-attention, feed-forward)."""
        if self.num_beams > 1:
            for buffer in (*self.keys, *self.values):
                buffer.copy_(buffer.index_select(0, self.beam_order))
            self.beam_order.copy_(self.in_order)  # applied once: a step without a reorder keeps the order
        bert = self.decoder.bert
        hidden = bert.embeddings(input_ids=self.token_ids, position_ids=self.position_index.view(1, 1))
        # BLIP's additive causal mask, over the whole buffer: positions after this one are not written yet
        mask = torch.where(self.positions <= self.position_index, 0.0, self.mask_fill).to(hidden.dtype)
        for layer, keys, values, cross in zip(bert.encoder.layer, self.keys, self.values, self.cross_attention):
            attention = layer.attention.self
            shape = (self.rows, 1, self.heads, self.head_size)
            query = attention.query(hidden).view(shape).transpose(1, 2)
            keys.index_copy_(2, self.position_index, attention.key(hidden).view(shape).transpose(1, 2))
            values.index_copy_(2, self.position_index, attention.value(hidden).view(shape).transpose(1, 2))
            scores = torch.matmul(query, keys.transpose(-1, -2)) / math.sqrt(self.head_size) + mask
            context = torch.matmul(nn.functional.softmax(scores, dim=-1), values)
            context = context.permute(0, 2, 1, 3).reshape(self.rows, 1, self.heads * self.head_size)
            hidden = layer.attention.output(context, hidden)
            hidden = cross.attend(hidden)
            hidden = layer.output(layer.intermediate(hidden), hidden)
        return self.decoder.cls(hidden)

    def release(self) -> None:
        """Free the graph and the buffers and give the copy its own ``forward`` back (the copy's
        cross-attention keeps its keys until reset). The installed ``forward`` refers to this step, which
        refers to the copy: left in place, that cycle kept the copy's 0.3 GB until the garbage collector's
        next pass, and every generation call on a GPU started with less memory than the one before."""
        self.graph = None
        self.logits = None
        self.keys, self.values, self.cross_attention = [], [], []
        vars(self.decoder).pop("forward", None)


_warm_up_streams: dict[int, torch.cuda.Stream] = {}
"""Per GPU, the side stream that warms a step up before it is recorded, one per process: every new stream
gets a cuBLAS workspace of its own, kept until the process ends. With a new stream (and pool) per
recording an H100's generation batches shrank by a study at every call (37, 36, 35, 34); with one stream
and one shared pool, by one study once (37, 36, 36), but the shared pool failed from the second call on
(an internal assert in PyTorch's allocator: the first graph, and with it the pool, had been freed). So
each recording keeps its own pool, freed with it: on an H100, 37, 35, 35, 35 over four calls, no fallback."""


def _warm_up_stream() -> torch.cuda.Stream:
    device = torch.cuda.current_device()
    if device not in _warm_up_streams:
        _warm_up_streams[device] = torch.cuda.Stream()
    return _warm_up_streams[device]
