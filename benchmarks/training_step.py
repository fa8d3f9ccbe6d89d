"""A training lever against today's step, measured in pairs in one process: ``dequantize_frozen_weights``.

    python -m medcap_helpers.rehearsal data/rehearsal    # set-up (not timed)
    python benchmarks/training_step.py                   # CUDA: 6 rounds of 4-bit then dequantized, 4 GB cap

Training steps on one GPU are bound by the CPU issuing kernels, and their rate moves from call to call
and machine to machine (the budget probe's rate for one setting ranged from 52 to 90 samples/s over three
calls), so two settings measured in separate calls are hard to compare. Here one process, one model and
one batch (the rehearsal's random BLIP-large with LoRA, the 16 costliest training studies from cached
image tokens, checkpointing on, fp16 autocast: the budget probe's own measurement,
``budget.measure_training_step``) alternate between bitsandbytes' 4-bit matmuls and the dequantized
weights, round after round; each round times ``--steps`` optimizer steps after a warm-up step. Also
recorded: each setting's peak allocated memory and loss on that batch. Results go to
``benchmarks/results/training_step.json`` (and ``$OUT`` when set).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results" / "training_step.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/rehearsal")
    parser.add_argument("--run", default=str(Path(tempfile.gettempdir()) / "medcap_training_step"))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps timed per setting and round")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rows", type=int, default=256, help="training studies cached, the batch's pool")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/training_step.py measures a GPU's training step: it needs CUDA.")
    from full_profile import cap_memory, rehearsal_peft_model

    from medcap_helpers import budget, frozen_weights
    from medcap_helpers.devices import compute_dtype
    from medcap_helpers.multiview import caption_outputs
    from medcap_helpers.runs import environment_info, write_json

    context_gb = cap_memory()
    config, dd, model, processor = rehearsal_peft_model(args.run, args.data)
    collator, rows = budget.probe_inputs(config, model, processor, dd["train"].select(range(args.rows)))
    candidate = budget.TrainingCandidate(args.batch, 1, True)
    dtype = compute_dtype(config, torch.device("cuda"))
    settings = {"4-bit matmuls": frozen_weights.use_4bit_matmuls,
                "dequantized weights": frozen_weights.dequantize_frozen_weights}
    measured: dict[str, dict[str, list[float]]] = {name: {"samples_per_s": [], "peak_gb": []} for name in settings}
    for round_ in range(args.rounds):
        for name, apply in settings.items():
            apply(model)
            peak, rate = budget.measure_training_step(model, collator, rows, candidate, steps=args.steps + 1,
                                                      mixed_precision=dtype)
            measured[name]["samples_per_s"].append(rate)
            measured[name]["peak_gb"].append(peak)
            print(f"round {round_ + 1}: {name}: {rate:.1f} samples/s, peak {peak:.3f} GB", flush=True)
    losses = {}
    batch = {k: v.to("cuda") for k, v in collator(budget.costliest_rows(rows, args.batch)).items()}
    for name, apply in settings.items():
        apply(model)
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
            losses[name] = float(caption_outputs(model, batch).loss)
    frozen_weights.use_4bit_matmuls(model)
    ratios = [b / a for a, b in zip(*(m["samples_per_s"] for m in measured.values()))]
    results = {"part": "training_step", "lever": "dequantize_frozen_weights", "cuda_context_gb": context_gb,
               "batch": args.batch, "checkpointing": True, "steps_per_round": args.steps, "rounds": args.rounds,
               "settings": {name: {**m, "median_samples_per_s": statistics.median(m["samples_per_s"]),
                                   "loss": losses[name]} for name, m in measured.items()},
               "speedup_per_round": ratios, "median_speedup": statistics.median(ratios),
               "environment": environment_info(), "command": " ".join(["python"] + sys.argv)}
    write_json(RESULTS, results)
    if os.environ.get("OUT"):
        shutil.copy(RESULTS, Path(os.environ["OUT"]) / RESULTS.name)
    print(json.dumps({k: v for k, v in results.items() if k != "environment"}, indent=1))


if __name__ == "__main__":
    main()
