"""BLIP configs, tiny model, 4-bit loading, LoRA placement, the checkpointing fix, generation."""

from __future__ import annotations

import json

from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from medcap_helpers import devices, errors, generation
from medcap_helpers import model as M
from medcap_helpers.config import ConfigError, MedcapConfig
from medcap_helpers.processing import CaptionCollator, build_offline_processor

REPORTS = [
    "The heart size is normal. The lungs are clear.",
    "Small left pleural effusion.",
    "No acute cardiopulmonary disease.",
    "Mild cardiomegaly with clear lungs.",
]
COLOURS = [(255, 0, 0), (0, 0, 255), (0, 160, 0), (255, 255, 255)]


def _rows():
    return [{"image": Image.new("RGB", (72, 72), COLOURS[i]), "text": t} for i, t in enumerate(REPORTS)]


def _config(tmp_path, **overrides) -> MedcapConfig:
    values = dict(run_dir=str(tmp_path / "run"), lora_dropout=0.0, max_new_tokens=12)
    values.update(overrides)
    return MedcapConfig.from_profile("smoke", **values)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, processor) of a saved tiny random BLIP (64 px images)."""
    folder = tmp_path_factory.mktemp("tiny_model")
    processor = build_offline_processor(REPORTS, image_size=64)
    M.create_tiny_model(folder, processor, init_range=0.5, seed=0)
    return folder, processor


def _lora_a_names(model) -> list[str]:
    return [name for name, module in model.named_modules() if name.endswith("lora_A")]


def _batch(processor):
    return CaptionCollator(processor, max_length=32)(_rows())


# ------------------------------------------------------------------------------------ configs
def test_blip_large_config_matches_reference_and_has_446m_parameters(blip_large_reference):
    reference = json.loads(blip_large_reference.read_text())
    assert M.blip_large_values()["text_config"] == reference["text_config"]  # the package carries the facts
    assert M.blip_large_values()["vision_config"] == reference["vision_config"]
    config = M.blip_large_config()
    for key, value in reference["text_config"].items():
        assert getattr(config.text_config, key) == value, key
    for key, value in reference["vision_config"].items():
        assert getattr(config.vision_config, key) == value, key
    count = M.count_parameters_meta(config)  # meta device: no 1.8 GB allocation
    assert count == pytest.approx(446.3e6, rel=0.005)


def test_tiny_model_is_saved_as_safetensors_and_matches_processor(tiny):
    folder, processor = tiny
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    config = json.loads((folder / "config.json").read_text())
    text = config["text_config"]
    tokenizer = processor.tokenizer
    assert text["vocab_size"] == len(tokenizer)
    assert (text["bos_token_id"], text["pad_token_id"], text["sep_token_id"]) == (
        tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.sep_token_id)
    assert config["vision_config"]["image_size"] == 64
    assert config["initializer_range"] == 0.5


def test_four_bit_loading_uses_bitsandbytes_nf4_layers(tiny, tmp_path):
    import bitsandbytes as bnb

    folder, _ = tiny
    model = M.load_base_model(_config(tmp_path), model_path=folder)
    query = model.text_decoder.bert.encoder.layer[0].attention.self.query
    qkv = model.vision_model.encoder.layers[0].self_attn.qkv
    assert isinstance(query, bnb.nn.Linear4bit) and isinstance(qkv, bnb.nn.Linear4bit)
    assert query.weight.quant_state.quant_type == "nf4"
    assert getattr(model, "is_loaded_in_4bit", False)
    # generation defaults: stop on [SEP], the configured length (not transformers' 20 tokens)
    assert model.text_decoder.generation_config.eos_token_id == model.config.text_config.sep_token_id
    assert model.text_decoder.generation_config.max_new_tokens == 12


def test_first_training_token_is_the_one_generate_starts_from(tiny, tmp_path, blip_large_reference):
    folder, processor = tiny
    model = M.load_base_model(_config(tmp_path, load_in_4bit=False), model_path=folder)
    batch = _batch(processor)
    generated = model.generate(pixel_values=batch["pixel_values"], max_new_tokens=3)
    assert (generated[:, 0] == batch["input_ids"][:, 0]).all()
    assert (batch["input_ids"][:, 0] == model.config.text_config.bos_token_id).all()
    # the real model: [DEC] (30522) is both the tokenizer's bos and what BLIP's generate() uses
    reference = json.loads(blip_large_reference.read_text())
    assert M.blip_large_config().text_config.bos_token_id == reference["tokenizer"]["added_tokens"]["[DEC]"] == 30522


def test_blip_loss_shifts_labels_inside_the_model(tiny, tmp_path):
    """Position 0 ([DEC]) is never a target: logits[:, :-1] are scored against labels[:, 1:], mean, no smoothing."""
    folder, processor = tiny
    model = M.load_base_model(_config(tmp_path, load_in_4bit=False), model_path=folder).eval()
    batch = _batch(processor)
    with torch.no_grad():
        out = model(**batch)
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert model.config.text_config.label_smoothing == 0.0


# ------------------------------------------------------------------------------------ LoRA
def test_default_lora_targets_only_the_text_decoder(tiny, tmp_path):
    folder, _ = tiny
    peft_model = M.attach_lora(M.load_base_model(_config(tmp_path, load_in_4bit=False), model_path=folder),
                               _config(tmp_path), gradient_checkpointing=False)
    names = _lora_a_names(peft_model)
    assert names and all(".text_decoder." in n for n in names)
    kinds = {n.split(".")[-2] for n in names}
    assert {"query", "value", "dense"} <= kinds and not kinds & {"qkv", "projection", "fc1", "fc2"}
    # trainable parameters are exactly the LoRA matrices
    trainable, total, share = M.trainable_parameters(peft_model)
    assert trainable == sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert 0 < share < 1 and total > trainable


def test_lora_vision_adapts_the_vision_tower(tiny, tmp_path):
    folder, _ = tiny
    config = _config(tmp_path, load_in_4bit=False, lora_vision=True)
    names = _lora_a_names(M.attach_lora(M.load_base_model(config, model_path=folder), config,
                                        gradient_checkpointing=False))
    vision = [n for n in names if ".vision_model." in n]
    assert {n.split(".")[-2] for n in vision} == {"qkv", "projection", "fc1", "fc2"}
    assert any(".text_decoder." in n for n in names)
    with pytest.raises(ConfigError, match="lora_vision=True"):
        M.lora_target_regex(_config(tmp_path, lora_target_modules=("query", "qkv")))


def test_four_bit_parameter_count_matches_full_precision(tiny, tmp_path):
    folder, _ = tiny
    full = M.trainable_parameters(M.load_base_model(_config(tmp_path, load_in_4bit=False), model_path=folder))[1]
    quantized = M.trainable_parameters(M.load_base_model(_config(tmp_path), model_path=folder))[1]
    assert quantized == full  # packed NF4 weights are counted as the values they hold


# ------------------------------------------------------------------------------------ checkpointing
def _backward(model, processor) -> torch.Tensor:
    model.train()
    loss = model(**_batch(processor)).loss
    loss.backward()
    return loss


def test_naive_peft_checkpointing_crashes_blip(tiny, tmp_path):
    """The bug the fix avoids: peft's input-grad hook + BLIP's in-place ``embeddings += position_embeddings``."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    folder, processor = tiny
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=M.lora_target_regex(_config(tmp_path)))
    quantized = prepare_model_for_kbit_training(M.load_base_model(_config(tmp_path), model_path=folder))
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        _backward(get_peft_model(quantized, lora), processor)

    plain = M.load_base_model(_config(tmp_path, load_in_4bit=False), model_path=folder)
    plain.gradient_checkpointing_enable()
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        _backward(get_peft_model(plain, lora), processor)


