"""Markdown tables from ``benchmarks/results/*.json`` (the README's performance section).

    python benchmarks/make_table.py            # prints the tables
    python benchmarks/make_table.py --readme   # also replaces the block between the README's markers
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from full_profile import cached_tokens  # benchmarks/ is this script's folder

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"


def _load(part: str) -> dict[str, Any] | None:
    path = RESULTS / f"{part}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _f(value: Any, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def training_table(results: dict[str, Any], title: str) -> list[str]:
    lines = [f"**{title}**", "",
             "| configuration | trainable | peak allocated (GB) | peak reserved (GB) | process incl. CUDA context (GB) | samples/s |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        if "settings" not in r:
            continue
        if r.get("error"):
            lines.append(f"| {name} | – | – | – | – | {r['error'][:60]} |")
            continue
        lines.append(f"| {name} | {r['trainable_share']:.2%} | {_f(r.get('max_allocated_gb'))} | "
                     f"{_f(r.get('max_reserved_gb'))} | {_f(r.get('process_gpu_gb_max'))} | {_f(r.get('samples_per_s'), 1)} |")
    return lines


def tables() -> str:
    out: list[str] = []
    training = _load("training")
    if training:
        env = training["environment"]
        out += [f"Measured on {env['gpu']} with torch {env['packages'].get('torch')}, transformers "
                f"{env['packages'].get('transformers')}, bitsandbytes {env['packages'].get('bitsandbytes')} "
                f"(commit `{(env.get('git_commit') or '?')[:12]}`); {env['model']}; 384 px, 128 tokens unless "
                "stated; samples/s is the median over timed optimizer steps after warm-up.", ""]
        out += training_table(training["results"], "Training") + [""]
        seed = training["results"].get("seed settings (QLoRA, batch 1 × 4, checkpointing)", {})
        lora = training["results"].get("LoRA on 16-bit base", {})
        full = training["results"].get("full fine-tuning, mixed precision", {})
        if seed.get("max_allocated_gb") and lora.get("max_allocated_gb") and full.get("max_allocated_gb"):
            out += [f"What 4-bit buys (peak allocated, seed settings): QLoRA {seed['max_allocated_gb']:.2f} GB, "
                    f"LoRA on a 16-bit base {lora['max_allocated_gb']:.2f} GB "
                    f"({lora['max_allocated_gb'] / seed['max_allocated_gb']:.1f}×), full fine-tuning "
                    f"{full['max_allocated_gb']:.2f} GB ({full['max_allocated_gb'] / seed['max_allocated_gb']:.1f}×).", ""]
    cap = _load("cap4gb")
    if cap:
        out += training_table(cap["results"], "Under a 4 GB cap (allocator capped at 4 GB minus the CUDA context)") + [""]
        fit = cap["results"].get("automatic fit (effective batch 16)", {})
        if fit.get("explain"):
            out += ["Automatic fit (`vram_budget_gb`), effective batch 16:", "", "```", fit["explain"], "```", ""]
    inference = _load("inference")
    if inference:
        out += ["**Inference** (100 new tokens)", "",
                "| model | loaded (GB) | greedy: latency (s) | beam 3: latency (s) | beam 3: peak allocated (GB) | batch 16 greedy: reports/s |",
                "|---|---:|---:|---:|---:|---:|"]
        for name, r in inference["results"].items():
            if "load" not in r:
                out.append(f"| {name} | {r.get('error', '')[:80]} |")
                continue
            out.append(f"| {name} | {_f(r['load']['allocated_gb'])} | {_f(r['single_beam1']['latency_s_median'])} | "
                       f"{_f(r['single_beam3']['latency_s_median'])} | {_f(r['single_beam3']['peak_allocated_gb'])} | "
                       f"{_f(r['batch16_greedy']['reports_per_s'], 1)} |")
        out.append("")
    views = _load("views")
    if views:
        r = views["results"]
        out += ["**One view or both views per study** (`views`; NF4 + LoRA, under the 4 GB cap; both views = "
                "1,154 image tokens as the decoder's memory; generation: beam 3, 100 new tokens forced, fp16 "
                f"compute; commit `{(views['environment'].get('git_commit') or '?')[:12]}`)", "",
                "| views | training: studies/s (batch 8, checkpointing) | training: peak allocated (GB) | "
                "generation: reports/s (batch 8) | generation: peak allocated (GB) |", "|---|---:|---:|---:|---:|"]
        for mode in ("single", "both"):
            train = r.get(f"training, views={mode}, batch 8, checkpointing", {})
            gen = r.get(f"generation, views={mode}, beam 3, batch 8", {})
            out.append(f"| {mode} | {_f(train.get('samples_per_s'), 1)} | {_f(train.get('max_allocated_gb'))} | "
                       f"{_f(gen.get('reports_per_s'), 1)} | {_f(gen.get('peak_allocated_gb'))} |")
        out.append("")
    profile = _load("full_profile")
    if profile:
        out += full_profile_tables(profile)
    multi = _load("multi_gpu")
    if multi:
        out += multi_gpu_table(multi)
    disk = _load("disk")
    if disk and "gb" in disk["results"]:
        sizes = disk["results"]["gb"]
        out += ["**On disk**: " + ", ".join(f"{k} {v:.2f} GB" for k, v in sizes.items()), ""]
    return "\n".join(out)


def multi_gpu_table(results: dict[str, Any]) -> list[str]:
    """One GPU against two (``benchmarks/multi_gpu.py``): training throughput, validation loss, sweep time."""
    training, sweep = results.get("training", {}), results.get("sweep", {})
    lines = ["**One GPU or two** (rehearsal, 4 GB cap per GPU; `python benchmarks/multi_gpu.py`; the two-GPU pairs on two "
             "H200s, the later one-GPU rows on H200 or H100 machines)", "",
             "| GPUs | image tokens | micro-batch × accumulation | other settings | training studies | epochs | "
             "training samples/s: all epochs (each after its first step) | final validation loss |",
             "|---:|---|---|---|---:|---:|---:|---:|"]
    for name, train in training.items():
        if not (isinstance(train, dict) and "micro_batch" in train):
            continue
        cached = cached_tokens(train)
        steady = train.get("steady_samples_per_s") or []
        losses = train.get("eval_loss") or [None]
        lines.append(f"| {train['gpus']} | {'cached' if cached else 'from pixels'} | {train['micro_batch']} × "
                     f"{train['accumulation']}{', checkpointing' if train.get('checkpointing') else ''} | "
                     f"{other_settings(train)} | {_f(_studies(train), 0)} | "
                     f"{len(train.get('eval_loss') or [])} | {_f(train.get('samples_per_s'), 1)}"
                     f"{' (' + ', '.join(_f(r, 1) for r in steady) + ')' if steady else ''} | {_f(losses[-1], 3)} |")
    ratios = []
    for name, comparison in training.items():
        if name.startswith("comparison"):
            what = "cached image tokens" if name.endswith("cached") else "from pixels"
            ratios.append(f"{what}: training {comparison['throughput_ratio']:.2f}× the one-GPU throughput (goal ≥ "
                          f"1.85×), final validation loss {comparison['final_eval_loss_difference']:.1%} apart "
                          "(goal ≤ 2%)")
    for gpus in (1, 2):
        if f"{gpus}_gpu" in sweep:
            ratios.append(f"sweep on {gpus} GPU(s): {_duration(sweep[f'{gpus}_gpu'].get('wall_s'))}")
    cut = sweep.get("2_gpu_cut_off")
    if cut and "2_gpu" not in sweep:
        runtimes = cut["trial_train_runtime_s"]
        ratios.append(f"sweep on 2 GPUs: not finished, {cut['trials_finished']} of {cut['trials_planned']} trials "
                      f"in the {cut['time_limit_s']} s a call had left, {min(runtimes):.0f}-{max(runtimes):.0f} s "
                      f"per trial (see `2_gpu_cut_off` in the results for why)")
    if "comparison" in sweep:
        comparison = sweep["comparison"]
        ratios.append(f"the sweep in {comparison['wall_time_ratio']:.2f}× the one-GPU time (goal ≤ 0.55×), "
                      f"{'the same' if comparison['same_choice'] else 'a different'} setting chosen")
    lines += ["", "Each pair the ratios compare ran in one call; other rows came from other calls, which land on "
              "different machines (this step is bound by the CPU launching kernels: the budget probe's rate for "
              "one setting ranged from 52 to 90 samples/s over three calls). Compare rows of one pair."]
    return lines + ([""] + [f"Two GPUs against one, {r}." for r in ratios] if ratios else []) + [""]


def other_settings(train: dict[str, Any]) -> str:
    """A training entry's ``--set`` values other than the image-token cache (its own column)."""
    values = {k: v for k, v in (train.get("settings") or {}).items() if k != "cache_vision_embeddings"}
    return ", ".join(f"`{k}={v}`" for k, v in values.items()) or "–"


