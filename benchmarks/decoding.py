"""Beam-3 generation with and without the compiled decoding step (``compile_generation``), side by side.

    python -m medcap_helpers.rehearsal data/rehearsal    # set-up (not timed)
    python benchmarks/decoding.py --studies 296          # CUDA: the rehearsal's validation split, 4 GB cap

The rehearsal's random BLIP-large with a random LoRA adapter, reports forced to 75 new tokens, the
generation batch sized to the 4 GB budget (``generation.generation_batch_size``), through
``generation.generate_reports`` as stages 02-06 call it. Each call is timed whole: the compiled one
compiles (and records its CUDA graphs) inside the call, as every pipeline call would. Also recorded:
the time of a second, warm call of the first batch alone, the peak memory, and how many reports are
identical (random weights make near-ties common: the 16-bit decoder copy already showed that the top
token agrees wherever the top two logits differ by more than 0.1).

Results go to ``benchmarks/results/decoding.json`` (and ``$OUT`` when set).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results" / "decoding.json"


def measure(peft_model: Any, processor: Any, config: Any, rows: Any, compile_backend: str | None) -> dict[str, Any]:
    import torch

    from full_profile import memory, timed

    from medcap_helpers.generation import generate_reports, generation_batch_size, study_inputs

    sample = study_inputs(rows)
    size = generation_batch_size(peft_model, config)
    settings = dict(batch_size=size, max_new_tokens=config.max_new_tokens, min_new_tokens=config.min_new_tokens,
                    num_beams=config.num_beams, progress=False, compile_backend=compile_backend)
    torch.cuda.reset_peak_memory_stats()
    reports, seconds = timed(lambda: generate_reports(peft_model, processor, sample, **settings))
    first_batch = [sample[i] for i in range(min(size, len(sample)))]
    _, batch_seconds = timed(lambda: generate_reports(peft_model, processor, first_batch, **settings))
    return {"compile_backend": compile_backend, "batch": size, "studies": len(sample), "seconds": seconds,
            "reports_per_s": len(sample) / seconds, "one_batch_call_s": batch_seconds, **memory(),
            "reports": reports}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/rehearsal")
    parser.add_argument("--run", default=str(Path(tempfile.gettempdir()) / "medcap_decoding"))
    parser.add_argument("--studies", type=int, default=296)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/decoding.py measures CUDA graphs: it needs a CUDA GPU.")
    from full_profile import cap_memory, rehearsal_peft_model

    from medcap_helpers.runs import environment_info, write_json

    context_gb = cap_memory()
    config, dd, peft_model, processor = rehearsal_peft_model(args.run, args.data)
    rows = dd["validation"].select(range(min(args.studies, len(dd["validation"]))))
    results: dict[str, Any] = {"part": "decoding", "cuda_context_gb": context_gb, "environment": environment_info(),
                               "command": " ".join(["python"] + sys.argv)}
    for name, backend in (("default", None), ("compiled", "inductor")):
        try:
            results[name] = measure(peft_model, processor, config, rows, backend)
        except Exception as err:  # noqa: BLE001 - a failure of the lever is a result too
            results[name] = {"compile_backend": backend, "error": f"{type(err).__name__}: {str(err)[:2000]}"}
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "reports"})[:1500], flush=True)
    default, compiled = results["default"], results["compiled"]
    if "reports" in default and "reports" in compiled:
        same = sum(a == b for a, b in zip(default["reports"], compiled["reports"]))
        results["comparison"] = {"speedup": compiled["reports_per_s"] / default["reports_per_s"],
                                 "identical_reports": same / len(default["reports"])}
        print(results["comparison"], flush=True)
    for name in ("default", "compiled"):
        results[name].pop("reports", None)
    write_json(RESULTS, results)
    if os.environ.get("OUT"):
        shutil.copy(RESULTS, Path(os.environ["OUT"]) / RESULTS.name)


if __name__ == "__main__":
    main()
