"""Beam-3 generation with and without the compiled decoding step (``compile_generation``), side by side.

    python -m medcap_helpers.rehearsal data/rehearsal    # set-up (not timed)
    python benchmarks/decoding.py                        # CUDA: calls of 64, 64, 64, 296 studies, 4 GB cap
    python benchmarks/decoding.py --calls 296 --backends inductor,cudagraphs   # which compiled steps too
    python benchmarks/decoding.py --backends graph       # the step recorded as a CUDA graph (graph_generation)
    TORCH_LOGS=recompiles python benchmarks/decoding.py --no-default --calls 64,64 --max-batch 26   # compiled only

The rehearsal's random BLIP-large with a random LoRA adapter, reports forced to 75 new tokens, the
generation batch sized to the 4 GB budget (``generation.generation_batch_size``), from cached image
tokens, through ``generation.generate_reports`` as stages 02-06 call it, in consecutive calls of the
validation split's first studies (``--calls``: by default three sweep trials' 64, then the whole split).
Each call is timed whole: the compiled path compiles its decoding step in the first call and records
its CUDA graphs in every call, as in a pipeline stage. Also recorded: the batches that ran, the peak
memory, and how many reports are identical (random weights make near-ties common: the 16-bit decoder
copy already showed that the top token agrees wherever the top two logits differ by more than 0.1).

Results go to ``benchmarks/results/decoding.json`` (and ``$OUT`` when set).

    python benchmarks/decoding.py --count-ops            # CPU: PyTorch operators per decoding step

``--count-ops`` counts, on the CPU with the smoke run's tiny model (2 decoder layers), the operators a
beam-3 decoding step calls, inside the decoder (per layer) and in transformers' generation loop (beam
search bookkeeping), leaving out views and other calls that launch no kernel. On a GPU each is a launch
issued by the CPU, which is what bounds a decoding step (``benchmarks/results/decoding_ops.json``).
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


def measure(peft_model: Any, processor: Any, config: Any, rows: Any, compile_backend: str | None,
            calls: list[int], graph_step: bool = False) -> dict[str, Any]:
    """Consecutive ``generate_reports`` calls as the pipeline makes them (a sweep trial's validation
    studies, then a whole split): each call of ``n`` studies takes the first ``n`` of ``rows``, from cached
    image tokens when the config caches them, the batch sized to the budget. Each call is timed whole
    (compiling included); the batches actually run are recorded (a batch that runs out of memory is
    retried smaller and the smaller size kept)."""
    import torch

    from full_profile import memory, timed

    from medcap_helpers import generation

    sizes: list[int] = []
    original = generation.generate_from_tokens, generation.multiview_generate

    def counted(function: Any) -> Any:
        return lambda model, inputs, **kwargs: sizes.append(len(inputs)) or function(model, inputs, **kwargs)

    generation.generate_from_tokens, generation.multiview_generate = (counted(f) for f in original)
    torch.cuda.reset_peak_memory_stats()
    timings, reports = [], []
    try:
        for n in calls:
            subset = rows.select(range(min(n, len(rows))))
            inputs = generation.generation_inputs(peft_model, processor, subset, config)
            size = generation.generation_batch_size(peft_model, config)
            sizes.clear()
            texts, seconds = timed(lambda: generation.generate_reports(
                peft_model, processor, inputs, batch_size=size, max_new_tokens=config.max_new_tokens,
                min_new_tokens=config.min_new_tokens, num_beams=config.num_beams, progress=False,
                compile_backend=compile_backend, graph_step=graph_step))
            timings.append({"studies": len(subset), "seconds": seconds, "reports_per_s": len(subset) / seconds,
                            "batch": size, "batches_run": list(sizes)})
            reports += texts
            print(f"  {'graph' if graph_step else compile_backend or 'default'}: {timings[-1]}", flush=True)
    finally:
        generation.generate_from_tokens, generation.multiview_generate = original
    studies, seconds = sum(t["studies"] for t in timings), sum(t["seconds"] for t in timings)
    return {"compile_backend": compile_backend, "graph_step": graph_step,
            "cached_tokens": bool(config.cache_vision_embeddings),
            "calls": timings, "studies": studies, "seconds": seconds, "reports_per_s": studies / seconds,
            "last_call_reports_per_s": timings[-1]["reports_per_s"], **memory(), "reports": reports,
            "fell_back": list(generation._graph_failures if graph_step else generation._compile_failures)}


def step_agreement(peft_model: Any, processor: Any, config: Any, rows: Any, studies: int = 16) -> dict[str, Any]:
    """Whether the recorded step computes what the decoder computes: greedy reports for ``studies`` studies
    from the 16-bit copy, then, fed the same tokens, the copy's logits over each whole report (transformers'
    forward, no cache) against the recorded step's, token by token (a CUDA graph, one row per study).
    With random weights near-ties are common, so the top token is compared where the top two differ by more
    than 0.1 as well as everywhere."""
    import torch

    from medcap_helpers import generation
    from medcap_helpers.decoding_graph import CACHE_ARGUMENT, StaticDecodingStep
    from medcap_helpers.model import unwrap_model
    from medcap_helpers.multiview import generate_from_tokens

    base = unwrap_model(peft_model)
    inputs = generation.generation_inputs(peft_model, processor, rows.select(range(studies)), config)
    copy = generation.decoder_for_generation(peft_model, num_beams=1)
    memory = torch.stack([inputs[i] for i in range(studies)]).to(device=next(copy.parameters()).device, dtype=copy.dtype)
    shared = generation.shared_cross_attention_modules(copy)
    with torch.no_grad():
        ids = generate_from_tokens(base, memory, decoder=copy, max_new_tokens=config.max_new_tokens,
                                   min_new_tokens=config.min_new_tokens, num_beams=1)
        for module in shared:
            module.reset()
        reference = copy(input_ids=ids[:, :-1], encoder_hidden_states=memory).logits.float()
        for module in shared:
            module.reset()
        step = StaticDecodingStep(copy, studies, 1, ids.shape[1] - 1, use_graph=memory.device.type == "cuda").install()
        cache = step.new_batch()
        recorded = torch.cat([copy(input_ids=ids[:, t:t + 1], encoder_hidden_states=memory,
                                   **{CACHE_ARGUMENT: cache}).logits.float() for t in range(ids.shape[1] - 1)], dim=1)
        step.release()
    top2 = reference.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.1
    same_top = recorded.argmax(-1) == reference.argmax(-1)
    difference = (recorded - reference).abs()
    return {"studies": studies, "tokens": int(ids.shape[1] - 1), "max_abs_logit_difference": float(difference.max()),
            "mean_abs_logit_difference": float(difference.mean()), "largest_abs_logit": float(reference.abs().max()),
            "same_top_token": float(same_top.float().mean()),
            "same_top_token_where_top_two_differ_by_0.1": float(same_top[clear].float().mean()),
            "positions_where_top_two_differ_by_0.1": float(clear.float().mean())}


NO_KERNEL = {"as_strided", "view", "expand", "empty", "resolve_conj", "reshape", "transpose", "unsqueeze", "t",
             "broadcast_to", "select", "slice", "_unsafe_view", "empty_strided", "empty_like", "detach", "alias",
             "permute", "contiguous", "to", "_reshape_alias", "lift_fresh", "split", "chunk", "squeeze", "flatten",
             "linear", "matmul", "_to_copy", "dropout", "softmax", "layer_norm", "gelu", "item", "is_nonzero",
             "narrow", "numpy_T"}
"""Operators that are views, allocations or wrappers around the counted kernels' own operators."""


