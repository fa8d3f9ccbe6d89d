"""Hugging Face model cards for a finished run: the final NF4 model folder and the LoRA adapter folder.

:func:`write_model_cards` gives each folder a ``README.md``: YAML metadata (``base_model`` as a hub id,
``library_name``, ``pipeline_tag: image-to-text``, datasets, license notes, and a ``model-index`` with the
run's test figures, exactly as ``metrics/06_eval_and_demo.json`` recorded them), then what the model is,
its intended use, "not for clinical use", the test table with the baselines beside it (the same table
as ``summary.md``) and how to load it. It replaces peft's empty template, whose ``base_model`` is a
temporary local path. Notebook 06 calls it after recording its metrics.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCardData

from medcap_helpers import runs
from medcap_helpers.atomic import write_text
from medcap_helpers.config import BLIP_LARGE_ID, TINY_MODEL, MedcapConfig
from medcap_helpers.errors import StageNotRun
from medcap_helpers.evaluation import (
    ADAPTER_SYSTEM,
    MERGED_SYSTEM,
    final_system,
    merged_model_dir,
)
from medcap_helpers.metrics import TABLE_COLUMNS, format_table

CARD_NAME = "README.md"
LICENSE_NAME = "bsd-3-clause-blip-and-cc-by-nc-nd-4.0-iu-xray"
TAGS = ["medical", "radiology", "chest-x-ray", "report-generation", "blip", "qlora", "lora", "medcap"]
_METRIC_TYPES = {"CIDEr": "cider", "BLEU-1": "bleu", "BLEU-4": "bleu", "ROUGE-L": "rouge", "METEOR": "meteor"}
_DATASETS = {
    "smoke": "medcap smoke sample: IU X-Ray (Open-i) report text with placeholder images generated from it",
    "openi": "IU X-Ray (Open-i, Indiana University Chest X-ray Collection)",
    "r2gen": "IU X-Ray (Open-i) in the R2Gen layout and split",
    "kaggle": "IU X-Ray (Open-i), the Kaggle copy",
    "xrv_reports": "IU X-Ray (Open-i) report XMLs bundled with torchxrayvision",
    "mimic_r2gen": "MIMIC-CXR (PhysioNet, credentialed access) in the R2Gen layout and split",
}
MIMIC_LICENSE = ("- MIMIC-CXR (PhysioNet): PhysioNet Credentialed Health Data License 1.5.0 and its data use "
                 "agreement. **Do not share or upload these weights**: a model trained on MIMIC-CXR may only go to "
                 "people bound by the same agreement.")
IU_LICENSE = ("- IU X-Ray / Open-i (Indiana University, via the U.S. National Library of Medicine): CC BY-NC-ND 4.0 — "
              "attribution, **non-commercial**, no derivatives. Weights trained on it are shared here for "
              "non-commercial research only; check the data license before any other use.")


def write_model_cards(run_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``README.md`` into the run's merged NF4 folder and adapter folder (atomically); their paths."""
    run = Path(run_dir).resolve()
    config = MedcapConfig.load(run / "config.json")
    final = runs.read_stage_metrics(run, "06_eval_and_demo")
    table = final["test_table"]
    environment = runs.read_json(run / "environment.json") if (run / "environment.json").is_file() else {}
    folders = {"merged": Path(merged_model_dir(run)), "adapter": run / "adapter"}
    final_kind = "adapter" if final_system(run) == ADAPTER_SYSTEM else "merged"
    written = {}
    for kind, folder in folders.items():
        if not folder.is_dir():
            raise StageNotRun(f"No {kind} model folder at '{folder}': run 03_qlora_train and 05_merge_requant first.")
        text = model_card(config, table, final, environment, kind, run.name, is_final=kind == final_kind)
        written[kind] = write_text(folder / CARD_NAME, text)
    return written


def base_model_id(config: MedcapConfig) -> str | None:
    """The hub id the model was fine-tuned from; None for the tiny smoke model or a local folder."""
    name = str(config.model_name)
    if name == TINY_MODEL or Path(name).expanduser().exists():
        return None
    return name