@pytest.mark.parametrize("four_bit", [True, False], ids=["qlora-4bit", "lora-fp32"])
def test_checkpointed_backward_works_after_the_fix(tiny, tmp_path, four_bit):
    folder, processor = tiny
    config = _config(tmp_path, load_in_4bit=four_bit, gradient_checkpointing=True)
    peft_model = M.attach_lora(M.load_base_model(config, model_path=folder), config)
    base = M.unwrap_model(peft_model)
    assert base.is_activation_checkpointing
    assert M.is_quantized(peft_model) == four_bit
    assert not getattr(base, "_require_grads_hooks", None)

    # transformers checkpoints the layer's forward (its own hooks run once): watch a submodule instead
    attention = base.text_decoder.bert.encoder.layer[0].attention
    calls = []
    attention.register_forward_pre_hook(lambda *args: calls.append(1))
    loss = _backward(peft_model, processor)
    assert torch.isfinite(loss)
    assert len(calls) == 2, "the checkpointed layer is recomputed during backward"
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]  # lora_A's grad is 0 while B = 0
    assert grads and all(g is not None for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


def test_generation_before_training_leaves_cpu_4bit_gradients_unchanged(tiny, tmp_path):
    """On AVX512-BF16 CPUs bitsandbytes repacks 4-bit weights at the first no-grad eval forward; the
    packed kernel's in-place bias add then breaks training. load_base_model keeps the plain layout."""
    folder, processor = tiny
    config = _config(tmp_path, gradient_checkpointing=False)

    def lora_grads(generate_first: bool) -> dict[str, torch.Tensor]:
        peft_model = M.attach_lora(M.load_base_model(config, model_path=folder), config)
        with torch.no_grad():  # non-zero B so that every LoRA matrix gets a gradient
            generator = torch.Generator().manual_seed(0)
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.copy_(0.1 * torch.randn(param.shape, generator=generator))
        if generate_first:
            generation.generate_reports(peft_model, processor, [_rows()[0]["image"]], max_new_tokens=3, progress=False)
        _backward(peft_model, processor)
        return {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}

    assert all(not getattr(m, "support_avx512bf16_for_cpu", False)
               for m in M.load_base_model(config, model_path=folder).modules())
    plain, after_generation = lora_grads(False), lora_grads(True)
    assert plain.keys() == after_generation.keys()
    for name in plain:
        assert torch.allclose(plain[name], after_generation[name]), name


# ------------------------------------------------------------------------------------ devices, errors
def test_device_and_dtype_choice(tmp_path):
    cpu_config = _config(tmp_path, device="cpu")
    assert devices.pick_device(cpu_config).type == "cpu"
    assert devices.compute_dtype(cpu_config, torch.device("cpu")) == torch.float32
    assert devices.compute_dtype(_config(tmp_path, compute_dtype="bfloat16"), torch.device("cpu")) == torch.bfloat16
    if not torch.cuda.is_available():
        assert devices.pick_device(_config(tmp_path, device="auto")).type == "cpu"
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            devices.pick_device(_config(tmp_path, device="cuda"))


def test_clear_errors_for_missing_models(tmp_path):
    with pytest.raises(errors.ModelLoadError, match="config.json"):
        M.load_base_model(_config(tmp_path), model_path=tmp_path / "missing")
    with pytest.raises(errors.ModelLoadError, match="ensure_local_model"):
        M.load_base_model(_config(tmp_path))  # tiny model of this run not built yet
    with pytest.raises(errors.ModelLoadError, match="internet connection"):
        M.load_base_model(_config(tmp_path, model_name="Salesforce/blip-image-captioning-large"))


def test_random_model_goes_through_four_bit_loading():
    import bitsandbytes as bnb

    blip_config = M.tiny_blip_config(vocab_size=120, image_size=32, init_range=0.5)
    quantized = M.random_model(blip_config, quantize=True, device="cpu")
    assert isinstance(quantized.text_decoder.bert.encoder.layer[0].attention.self.value, bnb.nn.Linear4bit)
    plain = M.random_model(blip_config, quantize=False, dtype=torch.float32, device="cpu")
    assert plain.text_decoder.bert.encoder.layer[0].attention.self.value.weight.dtype == torch.float32


def test_memory_snapshot_on_cpu():
    snap = devices.memory_snapshot("cpu")
    assert snap["peak_rss_gb"] > 0 and snap["rss_gb"] > 0
    assert snap["peak_rss_gb"] >= snap["rss_gb"] * 0.99


def fake_nvml(processes):
    """A ``pynvml`` module whose device lists ``processes`` as ``(pid, bytes)``."""
    import types

    module = types.ModuleType("pynvml")
    module.nvmlInit = lambda: None
    module.nvmlDeviceGetHandleByIndex = lambda index: index
    module.nvmlDeviceGetComputeRunningProcesses = lambda handle: [
        types.SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in processes]
    return module


def test_gpu_memory_is_split_by_process_as_nvidia_smi_lists_it(monkeypatch):
    """What a compiled step's worker processes hold shows apart from this process's own memory."""
    import os
    import sys

    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([(os.getpid(), 3 * 10**9), (1, 5 * 10**8),
                                                          (2, None), (3, 10**8)]))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert devices.gpu_memory_by_process(0) == {os.getpid(): 3.0, 1: 0.5, 3: 0.1}  # hidden figures left out
    assert devices.process_gpu_gb() == 3.0
    for name, value in (("memory_allocated", 10**9), ("memory_reserved", 2 * 10**9), ("max_memory_allocated", 10**9),
                        ("max_memory_reserved", 2 * 10**9), ("device_memory_used", 36 * 10**8)):
        monkeypatch.setattr(torch.cuda, name, lambda index=None, value=value: value)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: type("P", (), {"total_memory": 8 * 10**9}))
    snap = devices.memory_snapshot("cuda:0")
    assert snap["process_gpu_gb"] == 3.0 and snap["other_processes_gpu_gb"] == pytest.approx(0.6)
    assert snap["device_used_gb"] == 3.6
    # a container whose driver lists the host's process ids: nothing is attributed to this process
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([(1, 3 * 10**9)]))
    assert "process_gpu_gb" not in devices.memory_snapshot("cuda:0")


