"""``compile_training``: stage 03's step compiled by ``torch.compile`` trains as the eager step does."""

from __future__ import annotations

import pytest
import torch

from medcap_helpers import train as train_module
from medcap_helpers.train import train, training_compile_backend
from tests.test_train import qlora_model, smoke_config, synthetic_rows


@pytest.mark.parametrize(("cached", "dequantized"), [(False, False), (True, False), (True, True)],
                         ids=["pixels", "cached tokens", "cached tokens, dequantized weights"])
def test_a_compiled_step_follows_the_eager_loss_curve(tmp_path, monkeypatch, cached: bool, dequantized: bool) -> None:
    """On the CPU through AOTAutograd's ``aot_eager`` backend (the GPU uses inductor): the same per-epoch
    training and validation losses, 4-bit tiny BLIP with LoRA and checkpointing, and the compiled function
    is what trained."""
    losses = {}
    compiled_calls = []
    caption_loss = train_module._caption_loss
    monkeypatch.setattr(train_module, "_caption_loss",
                        lambda model, inputs: compiled_calls.append(inputs["input_ids"].shape)
                        or caption_loss(model, inputs))
    monkeypatch.setattr(train_module, "training_compile_backend",
                        lambda config, device: "aot_eager" if config.compile_training else None)
    from torch._dynamo.utils import counters

    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        config = smoke_config(tmp_path / str(compiled), num_train_epochs=2.0, compile_training=compiled,
                              cache_vision_embeddings=cached, dequantize_frozen_weights=dequantized)
        model, processor = qlora_model(config)
        rows = synthetic_rows()
        result = train(config, model, processor, {"train": rows, "validation": rows[:4]})
        losses[compiled] = [(e["train_loss"], e["eval_loss"]) for e in result.history]
    assert compiled_calls and counters["stats"]["unique_graphs"] >= 1, "the compiled step did not run"
    # one shape for every batch (8 rows in batches of 4 with reports of different lengths): one compile
    assert set(compiled_calls) == {(config.per_device_train_batch_size, config.max_target_tokens)}
    for (eager_train, eager_eval), (fast_train, fast_eval) in zip(losses[False], losses[True], strict=True):
        assert fast_train == pytest.approx(eager_train, rel=1e-4) and fast_eval == pytest.approx(eager_eval, rel=1e-4)


def test_compile_training_is_ignored_on_the_cpu() -> None:
    config = smoke_config("unused", compile_training=True)
    assert training_compile_backend(config, torch.device("cpu")) is None
    assert training_compile_backend(config, torch.device("cuda")) == "inductor"
    assert training_compile_backend(config.replace(compile_training=False), torch.device("cuda")) is None


def test_a_compiler_that_fails_leaves_training_eager_with_a_warning(tmp_path, monkeypatch) -> None:
    """No working Triton or C compiler on a user's machine: the first compiled step fails, the run trains
    eagerly with a warning and the eager losses instead of stopping."""
    monkeypatch.setattr(train_module, "training_compile_backend",
                        lambda config, device: "aot_eager" if config.compile_training else None)
    rows = synthetic_rows()
    losses = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        config = smoke_config(tmp_path / str(compiled), num_train_epochs=1.0, compile_training=compiled)
        model, processor = qlora_model(config)
        if compiled:
            def no_compiler(model, inputs):  # what inductor raises without a toolchain, as the step runs
                raise RuntimeError("Cannot find a working triton installation")

            monkeypatch.setattr(train_module, "_caption_loss", no_compiler)
            with pytest.warns(RuntimeWarning, match="Compiling the training step failed.*triton"):
                result = train(config, model, processor, {"train": rows, "validation": rows[:4]})
        else:
            result = train(config, model, processor, {"train": rows, "validation": rows[:4]})
        losses[compiled] = [loss for e in result.history for loss in (e["train_loss"], e["eval_loss"])]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_an_error_after_the_compiled_steps_ran_is_not_hidden(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(train_module, "training_compile_backend",
                        lambda config, device: "aot_eager" if config.compile_training else None)
    calls = []
    caption_loss = train_module._caption_loss

    def fails_on_the_third_step(model, inputs):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("a real bug in the third batch")
        return caption_loss(model, inputs)

    monkeypatch.setattr(train_module, "_caption_loss", fails_on_the_third_step)
    torch._dynamo.reset()
    config = smoke_config(tmp_path, num_train_epochs=2.0, compile_training=True)
    model, processor = qlora_model(config)
    rows = synthetic_rows()
    with pytest.raises(Exception, match="a real bug in the third batch"):
        train(config, model, processor, {"train": rows, "validation": rows[:4]})
