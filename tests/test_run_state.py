"""``benchmarks/full_profile.py --pack-state``: a run's results carried between two GPU machines."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from full_profile import REBUILT_FOLDERS, pack_run_state, unpack_run_state  # noqa: E402


def test_a_packed_run_keeps_its_results_and_leaves_what_the_run_rebuilds(tmp_path: Path) -> None:
    run = tmp_path / "run"
    kept = {"metrics/03_qlora_train.json": "{}", "adapter/adapter_model.safetensors": "weights",
            "sweep/chosen.json": "{}", "02_baseline.done": "", "03_qlora_train.done": "",
            "predictions/test.json": "[]"}
    rebuilt = {f"{folder}/file": "x" for folder in REBUILT_FOLDERS} | {"01_data.done": "", ".lock": ""}
    for name, text in (kept | rebuilt).items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(text)

    assert pack_run_state(run, tmp_path / "state.tgz") > 0
    unpack_run_state(tmp_path / "state.tgz", tmp_path / "elsewhere")

    found = {str(p.relative_to(tmp_path / "elsewhere")) for p in (tmp_path / "elsewhere").rglob("*") if p.is_file()}
    assert found == set(kept)  # 01 reruns (its marker is gone) and rebuilds the data; 02 and 03 stay done
    assert (tmp_path / "elsewhere" / "adapter" / "adapter_model.safetensors").read_text() == "weights"


def test_a_stopped_training_stage_keeps_its_newest_complete_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for step in (10, 20, 30):
        checkpoint = run / "checkpoints" / f"checkpoint-{step}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "adapter_model.safetensors").write_text(f"step {step}")
        if step < 30:  # checkpoint-30 was cut off before its trainer state was written
            (checkpoint / "trainer_state.json").write_text('{"global_step": %d}' % step)
    (run / "02_baseline.done").write_text("")

    pack_run_state(run, tmp_path / "stopped.tgz")
    unpack_run_state(tmp_path / "stopped.tgz", tmp_path / "stopped")
    assert sorted(p.name for p in (tmp_path / "stopped" / "checkpoints").iterdir()) == ["checkpoint-20"]

    (run / "03_qlora_train.done").write_text("")  # once 03 has finished, its checkpoints stay behind
    pack_run_state(run, tmp_path / "finished.tgz")
    unpack_run_state(tmp_path / "finished.tgz", tmp_path / "finished")
    assert not (tmp_path / "finished" / "checkpoints").exists()


def test_cell_times_read_papermills_durations_from_an_executed_notebook(tmp_path: Path) -> None:
    import json

    from full_profile import cell_times

    cells = [{"cell_type": "code", "source": ["import medcap_helpers\n", "x = 1"],
              "metadata": {"papermill": {"duration": 17.06}}},
             {"cell_type": "markdown", "source": "# notes", "metadata": {}},
             {"cell_type": "code", "source": "fast()", "metadata": {"papermill": {"duration": 0.2}}},
             {"cell_type": "code", "source": "train()", "metadata": {"papermill": {"duration": 310.7}}}]
    (tmp_path / "03.ipynb").write_text(json.dumps({"cells": cells}))
    assert cell_times(tmp_path / "03.ipynb") == [{"cell": 0, "seconds": 17.1, "code": "import medcap_helpers"},
                                                 {"cell": 3, "seconds": 310.7, "code": "train()"}]
    assert cell_times(tmp_path / "missing.ipynb") == []  # a stage that failed before writing its notebook


def test_notebook_seconds_is_papermills_time_for_the_whole_notebook(tmp_path: Path) -> None:
    import json

    from full_profile import notebook_seconds

    (tmp_path / "05.ipynb").write_text(json.dumps({"cells": [], "metadata": {"papermill": {"duration": 111.07}}}))
    (tmp_path / "unexecuted.ipynb").write_text(json.dumps({"cells": [], "metadata": {}}))
    assert notebook_seconds(tmp_path / "05.ipynb") == 111.1
    assert notebook_seconds(tmp_path / "unexecuted.ipynb") is None
    assert notebook_seconds(tmp_path / "missing.ipynb") is None


def test_pieces_of_one_run_add_up_and_another_run_moves_the_previous_one_to_after_earlier() -> None:
    from full_profile import merge_after

    env_a, env_b = {"git_commit": "aaa", "gpu": "H200"}, {"git_commit": "bbb", "gpu": "H200"}
    results = merge_after({"today": {"total_seconds": 9.0}}, {"01_data": {"seconds": 40.0}}, "runs/r", env_a, {})
    results = merge_after(results, {"02_baseline": {"seconds": 100.0, "peak_process_gpu_gb": 3.9}}, "runs/r", env_a,
                          {"03_epochs": []})
    assert results["after"]["total_seconds"] == 140.0 and results["after"]["peak_process_gpu_gb"] == 3.9
    assert "after_earlier" not in results and results["today"] == {"total_seconds": 9.0}

    results = merge_after(results, {"01_data": {"seconds": 44.0}}, "runs/r", env_b, {})  # a new commit: a new run
    assert results["after"]["stages"] == {"01_data": {"seconds": 44.0}} and results["after"]["total_seconds"] == 44.0
    assert [run["environment"]["git_commit"] for run in results["after_earlier"]] == ["aaa"]
    assert results["after_earlier"][0]["total_seconds"] == 140.0

    results = merge_after(results, {"01_data": {"seconds": 45.0}}, "runs/other", env_b, {})  # another run folder
    assert [run["run"] for run in results["after_earlier"]] == ["runs/r", "runs/r"]
    assert [run["total_seconds"] for run in results["after_earlier"]] == [44.0, 140.0]


@pytest.mark.slow
def test_warming_a_carried_runs_cache_fills_it_for_every_split(smoke_run: dict, tmp_path: Path) -> None:
    """A run unpacked on a fresh machine has no vision cache; the set-up fills it as 02 and 03 would."""
    import shutil

    from full_profile import warm_vision_cache

    from medcap_helpers import runs
    from medcap_helpers.config import MedcapConfig
    from medcap_helpers.data import load_saved_dataset
    from medcap_helpers.vision_cache import image_hash, without_image_decoding

    run = tmp_path / "run"
    shutil.copytree(smoke_run["dir"], run, symlinks=True,
                    ignore=shutil.ignore_patterns("kernel-ipc-*", ".lock*", "vision_cache"))
    config = MedcapConfig.load(run / "config.json").replace(run_dir=str(run))
    runs.write_json(run / "config.json", config.to_dict())

    warmed = warm_vision_cache(run)

    dataset, _ = load_saved_dataset(run)
    images = {image_hash(row[column]) for name in dataset for row in without_image_decoding(dataset[name])
              for column in ("image", "image_2") if row.get(column) is not None}
    cached = {path.stem for path in (run / "vision_cache").rglob("*.npy")}
    assert warmed["cached_images"] == len(cached) and cached == images


def test_a_finished_stage_is_not_timed_again_without_force(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from full_profile import run_after

    (tmp_path / "01_data.done").write_text("{}")
    assert run_after("01", str(tmp_path), "data/rehearsal") == {}  # medcap run would skip it in no time
    assert "--force reruns it" in capsys.readouterr().out


def test_a_measured_stage_leaves_its_notebook_output_and_results_in_the_artefacts_folder(tmp_path: Path) -> None:
    """On the GPU machine the folder is $OUT, which comes back with the call, stage by stage."""
    import json

    from full_profile import RESULTS, keep_artefacts

    run, out = tmp_path / "run", tmp_path / "out"
    (run / "notebooks").mkdir(parents=True)
    (run / "notebooks" / "03_qlora_train.ipynb").write_text('{"cells": []}')

    kept = keep_artefacts(run, "03_qlora_train", "[medcap] 03_qlora_train ran in 293 s\n", out)

    assert (out / "notebooks" / "03_qlora_train.ipynb").read_text() == '{"cells": []}'
    assert (out / "03_qlora_train.log").read_text() == "[medcap] 03_qlora_train ran in 293 s\n"
    assert json.loads((out / "full_profile.json").read_text()) == json.loads((RESULTS / "full_profile.json").read_text())
    assert sorted(p.name for p in kept) == ["03_qlora_train.ipynb", "03_qlora_train.log", "full_profile.json"]

    keep_artefacts(run, "04_sweep", "failed before its notebook was written", out)  # a stage that failed early
    assert (out / "04_sweep.log").exists() and not (out / "notebooks" / "04_sweep.ipynb").exists()


def test_the_decoding_benchmark_saves_each_measurement_without_its_reports(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/decoding.py saves after each backend, so a GPU call cut off mid-compile keeps the default's rate."""
    import json

    from decoding import save_results

    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("OUT", str(out))
    results = {"part": "decoding", "default": {"reports_per_s": 9.6, "reports": ["the heart is normal ."]}}
    save_results(results, tmp_path / "decoding.json")
    saved = json.loads((tmp_path / "decoding.json").read_text())
    assert saved == {"part": "decoding", "default": {"reports_per_s": 9.6}}
    assert json.loads((out / "decoding.json").read_text()) == saved
    assert results["default"]["reports"] == ["the heart is normal ."]  # still there for the comparison


