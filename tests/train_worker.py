"""A small real training run for the kill-and-resume test (run as a script, not collected by pytest).

    python tests/train_worker.py RUN_DIR [--step-delay SECONDS]

Builds a tiny smoke config (6 bundled reports, 3 epochs of 2 optimizer steps, CPU) and calls the library
as a notebook does: ``data.build_dataset`` -> ``model.load_model_and_processor`` -> ``train.train``.
Prints ``step N`` after every optimizer step; ``--step-delay`` sleeps after each step so that a test
can kill the process in the middle of an epoch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EPOCHS = 3
STEPS_PER_EPOCH = 2


def worker_config(run_dir: str):  # noqa: ANN201
    from medcap_helpers.config import MedcapConfig

    return MedcapConfig.from_profile(
        "smoke", run_dir=run_dir, smoke_num_reports=6, smoke_image_size=64, max_train_examples=8,
        max_eval_examples=2, num_train_epochs=float(EPOCHS), per_device_train_batch_size=4,
        gradient_accumulation_steps=1, max_target_tokens=24, max_new_tokens=8, num_beams=1, eval_batch_size=2,
        logging_steps=1, gradient_checkpointing=False, lr_scheduler_type="constant")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--step-delay", type=float, default=0.0)
    args = parser.parse_args()

    import torch
    from transformers import TrainerCallback

    from medcap_helpers import data, model, train

    torch.set_num_threads(1)

    class StepReporter(TrainerCallback):
        def on_step_end(self, train_args, state, control, **kwargs):  # noqa: ANN001, ANN201
            print(f"step {state.global_step}", flush=True)
            if args.step_delay:
                time.sleep(args.step_delay)

    config = worker_config(args.run_dir)
    dataset, _ = data.build_dataset(config, progress=False)
    base, processor = model.load_model_and_processor(config, dataset)
    result = train.train(config, base, processor, dataset, callbacks_extra=[StepReporter()])
    print(f"done global_step={result.global_step} resumed_from={result.resumed_from}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