def card_metadata(config: MedcapConfig, table: dict[str, dict[str, Any]], kind: str, run_name: str) -> ModelCardData:
    """The YAML front matter: hub fields and a model-index with the system's test figures."""
    system = MERGED_SYSTEM if kind == "merged" else ADAPTER_SYSTEM
    dataset = _DATASETS.get(config.data_source) or f"{config.hub_dataset_id} (IU X-Ray)"
    results = []
    row = table.get(system, {})
    for column in TABLE_COLUMNS:
        value = row.get(column)
        if value is None:
            continue
        name = column
        low, high = row.get(f"{column}_ci_low"), row.get(f"{column}_ci_high")
        if low is not None and high is not None:
            name += f" (95% bootstrap CI over studies {low:.3f}–{high:.3f})"
        results.append(EvalResult(task_type="image-to-text", task_name="Chest X-ray report generation "
                                                                     f"({config.target.upper()})",
                                  dataset_type="iu-xray", dataset_name=dataset, dataset_split="test",
                                  metric_type=_METRIC_TYPES.get(column, column.lower().replace(" ", "-")),
                                  metric_value=float(value), metric_name=name))
    tags = TAGS + (["nf4", "4-bit", "bitsandbytes"] if kind == "merged" else ["peft"])
    if config.is_smoke or config.model_name == TINY_MODEL:
        tags.append("smoke-test")
    return ModelCardData(
        base_model=base_model_id(config), library_name="transformers" if kind == "merged" else "peft",
        pipeline_tag="image-to-text", license="other", license_name=LICENSE_NAME, language=["en"],
        datasets=[dataset], metrics=sorted(set(_METRIC_TYPES.values())), tags=tags,
        model_name=f"medcap {run_name} ({'merged NF4' if kind == 'merged' else 'LoRA adapter'})",
        eval_results=results or None)


def model_card(config: MedcapConfig, table: dict[str, dict[str, Any]], final: dict[str, Any],
               environment: dict[str, Any], kind: str, run_name: str, is_final: bool = False) -> str:
    """The whole ``README.md`` text of the ``kind`` folder ("merged" or "adapter"); ``is_final`` when 05 chose
    it as the run's final model."""
    metadata = card_metadata(config, table, kind, run_name)
    base = base_model_id(config)
    tiny = config.model_name == TINY_MODEL
    what = ("the LoRA adapter (QLoRA: trained on the 4-bit NF4 base)" if kind == "adapter" else
            "the LoRA adapter merged into the base and re-quantized to 4-bit NF4")
    system = MERGED_SYSTEM if kind == "merged" else ADAPTER_SYSTEM
    if tiny:
        origin = ("**This is a smoke-test model.** It was fine-tuned from a *tiny, randomly initialised* BLIP (the "
                  f"classes of [{BLIP_LARGE_ID}](https://huggingface.co/{BLIP_LARGE_ID}), a tiny size, no pretrained "
                  "weights), built locally by medcap's `smoke` profile, for minutes on the CPU. It exists to check "
                  "the pipeline end to end; its captions and numbers say nothing about model quality.")
    elif base:
        origin = f"Fine-tuned from [{base}](https://huggingface.co/{base})."
    else:
        origin = (f"Fine-tuned from a local BLIP checkpoint (folder `{Path(config.model_name).name}`); "
                  "`base_model` is left out because it is not a hub id.")
    smoke_data = (" The smoke sample pairs real IU X-Ray report text with **placeholder images generated from "
                  "that text**." if config.is_smoke else "")
    loading = _loading_snippet(kind, base, tiny, config)
    title = "merged NF4 model" if kind == "merged" else "LoRA adapter"
    choice = ("It is this run's **final model**, chosen in notebook 05." if is_final else
              "It is not this run's final model: notebook 05 chose the "
              + ("LoRA adapter" if kind == "merged" else "merged NF4 model") + ".")
    lora = (f"LoRA r={config.lora_r}, alpha={config.lora_alpha}, dropout={config.lora_dropout}, on "
            f"{', '.join(config.lora_target_modules)} of the text decoder"
            + (" and the vision tower" if config.lora_vision else ""))
    split = "the R2Gen split" if config.split_mode == "r2gen" else "study"
    ratios = "/".join(f"{r:g}" for r in config.split_ratios)
    lines = [
        "---", metadata.to_yaml(), "---", "",
        f"# medcap: BLIP + QLoRA for chest X-ray reports — {title}", "",
        (f"> **Not for clinical use.** A research and teaching model: it writes text that looks like the "
         f"{config.target.upper()} section of a chest radiograph report. Its output is not a diagnosis, has not "
         "been validated clinically, and must not inform any decision about a patient."), "",
        f"This folder holds {what}, from the medcap run `{run_name}` (profile `{config.profile}`). {choice} {origin}",
        "",
        "## Intended use", "",
        ("Research and teaching: how QLoRA fine-tuning of an image captioner behaves on radiology reports, "
         "and how it compares with simple baselines. Out of scope: any clinical, diagnostic or triage use, "
         "use on patients, and commercial use (see the licenses below)."), "",
        "## Training", "",
        (f"- data: {_DATASETS.get(config.data_source, config.data_source)}; split by {split} "
         f"(train/validation/test {ratios}), target {config.target.upper()}.{smoke_data}"),
        f"- QLoRA: 4-bit NF4 base with double quantization; {lora}.",
        (f"- {config.num_train_epochs:g} epochs, learning rate {config.learning_rate:g} "
         f"({config.lr_scheduler_type}), effective batch {config.effective_batch_size}; best epoch by validation "
         "CIDEr."), "",
        "## Evaluation (test split)", "",
        (f"This model is the row **{system}**; the baselines (zero-shot base model, the constant most frequent "
         "training report, nearest-neighbour retrieval) sit beside it, scored the same way. Brackets: 95% "
         "bootstrap intervals over studies."), "",
        format_table(table), "",
    ]
    lines += [line for key in ("test_note", "ce_statement") if final.get(key) for line in (str(final[key]), "")]
    packages = ", ".join(f"{name} {version}" for name, version in environment.get("packages", {}).items()
                         if name in ("torch", "transformers", "peft", "bitsandbytes") and version)
    lines += [
        "## How to load it", "", loading, "",
        "## Licenses", "",
        "- BLIP (Salesforce) code and weights: BSD-3-Clause."
        + (" (The smoke model has no BLIP weights.)" if tiny else ""),
        MIMIC_LICENSE if config.data_source == "mimic_r2gen" else IU_LICENSE,
        "- medcap, the code that trained it: Apache-2.0.", "",
        "## Environment", "",
        (f"medcap run `{run_name}`, git commit `{environment.get('git_commit')}`, {packages}; "
         f"GPU: {environment.get('gpu') or 'none (CPU)'}."), "",
    ]
    return "\n".join(lines)