def test_generate_reports_batches_and_respects_length(tiny, tmp_path):
    folder, processor = tiny
    config = _config(tmp_path)
    peft_model = M.attach_lora(M.load_base_model(config, model_path=folder), config)
    peft_model.train()
    images = [row["image"] for row in _rows()]
    reports = generation.generate_reports(peft_model, processor, images, max_new_tokens=3, num_beams=2, batch_size=3,
                                 progress=False)
    assert len(reports) == 4 and all(isinstance(r, str) for r in reports)
    assert all(len(r.split()) <= 3 for r in reports)
    assert peft_model.training, "generate_reports restores the train mode"
    with pytest.raises(FileNotFoundError):
        generation.generate_reports(peft_model, processor, [str(tmp_path / "missing.png")], progress=False)


def test_the_16bit_decoder_copy_computes_what_the_4bit_lora_decoder_computes(tiny, tmp_path):
    folder, processor = tiny
    config = _config(tmp_path)
    peft_model = M.attach_lora(M.load_base_model(config, model_path=folder), config)
    with torch.no_grad():  # a trained adapter: B is zero at initialisation, which would hide a missing merge
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05, generator=torch.Generator().manual_seed(len(name)))
    peft_model.eval()
    assert generation.needs_decoder_copy(peft_model)
    decoder = M.unwrap_model(peft_model).text_decoder
    copy = generation.decoder_for_generation(peft_model)
    assert not generation.needs_decoder_copy(type("Wrapper", (), {"text_decoder": copy})())
    # seeded: the 4-bit LoRA path and the merged copy round differently, by 2e-5 to 9e-4 over 30 draws of these
    # tokens (logits up to 14), and an unseeded draw depended on the tests that ran before (0.0025 once)
    memory = torch.randn(2, 5, M.unwrap_model(peft_model).config.vision_config.hidden_size,
                         generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[1, 7, 9, 11], [1, 12, 5, 3]])
    with torch.no_grad():
        expected = decoder(input_ids=ids, encoder_hidden_states=memory).logits
        copied = copy(input_ids=ids, encoder_hidden_states=memory.to(copy.dtype)).logits.float()
    assert torch.allclose(copied, expected, atol=1e-3), (copied - expected).abs().max()  # merge order: float rounding
    with peft_model.disable_adapter(), torch.no_grad():  # the adapter matters, so its merge was tested
        assert not torch.allclose(decoder(input_ids=ids, encoder_hidden_states=memory).logits, expected, atol=1e-2)
    images = [row["image"] for row in _rows()]
    # Two batches of two studies: the shared cross-attention must forget the first batch's image tokens.
    fast = generation.generate_reports(peft_model, processor, images, max_new_tokens=6, num_beams=2, progress=False,
                                       batch_size=2)
    slow = generation.generate_reports(peft_model, processor, images, max_new_tokens=6, num_beams=2, progress=False,
                                       decoder_copy=False)
    assert fast == slow