def _studies(train: dict[str, Any]) -> float | None:
    epochs = len(train.get("eval_loss") or []) or 1
    return train["samples"] / epochs if train.get("samples") else None


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else (f"{seconds / 60:.1f} min" if seconds >= 60 else
                                                            f"{seconds:.0f} s")


def full_profile_tables(profile: dict[str, Any]) -> list[str]:
    """Today's stage times, the projected "after" ones, those measured whole through ``medcap run``, and the
    levers measured side by side."""
    today, after = profile["today"], profile.get("after_projected")
    measured = (profile.get("after") or {}).get("stages", {})
    out = [f"**The full profile at real scale** (the rehearsal: random BLIP-large, 2,069 / 296 / 590 studies, both "
           f"views, 75-token reports, process capped at {profile['cap_gb']:g} GB on an H200; "
           "`benchmarks/full_profile.py`)", "",
           "| stage | today | after: projected | after: measured (`--after`) | peak process GPU, measured (GB) | "
           "how (projected) |", "|---|---:|---:|---:|---:|---|"]
    for stage, r in today["stages"].items():
        later = (after or {}).get("stages", {}).get(stage, {})
        run = measured.get(stage, {})
        peak = run.get("peak_process_gpu_gb") if run else None
        out.append(f"| {stage} | {_duration(r.get('seconds'))} | {_duration(later.get('seconds'))} | "
                   f"{_duration(run.get('seconds'))} | {_f(peak)} | {later.get('how', '')} |")
    if after:
        best = sum((measured.get(stage) or later).get("seconds") or 0.0 for stage, later in after["stages"].items())
        total = f"**{_duration(best)}** ({today['total_seconds'] / best:.1f}x)"
        whole = (f"all {len(measured)} stages: {total}" if len(measured) == len(after["stages"]) else
                 f"{len(measured)} of {len(after['stages'])} stages; with the projection for the rest: {total}")
        peak = max((s.get("peak_process_gpu_gb") or 0.0 for s in measured.values()), default=0.0)
        out += [f"| **01 → 06** | **{_duration(today['total_seconds'])}** | **{_duration(after['total_seconds'])}** "
                f"({after['speedup']:.1f}x) | {whole} | **{_f(peak or None)}** | |", "",
                after["note"], ""]
        if measured:
            out += [(profile.get("after") or {}).get("note", ""), ""]
            out += measured_runs_table(profile)
    check, rates = profile.get("check"), profile.get("rates")
    if check and rates:
        (old_name, old), (new_name, new) = [(k, v) for k, v in check.items() if k.startswith(("today", "after"))]
        copy = rates["decoder_copy_logits"]
        fitted = rates["training_fitted"]
        out += ["**The levers, side by side on one slice** (same process, same cap; "
                f"{check['studies']} validation studies, beam 3, 75 tokens)", "",
                "| | today | after |", "|---|---:|---:|",
                f"| generation, reports/s | {old['reports_per_s']:.2f} (batch {old['batch']}) | "
                f"{rates['generation']['reports_per_s']:.2f} (batch {rates['generation']['batch']}, budget-sized) |",
                f"| generation, peak process GPU (GB) | {_f(old['process_gpu_gb'])} | "
                f"{_f(rates['generation']['process_gpu_gb'])} |",
                f"| training, samples/s | {profile['today']['stages']['03_qlora_train']['samples_per_s']:.1f} "
                f"(batch 1 x 4) | {fitted['samples_per_s']:.1f} (batch {fitted['settings'][0]} x "
                f"{fitted['settings'][1]}, checkpointing {'on' if fitted['settings'][2] else 'off'}) |",
                f"| training, peak process GPU (GB) | "
                f"{_f(profile['today']['stages']['03_qlora_train']['memory_training']['process_gpu_gb'])} | "
                f"{_f(fitted['process_gpu_gb'])} |", "",
                f"Same results: the 16-bit decoder copy's next-token logits differ from the 4-bit path's by "
                f"{copy['mean_abs_difference']:.4f} on average (logit spread {copy['logit_std']:.2f}); the top token "
                f"agrees at {copy['top1_agreement']:.1%} of positions and at "
                f"{copy['top1_agreement_where_margin_over_0.1']:.0%} of those whose top two differ by more than 0.1 "
                f"(random weights make near-ties common). Training with data-loader workers gives "
                f"{'the identical' if check['loss_curves_identical'] else 'a different'} loss curve "
                f"(40 steps, largest difference {check['largest_loss_difference']:.1e}).", ""]
    return out