def _loading_snippet(kind: str, base: str | None, tiny: bool, config: MedcapConfig) -> str:
    settings = f"max_new_tokens={config.max_new_tokens}, num_beams={config.num_beams}"
    generate = ('image = Image.open("chest.png").convert("RGB")\n'
                'inputs = processor(images=image, return_tensors="pt").to(model.device)\n'
                f"ids = model.generate(**inputs, {settings})\n"
                "print(processor.decode(ids[0], skip_special_tokens=True))")
    if kind == "merged":
        return ("The 4-bit settings travel in `config.json` (bitsandbytes must be installed; safetensors only):\n\n"
                "```python\nfrom PIL import Image\n"
                "from transformers import BlipForConditionalGeneration, BlipProcessor\n\n"
                'model = BlipForConditionalGeneration.from_pretrained("path/to/this/folder")\n'
                'processor = BlipProcessor.from_pretrained("path/to/this/folder")\n' + generate + "\n```\n\n"
                "Or serve the run's upload demo: `medcap demo --run RUN_DIR`.")
    base_source = ('"path/to/the/run/tiny_model"  # the smoke run\'s tiny base model' if tiny
                   else f'"{base}"' if base else f'"path/to/{Path(config.model_name).name}"')
    return ("Load the base model in 4-bit NF4 (as in training), then the adapter on top:\n\n"
            "```python\nimport torch\nfrom peft import PeftModel\nfrom PIL import Image\n"
            "from transformers import BitsAndBytesConfig, BlipForConditionalGeneration, BlipProcessor\n\n"
            'nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,\n'
            "                         bnb_4bit_compute_dtype=torch.float16)\n"
            f"base = BlipForConditionalGeneration.from_pretrained({base_source}, quantization_config=nf4)\n"
            'model = PeftModel.from_pretrained(base, "path/to/this/folder").eval()\n'
            'processor = BlipProcessor.from_pretrained("path/to/this/folder")\n' + generate + "\n```")