def test_the_compiled_decoding_step_traces_as_one_graph_and_writes_the_same_reports(tiny, tmp_path, monkeypatch):
    """compile_generation's path on the CPU: a static key/value cache and the decoding step traced by
    torch.compile with fullgraph (a graph break would raise), through dynamo's ``eager`` backend (the
    GPU uses inductor's fused kernels), once for all batches and all calls: each generation's first step,
    which allocates the cache, runs uncompiled, and a later call refills the same compiled copy with its
    model's weights. The same reports as the default path, over batches of different studies and a
    smaller last batch, minimum length included, and for a second adapter; the model itself is never
    compiled."""
    from torch._dynamo.utils import counters

    folder, processor = tiny
    config = _config(tmp_path)
    peft_model = M.attach_lora(M.load_base_model(config, model_path=folder), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05, generator=torch.Generator().manual_seed(len(name)))
    images = [row["image"] for row in _rows()] + [row["image"].rotate(90) for row in _rows()[:3]]
    settings = dict(max_new_tokens=8, num_beams=3, progress=False, batch_size=3)
    plain = generation.generate_reports(peft_model, processor, images, **settings)
    at_least = generation.generate_reports(peft_model, processor, images, min_new_tokens=6, **settings)
    compiled_forwards = []
    original = generation.compile_decoding_step
    monkeypatch.setattr(generation, "compile_decoding_step",
                        lambda decoder, backend: compiled_forwards.append(backend) or original(decoder, backend))
    from transformers import cache_utils

    static_caches = []
    static_init = cache_utils.StaticCache.__init__
    monkeypatch.setattr(cache_utils.StaticCache, "__init__",
                        lambda self, *a, **k: static_caches.append(1) or static_init(self, *a, **k))
    batch_sizes = []
    multiview_generate = generation.multiview_generate
    monkeypatch.setattr(generation, "multiview_generate",
                        lambda model, pixels, **k: batch_sizes.append(len(pixels)) or multiview_generate(model, pixels, **k))
    torch.compiler.reset()
    generation._compiled_decoders.clear()
    counters.clear()
    assert generation.generate_reports(peft_model, processor, images, compile_backend="eager", **settings) == plain
    assert compiled_forwards == ["eager"]
    assert counters["stats"]["unique_graphs"] == 1, (
        "one graph for every batch: the prefill, which allocates the static cache, runs uncompiled")
    assert len(static_caches) == 3, "one static key/value cache per batch"
    assert batch_sizes == [3, 3, 3], "the last study, alone, padded to the batch: one shape to compile"
    assert generation.generate_reports(peft_model, processor, images, compile_backend="eager", min_new_tokens=6,
                                       **settings) == at_least
    with torch.no_grad():  # another sweep trial's adapter: the reused copy must take its weights
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05, generator=torch.Generator().manual_seed(7 + len(name)))
    other = generation.generate_reports(peft_model, processor, images, **settings)
    assert other != plain, "a second adapter that writes the same reports could not show stale weights"
    assert generation.generate_reports(peft_model, processor, images, compile_backend="eager", **settings) == other
    assert compiled_forwards == ["eager"], "compiled once, reused by the later calls"
    assert counters["stats"]["unique_graphs"] == 1, "no recompilation for a later call"
    decoder = next(iter(generation._compiled_decoders.values()))
    assert all(p.device.type == "meta" for p in decoder.parameters()), "no memory held between calls"
    assert len(set(plain)) > 1, "reports that all look alike could not show a mix-up between studies"
    assert "forward" not in vars(M.unwrap_model(peft_model).text_decoder), "the model's own decoder stays as it was"
    assert generation.compile_backend(peft_model, config.replace(compile_generation=True)) is None  # CPU: ignored


