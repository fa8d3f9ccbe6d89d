"""Tokens a training epoch processes with and without ``group_by_length``, on the real IU X-Ray reports.

    python -m medcap_helpers.rehearsal data/rehearsal      # the real 3,955 reports (+ placeholder images)
    python benchmarks/padding.py                           # -> benchmarks/results/padding.json

The full profile's training split (R2Gen, 2,069 studies), its reports tokenized as the rehearsal's
collator does (its offline WordPiece tokenizer, truncated at ``max_target_tokens``; BLIP's own BERT
vocabulary splits medical words a little differently), batched as HF's Trainer batches them: a random
sampler, or ``LengthGroupedSampler`` over the effective batch, cut into micro-batches that are each
padded to their longest report. Counted: padded tokens per epoch (what the decoder computes), against
the reports' own tokens. A count, not a speed: the decoder's share of a training step is what shrinks.
Needs no GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results" / "padding.json"
SEEDS = range(5)


def padded_tokens(lengths: list[int], order: list[int], micro_batch: int) -> int:
    return sum(max(lengths[i] for i in order[start:start + micro_batch]) * len(order[start:start + micro_batch])
               for start in range(0, len(order), micro_batch))


def epoch_orders(lengths: list[int], effective_batch: int, grouped: bool, seed: int) -> list[int]:
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    generator = torch.Generator().manual_seed(seed)
    if grouped:
        return list(LengthGroupedSampler(effective_batch, lengths=lengths, generator=generator))
    return torch.randperm(len(lengths), generator=generator).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/rehearsal")
    args = parser.parse_args()

    from full_profile import config_for

    from medcap_helpers import data
    from medcap_helpers.processing import load_processor
    from medcap_helpers.runs import environment_info, write_json
    from medcap_helpers.train import text_column

    config = config_for("/tmp/medcap_padding", args.data)
    dataset, _ = data.build_dataset(config, progress=False)
    texts = text_column(dataset["train"])
    tokenizer = load_processor(config, texts=texts).tokenizer
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=config.max_target_tokens)["input_ids"]]
    effective = config.effective_batch_size
    rows: list[dict[str, Any]] = []
    for micro_batch in (4, 8, 16):
        counts = {grouped: [padded_tokens(lengths, epoch_orders(lengths, effective, grouped, seed), micro_batch)
                            for seed in SEEDS] for grouped in (False, True)}
        random_mean, grouped_mean = statistics.mean(counts[False]), statistics.mean(counts[True])
        rows.append({"micro_batch": micro_batch, "effective_batch": effective,
                     "padded_tokens_random": random_mean, "padded_tokens_grouped": grouped_mean,
                     "grouped_over_random": grouped_mean / random_mean})
        print(f"micro-batch {micro_batch:2d}: {random_mean:,.0f} padded tokens an epoch in random batches, "
              f"{grouped_mean:,.0f} grouped by length ({grouped_mean / random_mean:.2f}x)")
    result = {"part": "padding", "studies": len(lengths), "report_tokens": sum(lengths),
              "mean_report_tokens": statistics.mean(lengths), "max_target_tokens": config.max_target_tokens,
              "seeds": len(SEEDS), "by_micro_batch": rows, "environment": environment_info(),
              "command": "python benchmarks/padding.py"}
    print(f"{len(lengths)} training reports, {sum(lengths):,} tokens ({statistics.mean(lengths):.1f} on average)")
    write_json(RESULTS, result)


if __name__ == "__main__":
    main()
