"""The recorded decoding step's arithmetic on the CPU (graph_generation): the same reports as
transformers' path, greedy and beam search, a minimum length, two views, every batch and a padded last one."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from medcap_helpers import generation
from medcap_helpers import model as M
from medcap_helpers.config import MedcapConfig
from medcap_helpers.decoding_graph import StaticDecodingStep, StepCache
from medcap_helpers.processing import build_offline_processor

REPORTS = ["The heart size is normal. The lungs are clear.", "Small left pleural effusion.",
           "No acute cardiopulmonary disease.", "Mild cardiomegaly with clear lungs."]
COLOURS = [(255, 0, 0), (0, 0, 255), (0, 160, 0), (255, 255, 255), (90, 90, 20)]


@pytest.fixture(scope="module")
def peft_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_model")
    processor = build_offline_processor(REPORTS, image_size=64)
    M.create_tiny_model(folder, processor, init_range=0.5, seed=0)
    config = MedcapConfig.from_profile("smoke", run_dir=str(folder / "run"), lora_dropout=0.0)
    model = M.attach_lora(M.load_base_model(config, model_path=folder), config)
    with torch.no_grad():  # a trained adapter (B is zero at initialisation)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05, generator=torch.Generator().manual_seed(len(name)))
    return model, processor


def _images():
    return [Image.new("RGB", (72, 72), colour) for colour in COLOURS] + [
        Image.new("RGB", (72, 72), colour).rotate(45) for colour in COLOURS[:2]]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_the_static_step_writes_the_reports_transformers_writes(peft_model, num_beams, monkeypatch):
    model, processor = peft_model
    images = _images()
    settings = dict(max_new_tokens=9, num_beams=num_beams, progress=False, batch_size=3)
    plain = generation.generate_reports(model, processor, images, **settings)
    at_least = generation.generate_reports(model, processor, images, min_new_tokens=7, **settings)
    assert len(set(plain)) > 2, "reports that all look alike could not show a mix-up between studies or beams"
    steps, calls = [], []
    original_call = StaticDecodingStep.__call__

    def counted(self, *args, **kwargs):
        calls.append((id(self), self.position))
        return original_call(self, *args, **kwargs)

    original_init = StaticDecodingStep.__init__
    monkeypatch.setattr(StaticDecodingStep, "__init__",
                        lambda self, *a, **k: steps.append(self) or original_init(self, *a, **k))
    monkeypatch.setattr(StaticDecodingStep, "__call__", counted)
    assert generation.generate_reports(model, processor, images, graph_step=True, **settings) == plain
    assert len(steps) == 1, "one step (one recording on a GPU) for every batch of the call"
    assert steps[0].rows == 3 * num_beams, "the short last batch is padded to the batch's size"
    assert max(position for _, position in calls) == 8, "one step per new token, positions 0 to 8"
    assert steps[0].keys == [] and steps[0].graph is None, "its buffers are freed when the call returns"
    assert generation.generate_reports(model, processor, images, graph_step=True, min_new_tokens=7,
                                       **settings) == at_least
    assert "forward" not in vars(M.unwrap_model(model).text_decoder), "the model's own decoder stays as it was"


def test_the_static_step_reads_both_views(peft_model):
    model, processor = peft_model
    studies = [[image, image.rotate(90)] for image in _images()[:4]]
    settings = dict(max_new_tokens=6, num_beams=2, progress=False, batch_size=2)
    assert (generation.generate_reports(model, processor, studies, graph_step=True, **settings)
            == generation.generate_reports(model, processor, studies, **settings))


def test_the_static_step_refuses_what_it_cannot_compute(peft_model):
    model, _ = peft_model
    decoder = generation.decoder_for_generation(model, num_beams=1)
    step = StaticDecodingStep(decoder, rows=2, num_beams=1, max_length=2, use_graph=False).install()
    memory = torch.zeros(2, 5, M.unwrap_model(model).config.vision_config.hidden_size, dtype=decoder.dtype)
    start = torch.ones(2, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="from StaticDecodingStep.new_batch"):
        decoder(input_ids=start, encoder_hidden_states=memory)
    cache = step.new_batch()
    with pytest.raises(ValueError, match="no padding"):
        decoder(input_ids=start, encoder_hidden_states=memory, past_key_values=cache,
                attention_mask=torch.tensor([[1], [0]]))
    with pytest.raises(ValueError, match="one token for each of its 2 rows"):
        decoder(input_ids=torch.ones(2, 3, dtype=torch.long), encoder_hidden_states=memory, past_key_values=cache)
    for _ in range(2):
        decoder(input_ids=start, encoder_hidden_states=memory, past_key_values=cache)
    assert isinstance(cache, StepCache) and cache.get_seq_length() == 2
    with pytest.raises(ValueError, match="holds 2 positions"):
        decoder(input_ids=start, encoder_hidden_states=memory, past_key_values=cache)


def test_graph_generation_is_ignored_on_the_cpu(peft_model, tmp_path):
    model, _ = peft_model
    config = MedcapConfig.from_profile("smoke", run_dir=str(tmp_path), graph_generation=True)
    assert generation.graph_step(model, config) is False


def test_a_call_smaller_than_the_batch_is_not_padded_to_it(peft_model, monkeypatch):
    model, processor = peft_model
    steps = []
    original_init = StaticDecodingStep.__init__
    monkeypatch.setattr(StaticDecodingStep, "__init__",
                        lambda self, *a, **k: steps.append(self) or original_init(self, *a, **k))
    images = _images()[:2]
    settings = dict(max_new_tokens=5, num_beams=2, progress=False, batch_size=8)
    assert (generation.generate_reports(model, processor, images, graph_step=True, **settings)
            == generation.generate_reports(model, processor, images, **settings))
    assert [step.rows for step in steps] == [2 * 2], "two studies of two beams, not eight studies"


def test_a_step_that_cannot_be_recorded_falls_back_to_plain_generation_with_a_warning(peft_model, monkeypatch):
    """E.g. an operator that a CUDA graph cannot hold: the call goes on without the recorded step (the same
    reports), says so once, and later calls of the process do not try again."""
    model, processor = peft_model
    images = _images()[:4]
    settings = dict(max_new_tokens=6, num_beams=2, progress=False, batch_size=2)
    plain = generation.generate_reports(model, processor, images, **settings)
    attempts = []

    def unrecordable(self):
        attempts.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(StaticDecodingStep, "_step", unrecordable)
    monkeypatch.setattr(generation, "_graph_failures", [])
    with pytest.warns(RuntimeWarning, match="could not run as a CUDA graph .*operation not permitted"):
        assert generation.generate_reports(model, processor, images, graph_step=True, **settings) == plain
    assert generation.generate_reports(model, processor, images, graph_step=True, **settings) == plain
    assert attempts == [1], "tried once per process"