@pytest.mark.parametrize("graph_step", [False, True])
def test_the_decoder_copy_and_its_keys_and_values_are_freed_when_generation_returns(tiny, tmp_path, monkeypatch,
                                                                                     graph_step):
    """Freed at once, not at the garbage collector's next pass: a copy kept alive by a reference cycle held
    its weights and its last batch's keys and values (1.9 GB at BLIP-large size) into the next call, whose
    batch was then sized to the memory left (39 studies, then 16, then 1, on an H100). The recorded step
    (``graph_step``) made such a cycle too (the copy's forward refers to the step, which refers to the copy):
    on an H100 the batch went from 37 to 30, 25 and 19 studies over four calls."""
    import gc
    import weakref

    folder, processor = tiny
    config = _config(tmp_path)
    peft_model = M.attach_lora(M.load_base_model(config, model_path=folder), config)
    copies = []
    make_copy = generation.decoder_for_generation

    def recorded_copy(model, num_beams=1):
        copy = make_copy(model, num_beams)
        copies.append(weakref.ref(copy))
        return copy

    monkeypatch.setattr(generation, "decoder_for_generation", recorded_copy)
    images = [row["image"] for row in _rows()]
    gc.disable()
    try:
        generation.generate_reports(peft_model, processor, images, max_new_tokens=6, num_beams=2, progress=False,
                                    batch_size=3, graph_step=graph_step)
        assert len(copies) == 1 and copies[0]() is None
    finally:
        gc.enable()


