"""Training levers against each other, measured in pairs in one process.

    python -m medcap_helpers.rehearsal data/rehearsal    # set-up (not timed)
    python benchmarks/training_step.py                   # CUDA: 4-bit matmuls vs dequantized weights, 4 GB cap
    python benchmarks/training_step.py --label levers --settings dequantized,half-checkpointed,graphs

Training steps on one GPU are bound by the CPU issuing kernels, and their rate moves from call to call
and machine to machine (the budget probe's rate for one setting ranged from 52 to 90 samples/s over three
calls), so two settings measured in separate calls are hard to compare. Here one process, one model and
one batch (the rehearsal's random BLIP-large with LoRA, the 16 costliest training studies from cached
image tokens, fp16 autocast: the budget probe's own measurement, ``budget.measure_training_step``)
alternate between the ``--settings``, round after round; each round times ``--steps`` optimizer steps
after a warm-up step. The settings (:data:`SETTINGS`):

* ``4bit``: bitsandbytes' 4-bit matmuls, every decoder layer checkpointed (the QLoRA default);
* ``dequantized``: ``dequantize_frozen_weights`` (the full profile's setting);
* ``half-checkpointed``: that, with only 6 of the 12 decoder layers recomputed in the backward pass;
* ``graphs``: that, with the forward and backward compiled by ``torch.compile`` in its
  ``reduce-overhead`` mode (CUDA graphs: a step replays recorded kernels instead of launching each one)
  on batches padded to ``max_target_tokens`` (one shape); the first rounds include the compile;
* ``graphs-half-checkpointed``, ``graphs-no-checkpointing``: that, with less recomputation;
* ``compiled``: the same compile in inductor's default mode (fused kernels, no CUDA graphs).

Recorded: each setting's rates, peak allocated memory and loss on that batch (a compiled setting's dropout
draws other random numbers: the loss is taken in eval mode, without dropout). Results go to
``benchmarks/results/training_step.json`` under ``--label`` (and ``$OUT`` when set).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results" / "training_step.json"


@dataclass(frozen=True)
class Setting:
    dequantize: bool = True
    checkpointed_layers: int | None = None  # None: all
    checkpointing: bool = True
    compile_mode: str | None = None  # torch.compile mode; None: eager
    padded: bool = False


SETTINGS = {
    "4bit": Setting(dequantize=False),
    "dequantized": Setting(),
    "half-checkpointed": Setting(checkpointed_layers=6),
    "quarter-checkpointed": Setting(checkpointed_layers=3),
    "padded": Setting(padded=True),
    "graphs": Setting(compile_mode="reduce-overhead", padded=True),
    "graphs-half-checkpointed": Setting(compile_mode="reduce-overhead", padded=True, checkpointed_layers=6),
    "graphs-no-checkpointing": Setting(compile_mode="reduce-overhead", padded=True, checkpointing=False),
    "compiled": Setting(compile_mode="default", padded=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/rehearsal")
    parser.add_argument("--run", default=str(Path(tempfile.gettempdir()) / "medcap_training_step"))
    parser.add_argument("--settings", default="4bit,dequantized", help=f"comma-separated, of {sorted(SETTINGS)}")
    parser.add_argument("--label", default="dequantize_frozen_weights", help="the results' entry")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps timed per setting and round")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rows", type=int, default=256, help="training studies cached, the batch's pool")
    args = parser.parse_args()
    names = [n.strip() for n in args.settings.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown or not names:
        raise SystemExit(f"unknown settings {unknown}: choose from {sorted(SETTINGS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/training_step.py measures a GPU's training step: it needs CUDA.")
    from full_profile import cap_memory, rehearsal_peft_model

    from medcap_helpers import budget, frozen_weights
    from medcap_helpers.devices import compute_dtype, is_out_of_memory, release_memory
    from medcap_helpers.multiview import accept_views, caption_outputs
    from medcap_helpers.processing import pad_to_static_shape
    from medcap_helpers.train import _caption_loss
    from medcap_helpers.runs import environment_info, write_json

    context_gb = cap_memory()
    config, dd, model, processor = rehearsal_peft_model(args.run, args.data)
    collator, rows = budget.probe_inputs(config, model, processor, dd["train"].select(range(args.rows)))
    dtype = compute_dtype(config, torch.device("cuda"))
    accept_views(model)  # outside any compiled code: it sets the model's forward once

    compiled = {mode: torch.compile(_caption_loss, mode=mode, dynamic=False)  # what compile_training compiles
                for mode in {SETTINGS[n].compile_mode for n in names} if mode}

    def padded(batch: dict[str, Any]) -> dict[str, Any]:  # as MedcapTrainer.static_shape pads (two-view batch)
        return pad_to_static_shape(batch, args.batch, config.max_target_tokens, processor.tokenizer.pad_token_id)

    def loss_fn(setting: Setting) -> Any:
        loss = compiled.get(setting.compile_mode, _caption_loss)
        return (lambda m, batch: loss(m, padded(batch))) if setting.padded else loss

    def apply(setting: Setting) -> None:
        (frozen_weights.dequantize_frozen_weights if setting.dequantize else frozen_weights.use_4bit_matmuls)(model)

    def measure(setting: Setting) -> tuple[float, float]:
        apply(setting)
        if setting.compile_mode:  # as the Trainer does: compiled code only reads the dequantized weights
            frozen_weights.make_dequantized_weights(model)
        candidate = budget.TrainingCandidate(args.batch, 1, setting.checkpointing, setting.checkpointed_layers)
        return budget.measure_training_step(model, collator, rows, candidate, steps=args.steps + 1,
                                            mixed_precision=dtype, loss_fn=loss_fn(setting))

    measured: dict[str, dict[str, Any]] = {n: {"samples_per_s": [], "peak_gb": [], "round_s": [], "failed": None}
                                           for n in names}
    for round_ in range(args.rounds):
        for name in names:
            if measured[name]["failed"]:
                continue
            start = time.perf_counter()
            try:
                peak, rate = measure(SETTINGS[name])
            except Exception as err:  # noqa: BLE001 - a lever that fails is recorded, the others go on
                measured[name]["failed"] = ("out of memory" if is_out_of_memory(err)
                                            else f"{type(err).__name__}: {str(err)[:300]}")
                traceback.print_exc()
                release_memory()
                continue
            measured[name]["samples_per_s"].append(rate)
            measured[name]["peak_gb"].append(peak)
            measured[name]["round_s"].append(time.perf_counter() - start)
            print(f"round {round_ + 1}: {name}: {rate:.1f} samples/s, peak {peak:.3f} GB, "
                  f"{time.perf_counter() - start:.1f} s", flush=True)
    losses = {}
    model.eval()
    plain = {k: v.to("cuda") for k, v in collator(budget.costliest_rows(rows, args.batch)).items()}
    for batch, is_padded in ((plain, False), (padded(plain), True)):
        for name in names:
            if SETTINGS[name].padded == is_padded and not measured[name]["failed"]:
                apply(SETTINGS[name])
                with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
                    losses[name] = float(caption_outputs(model, batch).loss)
    frozen_weights.use_4bit_matmuls(model)
    first = names[0]
    summary = {}
    for name, m in measured.items():
        steady = m["samples_per_s"][1:] or m["samples_per_s"]  # a compiled setting's first round compiles
        summary[name] = {**m, "setting": asdict(SETTINGS[name]), "loss": losses.get(name),
                         "median_samples_per_s": statistics.median(steady) if steady else None,
                         "vs_" + first: (statistics.median(steady) / statistics.median(
                             measured[first]["samples_per_s"][1:] or measured[first]["samples_per_s"])
                                         if steady and measured[first]["samples_per_s"] else None)}
    results = {"part": "training_step", "cuda_context_gb": context_gb, "batch": args.batch,
               "steps_per_round": args.steps, "rounds": args.rounds, "settings": summary,
               "note": "median over rounds after the first (the first of a compiled setting compiles)",
               "environment": environment_info(), "command": " ".join(["python"] + sys.argv)}
    everything = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    everything[args.label] = results
    write_json(RESULTS, everything)
    if os.environ.get("OUT"):
        shutil.copy(RESULTS, Path(os.environ["OUT"]) / RESULTS.name)
    print(json.dumps({k: v for k, v in results.items() if k != "environment"}, indent=1))


if __name__ == "__main__":
    main()