def test_generation_retries_are_read_from_the_executed_notebooks_warnings(tmp_path: Path) -> None:
    import json

    from full_profile import generation_retries

    warning = ("/medcap_helpers/train.py:318: RuntimeWarning: Generating reports: a batch of 52 studies ran out of "
               "GPU memory; going on with batches of 26.\n  reports = generate_reports(\n")
    cells = [{"cell_type": "code", "source": "train()", "outputs": [
                 {"output_type": "stream", "name": "stderr", "text": ["Epoch 1\n", warning]},
                 {"output_type": "display_data", "data": {"text/plain": "<Figure>"}}]},
             {"cell_type": "markdown", "source": "# notes"}]
    (tmp_path / "03.ipynb").write_text(json.dumps({"cells": cells}))
    assert generation_retries(tmp_path / "03.ipynb") == [warning.split("\n")[0]]
    cells[0]["outputs"][0]["text"] = ["Epoch 1\n"]
    (tmp_path / "clean.ipynb").write_text(json.dumps({"cells": cells}))
    assert generation_retries(tmp_path / "clean.ipynb") == []
    assert generation_retries(tmp_path / "missing.ipynb") == []


def test_the_recorded_facts_keep_each_epochs_training_time(tmp_path: Path) -> None:
    """So a whole run's Trainer rate (samples per second of training, validation excluded) can be read off."""
    from full_profile import stage_facts

    from medcap_helpers import runs

    epochs = [{"epoch": 1.0, "train_loss": 7.3, "eval_loss": 6.0, "train_seconds": 41.5, "first_step_seconds": 1.9,
               "peak_memory": {"max_allocated_gb": 1.6}, "val_scores": {"CIDEr": 0.01}}]
    runs.write_stage_metrics(tmp_path, "03_qlora_train", {"epochs": epochs, "train_runtime_s": 60.0})
    facts = stage_facts(str(tmp_path))  # 04 has not run: its facts are left out
    assert facts["03_epochs"] == [{k: epochs[0][k] for k in ("epoch", "train_loss", "eval_loss", "train_seconds",
                                                             "first_step_seconds", "peak_memory")}]
    assert facts["03_train_runtime_s"] == 60.0 and "04_trials" not in facts