def test_a_new_batch_size_compiles_the_step_again_for_static_shapes(tiny, tmp_path, monkeypatch):
    """After an out-of-memory retry the batch size changes (on an H100, a compiled call that went on after
    such a retry had not finished after 200 s): each size is compiled for its own static shapes, never for
    a symbolic batch (``dynamic=False``), and the reports stay those of the default path."""
    folder, processor = tiny
    config = _config(tmp_path)
    peft_model = M.attach_lora(M.load_base_model(config, model_path=folder), config)
    images = [row["image"] for row in _rows()]
    compiled_shapes = []

    def recording_backend(graph, example_inputs):
        compiled_shapes.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        return graph.forward

    monkeypatch.setattr(generation, "_compile_failures", [])
    monkeypatch.setattr(generation, "_compiled_decoders", {})
    torch.compiler.reset()
    settings = dict(max_new_tokens=6, num_beams=2, progress=False)
    for batch_size in (3, 2):
        assert generation.generate_reports(peft_model, processor, images, compile_backend=recording_backend,
                                           batch_size=batch_size, **settings) == \
            generation.generate_reports(peft_model, processor, images, batch_size=batch_size, **settings)
    assert len(compiled_shapes) == 2, "one compile per batch size"
    for shapes in compiled_shapes:
        assert all(isinstance(d, int) for shape in shapes for d in shape), "static shapes, no symbolic batch"
    batches = [{shape[0] for shape in shapes if len(shape) == 4} for shapes in compiled_shapes]
    assert batches[0] != batches[1], "each compile is for its own batch size"
    torch.compiler.reset()


def test_a_compiled_step_that_fails_falls_back_to_eager_generation_with_a_warning(tiny, tmp_path, monkeypatch):
    """A GPU without a working compiler (no Triton, say) must not end a long run: the reports are generated
    without the compiled step, and later calls do not try again."""
    folder, processor = tiny
    config = _config(tmp_path)
    peft_model = M.attach_lora(M.load_base_model(config, model_path=folder), config)
    images = [row["image"] for row in _rows()]
    settings = dict(max_new_tokens=6, num_beams=2, progress=False, batch_size=2)
    plain = generation.generate_reports(peft_model, processor, images, **settings)
    attempts = []

    def broken_backend(graph, example_inputs):
        attempts.append(1)
        raise RuntimeError("Cannot find a working triton installation")

    monkeypatch.setattr(generation, "_compile_failures", [])
    monkeypatch.setattr(generation, "_compiled_decoders", {})
    torch.compiler.reset()
    with pytest.warns(RuntimeWarning, match="triton"):
        assert generation.generate_reports(peft_model, processor, images, compile_backend=broken_backend,
                                           **settings) == plain
    assert generation.generate_reports(peft_model, processor, images, compile_backend=broken_backend,
                                       **settings) == plain
    assert len(attempts) == 1, "a failed compiler is not tried again in the same process"
    torch.compiler.reset()