def memory_per_study(peft_model: Any, processor: Any, config: Any, rows: Any, sizes: list[int]) -> dict[str, Any]:
    """The GPU memory a generation batch takes beyond what was allocated before it, at each batch size in
    ``sizes`` (one batch each, cached image tokens, the config's beams and lengths), beside the estimate
    that sizes batches (:func:`generation.study_generation_bytes` per study plus the decoder copy). The
    slope between two sizes is what one more study costs."""
    import torch

    from medcap_helpers import generation

    copy_bytes = generation.decoder_copy_bytes(peft_model)
    per_study_estimate = generation.study_generation_bytes(peft_model, config, shared_cross_attention=copy_bytes > 0)
    measured = []
    for n in sizes:
        inputs = generation.generation_inputs(peft_model, processor, rows.select(range(n)), config)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        generation.generate_reports(peft_model, processor, inputs, max_new_tokens=config.max_new_tokens,
                                    min_new_tokens=config.min_new_tokens, num_beams=config.num_beams,
                                    batch_size=n, progress=False)
        peak = torch.cuda.max_memory_allocated() - before
        measured.append({"studies": n, "allocated_before_gb": before / 1e9, "batch_peak_gb": peak / 1e9,
                         "estimate_gb": (copy_bytes + n * per_study_estimate) / 1e9})
        print(measured[-1], flush=True)
    slope = ((measured[-1]["batch_peak_gb"] - measured[0]["batch_peak_gb"]) / (sizes[-1] - sizes[0])
             if len(sizes) > 1 else None)
    return {"batches": measured, "measured_gb_per_study": slope, "estimated_gb_per_study": per_study_estimate / 1e9,
            "decoder_copy_gb": copy_bytes / 1e9,
            "budget_batch": generation.generation_batch_size(peft_model, config),
            "allocator_cap_gb": torch.cuda.get_per_process_memory_fraction(0)
            * torch.cuda.get_device_properties(0).total_memory / 1e9}


