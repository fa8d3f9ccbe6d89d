"""Runner pieces that need no notebook execution: stage selection, paths, the summary table."""

from __future__ import annotations

import pytest

from medcap_helpers import runs
from medcap_helpers.config import STAGES, ConfigError, MedcapConfig
from medcap_helpers.metrics import format_table
from medcap_helpers.pipeline import absolute_paths, parse_stages
from medcap_helpers.summary import summary_markdown


def test_stage_specs() -> None:
    assert parse_stages(None) == list(STAGES)
    assert parse_stages("01-03") == ["01_data", "02_baseline", "03_qlora_train"]
    assert parse_stages("6,1") == ["01_data", "06_eval_and_demo"]  # always in pipeline order
    assert parse_stages("04_sweep") == ["04_sweep"]
    with pytest.raises(ConfigError, match="Unknown stage"):
        parse_stages("07")


def test_relative_paths_resolve_against_the_callers_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = absolute_paths(MedcapConfig.from_profile("full", run_dir="runs/x"))
    assert config.run_dir == str(tmp_path / "runs" / "x")
    assert config.data_path == str(tmp_path / "data" / "NLMCXR_reports.tgz")
    assert config.model_name == "Salesforce/blip-image-captioning-large"  # a hub id stays a hub id


def test_table_shows_the_bootstrap_interval_and_missing_values() -> None:
    table = format_table({"constant": {"CIDEr": 0.25, "CIDEr_ci_low": 0.2, "CIDEr_ci_high": 0.31, "BLEU-4": 0.1},
                          "model": {"CIDEr": 0.5, "BLEU-4": None}})
    assert "| constant | 0.250 [0.200, 0.310] | 0.100 |" in table
    assert "| model | 0.500 | – |" in table


def test_atomic_json_leaves_no_partial_file(tmp_path) -> None:
    target = tmp_path / "metrics" / "x.json"
    with pytest.raises(TypeError):
        runs.write_json(target, {"bad": object()})
    assert not target.exists() and list(target.parent.iterdir()) == []
    runs.write_json(target, {"ok": 1})
    assert runs.read_json(target) == {"ok": 1}


def test_summary_of_a_partial_run_lists_what_exists(tmp_path) -> None:
    config = MedcapConfig.from_profile("smoke", run_dir=str(tmp_path))
    runs.write_run_header(config)
    runs.write_stage_metrics(tmp_path, "01_data", {"examples": 3})
    text = summary_markdown(tmp_path)
    assert "Smoke sample" in text and "metrics/01_data.json" in text and "| torch |" in text


def test_only_settings_that_differ_from_the_profile_are_injected() -> None:
    from medcap_helpers.pipeline import injected_parameters

    smoke = absolute_paths(MedcapConfig.from_profile("smoke", run_dir="/tmp/medcap-run"))
    assert injected_parameters(smoke) == {"RUN_DIR": "/tmp/medcap-run"}
    full = MedcapConfig.from_profile("full", run_dir="/tmp/medcap-run", lora_r=4, sweep_ranks=(4, 8))
    parameters = injected_parameters(full)
    assert parameters["PROFILE"] == "full"
    assert parameters["OVERRIDES"] == {"lora_r": 4, "sweep_ranks": [4, 8]}
    rebuilt = MedcapConfig.from_profile("full", run_dir="/tmp/medcap-run", **parameters["OVERRIDES"])
    assert rebuilt.to_dict() == MedcapConfig.from_dict(full.to_dict()).to_dict()  # nothing lost


def test_progress_hidden_drops_progress_displays_only_under_medcap_run(monkeypatch) -> None:
    from IPython.core.displaypub import CapturingDisplayPublisher
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.display import publish_display_data

    from medcap_helpers.pipeline import HEADLESS_ENV, PROGRESS_WIDGET, progress_hidden

    shell = InteractiveShell.instance()
    try:
        seen = CapturingDisplayPublisher()
        monkeypatch.setattr(shell, "display_pub", seen)

        def step() -> None:
            publish_display_data({PROGRESS_WIDGET: {"model_id": "m"}, "text/plain": "Generating reports:  0%|  | 0/9"})
            publish_display_data({"text/html": "<progress value='1' max='9'></progress>", "text/plain": "HTML"})
            publish_display_data({"text/markdown": "| epoch |\n|---:|\n| 1 |"})

        monkeypatch.setenv(HEADLESS_ENV, "1")
        with progress_hidden():
            step()
        assert [o["data"] for o in seen.outputs] == [{"text/markdown": "| epoch |\n|---:|\n| 1 |"}]
        assert shell.display_pub is seen  # restored

        seen.outputs.clear()
        monkeypatch.delenv(HEADLESS_ENV)
        with progress_hidden():  # a person's notebook keeps its bars
            step()
        assert len(seen.outputs) == 3
    finally:
        InteractiveShell.clear_instance()


def test_medcap_run_starts_without_the_model_stack() -> None:
    """`medcap run` starts once per stage under benchmarks/full_profile.py and hands the work to the notebook's
    kernel: its own process must not import the demo, the model code, peft or bitsandbytes (5 s of a 9 s start
    on 2 cores, measured)."""
    import subprocess
    import sys

    probe = ("import sys, medcap_helpers.cli; "
             "print(sorted(m for m in ('medcap_helpers.demo', 'medcap_helpers.model', 'peft', 'bitsandbytes') "
             "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