def test_generation_batches_fit_what_the_allocator_may_hold_not_the_whole_budget(tiny, tmp_path, monkeypatch):
    """The CUDA context and library workspaces take part of the budget before the allocator gets any: the
    batch is sized to the allocator's cap (here half the budget), not to the budget."""
    folder, _ = tiny
    budget = 0.01  # GB: a few hundred of the tiny model's studies
    config = _config(tmp_path, vram_budget_gb=budget, eval_batch_size=10_000)
    peft_model = M.attach_lora(M.load_base_model(config, model_path=folder), config)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(total_memory=generation.GB))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2**20)
    monkeypatch.setattr(generation, "GENERATION_WORKSPACE_BYTES", 2**19)  # BLIP-large's 0.14 GB, scaled down
    per_study = generation.study_generation_bytes(peft_model, config, shared_cross_attention=True)
    copy_bytes = 2 * sum(p.numel() for p in M.unwrap_model(peft_model).text_decoder.parameters())

    def batch_for(cap_fraction: float) -> int:
        monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: cap_fraction)
        return generation.generation_batch_size(peft_model, config, device="cuda")

    halved = batch_for(budget / 2)
    assert halved == int((budget / 2 * generation.GB * 0.9 - 2**20 - copy_bytes - 2**19) // per_study) > 100
    assert batch_for(1.0) == int((budget * generation.GB * 0.9 - 2**20 - copy_bytes - 2**19) // per_study) > 2 * halved
    assert generation.generation_batch_size(peft_model, config.replace(vram_budget_gb=None), device="cuda") == 10_000

    # Compiled training's CUDA graphs keep a private pool between epochs: what it holds unused is not free.
    pool, mib = (1, 7), 2**20
    segments = [{"device": 0, "segment_pool_id": (0, 0), "total_size": 8 * mib, "allocated_size": mib},
                {"device": 0, "segment_pool_id": pool, "total_size": 5 * mib, "allocated_size": mib},
                {"device": 1, "segment_pool_id": pool, "total_size": 9 * mib, "allocated_size": 0}]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda *a, **k: segments)
    assert devices.private_pool_free_bytes("cuda") == 4 * mib, "device 0's private pool, less what it uses"
    assert batch_for(1.0) == int((budget * generation.GB * 0.9 - 2**20 - 4 * mib - copy_bytes - 2**19) // per_study)
    assert devices.private_pool_free_bytes("cpu") == 0

    # A batch that still runs out of memory says what the allocator held then, the pool's unused part included.
    gb = generation.GB
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device=None: {
        "allocated_bytes.all.current": int(0.3 * gb), "reserved_bytes.all.current": int(0.45 * gb),
        "inactive_split_bytes.all.current": int(0.05 * gb)})
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: 0.5)
    state = devices.allocator_state("cuda")
    assert state == ("allocated 0.30 GB, reserved 0.45 GB of the allocator's 0.50 GB cap, 0.00 GB unused in "
                     "CUDA graphs' pools, 0.05 GB in free pieces of split blocks")
    assert devices.allocator_state("cpu") == ""


def test_generation_memory_estimate_matches_the_measured_peak_and_the_shared_cross_attention_saving():
    from transformers import BlipForConditionalGeneration

    with torch.device("meta"):
        blip_large = BlipForConditionalGeneration(M.blip_large_config())
    single = MedcapConfig.from_profile("rehearsal", views="single", max_new_tokens=100, min_new_tokens=None)
    # Measured (H200, NF4, beam 3, 100 tokens, one view): 5.7 GB at batch 64 against 0.6 GB of model: 80 MB a study.
    assert generation.study_generation_bytes(blip_large, single, shared_cross_attention=False) / 1e6 == \
        pytest.approx((5.7 - 0.6) * 1000 / 64, rel=0.1)
    both = MedcapConfig.from_profile("rehearsal")
    shared = generation.study_generation_bytes(blip_large, both)
    # Measured (H100, two views, 75 tokens, shared cross-attention): 61.6 MB more per study, at 8 to 40 studies
    # (benchmarks/results/decoding_memory.json); the rest of a batch's peak is GENERATION_WORKSPACE_BYTES.
    assert shared / 1e6 == pytest.approx(61.6, rel=0.05)
    per_beam = generation.study_generation_bytes(blip_large, both, shared_cross_attention=False)
    assert 2 < per_beam / shared < both.num_beams  # the image tokens' keys and values once, not once per beam