def count_step_ops(run_dir: str, steps: tuple[int, int] = (10, 30)) -> dict[str, Any]:
    """Kernel-launching operators per beam-3 decoding step, in the decoder and in the generation loop: the
    difference between two generation lengths, divided by the extra steps (so set-up is not counted)."""
    from collections import Counter

    import torch
    from torch.profiler import ProfilerActivity, profile

    from medcap_helpers import data, generation
    from medcap_helpers.config import MedcapConfig
    from medcap_helpers.model import attach_lora, load_model_and_processor

    config = MedcapConfig.from_profile("smoke", run_dir=run_dir)
    if not (Path(run_dir) / "dataset").exists():
        dataset, report = data.build_dataset(config, progress=False)
        data.save_dataset(dataset, report, run_dir)
    dataset = data.load_saved_dataset(run_dir)[0]
    base, processor = load_model_and_processor(config, dataset)
    model = attach_lora(base, config)
    layers = base.config.text_config.num_hidden_layers
    studies = generation.study_inputs(dataset["test"].select(range(4)))
    make_copy = generation.decoder_for_generation

    def mark(module: Any, name: str) -> None:  # the module's calls under one profiler label
        open_labels: list[Any] = []
        module.register_forward_pre_hook(lambda *_: open_labels.append(torch.profiler.record_function(name).__enter__()))
        module.register_forward_hook(lambda *_: open_labels.pop().__exit__(None, None, None))

    def marked_copy(source: Any, num_beams: int = 1) -> Any:
        decoder = make_copy(source, num_beams)
        mark(decoder, "decoder")
        for layer in decoder.bert.encoder.layer:
            mark(layer, "layer")
        return decoder

    counted: dict[int, dict[str, Counter]] = {}
    generation.decoder_for_generation = marked_copy
    try:
        for length in steps:
            with profile(activities=[ProfilerActivity.CPU]) as profiler:
                generation.generate_reports(model, processor, studies, max_new_tokens=length, min_new_tokens=length,
                                            num_beams=3, batch_size=4, progress=False)
            where: dict[str, Counter] = {"layer": Counter(), "decoder": Counter(), "loop": Counter()}
            for event in profiler.events():
                name = event.name.removeprefix("aten::")
                if not event.name.startswith("aten::") or name in NO_KERNEL:
                    continue
                parent = event.cpu_parent
                while parent is not None and parent.name not in ("layer", "decoder"):
                    parent = parent.cpu_parent
                where["loop" if parent is None else parent.name][name] += 1
            counted[length] = where
    finally:
        generation.decoder_for_generation = make_copy
    extra = steps[1] - steps[0]
    per_step = {part: counted[steps[1]][part] - counted[steps[0]][part] for part in ("layer", "decoder", "loop")}
    layer, rest, loop = (sum(per_step[part].values()) / extra for part in ("layer", "decoder", "loop"))
    return {"model": f"tiny BLIP, {layers} decoder layers, beam 3, 4 studies, CPU",
            "ops_per_step_per_layer": layer / layers, "ops_per_step_decoder_outside_layers": rest,
            "ops_per_step_generation_loop": loop,
            "blip_large_ops_per_step": layer / layers * 12 + rest + loop,
            "layer_top": {k: v / extra / layers for k, v in per_step["layer"].most_common(12)},
            "generation_loop_top": {k: v / extra for k, v in per_step["loop"].most_common(12)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/rehearsal")
    parser.add_argument("--run", default=str(Path(tempfile.gettempdir()) / "medcap_decoding"))
    parser.add_argument("--calls", default="64,64,64,296",
                        help="studies per generate_reports call, in order (default: three sweep trials' "
                             "validation studies, then the validation split)")
    parser.add_argument("--default", action=argparse.BooleanOptionalAction, default=True,
                        help="measure the default (uncompiled) path too (--no-default: the compiled ones only)")
    parser.add_argument("--max-batch", type=int, default=None,
                        help="at most this many studies per batch (eval_batch_size; the budget may allow fewer)")
    parser.add_argument("--memory-per-study", metavar="SIZES", default=None,
                        help="CUDA: the memory of one batch at each of these sizes (e.g. 8,16,24,32) against "
                             "the estimate that sizes batches; results in decoding_memory.json")
    parser.add_argument("--count-ops", action="store_true", help="CPU: operators per decoding step (tiny model)")
    parser.add_argument("--backends", default="inductor",
                        help="comma-separated torch.compile backends to measure beside the default path "
                             "(inductor: fused kernels, static shapes; cudagraphs: CUDA graphs of the traced step, no codegen; "
                             "graph: no compiler, the step on fixed buffers recorded as a CUDA graph, graph_generation)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.count_ops:
        from medcap_helpers.runs import environment_info, write_json

        counts = {"part": "decoding_ops", **count_step_ops(str(Path(tempfile.gettempdir()) / "medcap_decoding_ops")),
                  "environment": environment_info(), "command": " ".join(["python"] + sys.argv)}
        write_json(RESULTS.with_name("decoding_ops.json"), counts)
        print(json.dumps(counts, indent=1)[:3000])
        return
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/decoding.py measures CUDA graphs: it needs a CUDA GPU.")
    from full_profile import cap_memory, rehearsal_peft_model

    from medcap_helpers.runs import environment_info

    context_gb = cap_memory()
    config, dd, peft_model, processor = rehearsal_peft_model(args.run, args.data)
    if args.max_batch:
        config = config.replace(eval_batch_size=args.max_batch)
    if args.memory_per_study:
        sizes = [int(n) for n in args.memory_per_study.split(",")]
        results = {"part": "decoding_memory", "cuda_context_gb": context_gb, "environment": environment_info(),
                   "command": " ".join(["python"] + sys.argv),
                   **memory_per_study(peft_model, processor, config, dd["validation"], sizes)}
        save_results(results, RESULTS.with_name("decoding_memory.json"))
        print(json.dumps({k: v for k, v in results.items() if k != "environment"}, indent=1))
        return
    rows = dd["validation"]
    calls = [int(n) for n in args.calls.split(",")]
    results: dict[str, Any] = {"part": "decoding", "cuda_context_gb": context_gb, "environment": environment_info(),
                               "command": " ".join(["python"] + sys.argv)}
    compiled_names = {backend: {"inductor": "compiled", "graph": "graph"}.get(backend, f"compiled_{backend}")
                      for backend in args.backends.split(",") if backend}
    measured = ([("default", None)] if args.default else []) + [(name, backend) for backend, name in compiled_names.items()]
    for name, backend in measured:
        try:
            graph = backend == "graph"
            results[name] = measure(peft_model, processor, config, rows, None if graph else backend, calls, graph)
        except Exception as err:  # noqa: BLE001 - a failure of the lever is a result too
            results[name] = {"compile_backend": backend, "error": f"{type(err).__name__}: {str(err)[:2000]}"}
        print(name, json.dumps(without_reports(results[name]))[:1500], flush=True)
        save_results(results)  # each measurement as it ends: a call cut off keeps the ones before
    if "graph" in compiled_names:
        results["graph_step_agreement"] = step_agreement(peft_model, processor, config, rows)
        print("graph_step_agreement", results["graph_step_agreement"], flush=True)
    default = results.get("default", {})
    for name in compiled_names.values():
        compiled = results[name]
        if "reports" in default and "reports" in compiled:
            same = sum(a == b for a, b in zip(default["reports"], compiled["reports"]))
            key = name.replace("compiled", "comparison", 1) if "compiled" in name else f"comparison_{name}"
            results[key] = {"speedup": compiled["reports_per_s"] / default["reports_per_s"],
                            "identical_reports": same / len(default["reports"])}
            print(key, results[key], flush=True)
    save_results(results)


def without_reports(measurement: dict[str, Any]) -> dict[str, Any]:
    """A measurement without its generated reports (kept in memory only, for the comparison)."""
    return {k: v for k, v in measurement.items() if k != "reports"}


def save_results(results: dict[str, Any], path: Path = RESULTS) -> None:
    """``results`` without the generated reports to ``path``, and a copy to ``$OUT`` when set (what a GPU
    call brings back)."""
    from medcap_helpers.runs import write_json

    write_json(path, {name: without_reports(value) if isinstance(value, dict) else value
                      for name, value in results.items()})
    if os.environ.get("OUT"):
        shutil.copy(path, Path(os.environ["OUT"]) / path.name)


if __name__ == "__main__":
    main()
