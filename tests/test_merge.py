"""Merging a LoRA adapter (05): what each merge reproduces, and which NF4 model becomes final.

* onto the *dequantized 4-bit base*: the weights the adapter was trained against, so the merged model
  computes what the adapter on its 4-bit base computes (up to the merged dtype's rounding);
* onto the 16-bit base: differs from the trained model by the base's quantization error, and is exact
  when nothing was quantized (``load_in_4bit=False``).

The LoRA B matrices are set to non-zero values (peft initialises them to zero, which would make every
merge trivially equal to its base).
"""

from __future__ import annotations

import pytest
import torch

from medcap_helpers import model as M
from medcap_helpers.checkpoints import load_adapter_model, save_adapter
from medcap_helpers.merge import (
    FINAL_CANDIDATES,
    choose_final,
    merge_dtype,
    merge_onto_16bit_base,
    merge_onto_dequantized_base,
)
from medcap_helpers.processing import CaptionCollator
from tests.test_train import qlora_model, smoke_config, synthetic_rows


def randomise_lora_b(model, seed: int = 0, std: float = 0.05) -> int:
    """Give every LoRA B matrix non-zero values; return how many there are."""
    generator = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
                count += 1
    return count


def logits(model, batch: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"])
    return out.logits.float()


def load_fp32(folder) -> torch.nn.Module:
    return M.load_plain_model(folder, torch.float32).eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory):
    """A tiny 4-bit BLIP with a saved LoRA adapter whose B matrices are non-zero, and a batch to run."""
    run = tmp_path_factory.mktemp("merge_4bit") / "run"
    config = smoke_config(run, load_in_4bit=True)
    model, processor = qlora_model(config)
    assert randomise_lora_b(model) > 0
    adapter_dir = save_adapter(model, processor, run / "adapter")
    batch = CaptionCollator(processor, config.max_target_tokens)(synthetic_rows()[:4])
    return config, processor, adapter_dir, batch


def test_merge_onto_dequantized_base_reproduces_the_adapter_on_its_4bit_base(trained_adapter, tmp_path):
    config, processor, adapter_dir, batch = trained_adapter
    adapter_model = load_adapter_model(config, adapter_dir)
    assert M.is_quantized(adapter_model)
    reference = logits(adapter_model, batch)
    base_only = logits(M.load_base_model(config), batch)
    adapter_effect = max_diff(reference, base_only)
    assert adapter_effect > 1e-2, "the adapter must change the logits, or no comparison below could fail"

    # In fp32 the merge is the same computation up to the order of additions.
    exact = merge_onto_dequantized_base(M.load_base_model(config), adapter_dir, tmp_path / "deq32", processor,
                                        dtype=torch.float32)
    assert not M.is_quantized(load_fp32(exact.path))
    exact_diff = max_diff(logits(load_fp32(exact.path), batch), reference)
    assert exact_diff < 1e-5 * reference.abs().max().item(), exact_diff

    # What 05 does on this device: merge in 16-bit; the only difference left is 16-bit rounding.
    dtype16 = merge_dtype(torch.float32)
    deq16 = merge_onto_dequantized_base(M.load_base_model(config), adapter_dir, tmp_path / "deq16", processor,
                                        dtype=dtype16)
    assert next(load_fp32(deq16.path).parameters()).dtype == torch.float32
    deq16_diff = max_diff(logits(load_fp32(deq16.path), batch), reference)
    assert deq16_diff < 5e-3 * reference.abs().max().item(), deq16_diff
    assert deq16_diff < adapter_effect / 5

    # The usual merge onto the 16-bit base misses by the base's NF4 quantization error: clearly further off.
    on_16bit = merge_onto_16bit_base(M.base_model_source(config), adapter_dir, tmp_path / "m16", processor,
                                     dtype=dtype16)
    on_16bit_diff = max_diff(logits(load_fp32(on_16bit.path), batch), reference)
    assert on_16bit_diff > 5 * deq16_diff, (on_16bit_diff, deq16_diff)


def test_merge_onto_an_unquantized_base_is_the_adapter_exactly(tmp_path):
    config = smoke_config(tmp_path / "run", load_in_4bit=False)
    model, processor = qlora_model(config)
    assert not M.is_quantized(model)
    assert randomise_lora_b(model, seed=1) > 0
    adapter_dir = save_adapter(model, processor, tmp_path / "adapter")
    batch = CaptionCollator(processor, config.max_target_tokens)(synthetic_rows()[:4])

    reference = logits(load_adapter_model(config, adapter_dir), batch)
    base_only = logits(M.load_base_model(config), batch)
    assert max_diff(reference, base_only) > 1e-2

    merged = merge_onto_16bit_base(M.base_model_source(config), adapter_dir, tmp_path / "merged", processor,
                                   dtype=torch.float32)
    merged_model = load_fp32(merged.path)
    assert not any("lora" in name for name, _ in merged_model.named_parameters())  # really merged
    torch.testing.assert_close(logits(merged_model, batch), reference, rtol=1e-5, atol=1e-5)


def _differences(adapter: tuple[float, float, float], on_16bit: tuple[float, float, float],
                 metric: str = "CIDEr") -> list[dict]:
    """Paired validation differences of the two other candidates against the dequantized merge."""
    default = FINAL_CANDIDATES["merged-dequantized-nf4"]
    return [{"system": FINAL_CANDIDATES[name], "baseline": default, "metric": metric,
             "point": point, "low": low, "high": high}
            for name, (point, low, high) in (("adapter", adapter), ("merged-nf4", on_16bit))]


@pytest.mark.parametrize("adapter, on_16bit, expected", [
    ((0.0, -0.1, 0.1), (0.0, -0.1, 0.1), "merged-dequantized-nf4"),  # nothing beats the cheapest: keep it
    ((0.0, -0.1, 0.1), (0.10, 0.01, 0.2), "merged-nf4"),
    ((0.30, 0.05, 0.5), (0.0, -0.1, 0.1), "adapter"),  # the lossless adapter, when it is clearly better
    ((0.90, -0.1, 1.9), (0.0, -0.1, 0.1), "merged-dequantized-nf4"),  # a big point estimate inside the noise
])
def test_final_model_switches_from_the_cheapest_only_on_an_established_difference(adapter, on_16bit, expected):
    assert choose_final(_differences(adapter, on_16bit)) == expected


def test_final_model_choice_needs_every_candidate_compared():
    differences = _differences((0.0, -0.1, 0.1), (0.0, -0.1, 0.1))[:1]
    with pytest.raises(ValueError, match="merged onto 16-bit base"):
        choose_final(differences)