def measured_runs_table(profile: dict[str, Any]) -> list[str]:
    """Every whole run measured with ``--after``, newest first, stage by stage: its time, the executed
    notebook's own share of it where recorded, and its peak process GPU memory."""
    runs = [profile["after"]] + list(profile.get("after_earlier", []))
    runs = [run for run in runs if len(run.get("stages", {})) == len(profile["today"]["stages"])]  # whole runs only
    if len(runs) < 2:
        return []

    def label(run: dict[str, Any]) -> str:
        env = run.get("environment") or {}
        return f"`{(env.get('git_commit') or '?')[:7]}`, {env.get('gpu', '?').replace('NVIDIA ', '')}"

    out = ["**Each measured whole run** (stage time, of it the executed notebook's own time, and peak process GPU)", "",
           "| stage | " + " | ".join(label(run) for run in runs) + " |", "|---|" + "---:|" * len(runs)]

    def cell(stage: dict[str, Any] | None) -> str:
        if not stage:
            return "–"
        notebook = stage.get("notebook_seconds")
        inside = f" (notebook {_duration(notebook)})" if notebook is not None else ""
        peak = stage.get("peak_process_gpu_gb")
        return f"{_duration(stage.get('seconds'))}{inside}, " + (f"{peak:.2f} GB" if peak is not None else "CPU only")

    for stage in profile["today"]["stages"]:
        out.append(f"| {stage} | " + " | ".join(cell(run["stages"].get(stage)) for run in runs) + " |")
    out.append("| **01 → 06** | " + " | ".join(
        f"**{_duration(run['total_seconds'])}**, {_f(run.get('peak_process_gpu_gb'))} GB" for run in runs) + " |")
    return out + [""]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args()
    text = tables()
    print(text)
    if args.readme:
        readme = ROOT / "README.md"
        content = readme.read_text()
        if BEGIN not in content:
            raise SystemExit(f"README.md has no {BEGIN} … {END} block")
        head, rest = content.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        readme.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


if __name__ == "__main__":
    main()
