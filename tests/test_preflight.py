"""The preflight says, in seconds, what would break a long run and how to fix it."""

from __future__ import annotations

from pathlib import Path

import pytest

from medcap_helpers import preflight
from medcap_helpers.config import MedcapConfig


def by_name(checks: list[preflight.Check]) -> dict[str, preflight.Check]:
    return {c.name: c for c in checks}


def fake_gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    """``count`` visible 24 GB GPUs with 20 GB free, as torch.cuda reports them."""
    cuda = preflight.torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "get_device_name", lambda index=0: "Test GPU")
    monkeypatch.setattr(cuda, "mem_get_info", lambda: (20e9, 24e9))
    monkeypatch.setattr(cuda, "device_count", lambda: count)


def refuse(address, timeout):  # noqa: ANN001, ANN201
    raise OSError("network is unreachable")


def test_the_smoke_profile_passes_on_a_cpu_machine(tmp_path: Path) -> None:
    checks = preflight.run_checks(MedcapConfig.from_profile("smoke", run_dir=str(tmp_path)), connect=refuse)
    assert preflight.passed(checks), preflight.report(checks)
    assert by_name(checks)["model"].detail == "'tiny' needs no download"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks what a machine without a GPU reports")
def test_the_full_profile_names_every_missing_piece(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    config = MedcapConfig.from_profile("full", run_dir=str(tmp_path / "run"), data_path=str(tmp_path / "nope.tgz"),
                                       images_dir=str(tmp_path / "png"))
    checks = by_name(preflight.run_checks(config, connect=refuse))
    assert checks["CUDA GPU"].status == preflight.FAIL and "CUDA" in checks["CUDA GPU"].fix
    assert checks["data_path"].status == preflight.FAIL and "medcap_helpers.download" in checks["data_path"].fix
    assert checks["model"].status == preflight.FAIL and "unreachable" in checks["model"].detail
    text = preflight.report(list(checks.values()))
    assert "To fix:" in text and "the run would break" in text and len(text.splitlines()) < 25


def test_a_reachable_hub_and_offline_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    config = MedcapConfig.from_profile("full", run_dir=str(tmp_path), device="auto")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert preflight._hub(config, lambda address, timeout: object()).status == preflight.OK
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE" in preflight._hub(config, refuse).fix
    (tmp_path / "hf" / "hub" / "models--Salesforce--blip-image-captioning-large").mkdir(parents=True)
    assert preflight._hub(config, refuse).status == preflight.OK


def test_too_little_disk_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: type("U", (), {"free": 1e9})())
    check = preflight._disk(MedcapConfig.from_profile("full", run_dir=str(tmp_path), images_dir=str(tmp_path / "x")))
    assert check.status == preflight.FAIL and "needs about 15.8 GB" in check.detail  # the image tokens on disk too
    from_pixels = MedcapConfig.from_profile("full", run_dir=str(tmp_path), images_dir=str(tmp_path / "x"),
                                            cache_vision_embeddings=False)
    assert "needs about 7.0 GB" in preflight._disk(from_pixels).detail


def test_missing_java_is_a_warning_not_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preflight.shutil, "which", lambda name: None)
    check = preflight._java()
    assert check.status == preflight.WARN and "default-jre" in check.fix


def test_medcap_check_prints_one_screen(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from medcap_helpers.cli import main

    assert main(["check", "--profile", "smoke", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "[ok  ] free disk" in out and "Ready to run." in out


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks what a machine without a GPU reports")
def test_a_full_run_stops_at_the_preflight_without_a_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from medcap_helpers.cli import main

    status = main(["run", "--profile", "full", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 2 and "[FAIL] CUDA GPU" in err and "To fix:" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "metrics").exists()  # nothing ran


def test_more_gpus_than_visible_fails_before_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpus(monkeypatch, 2)
    config = MedcapConfig.from_profile("full", run_dir=str(tmp_path), load_in_4bit=False)
    assert by_name(preflight._cuda(config))["GPUs"].detail == "training on 2 of 2"
    too_many = by_name(preflight._cuda(config.replace(num_gpus=4)))["GPUs"]
    assert too_many.status == preflight.FAIL and "--gpus 2" in too_many.fix


def test_a_compiled_step_without_its_toolchain_is_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpus(monkeypatch, 1)
    full = MedcapConfig.from_profile("full", run_dir=str(tmp_path), load_in_4bit=False, compile_training=True)
    monkeypatch.setattr(preflight.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(preflight.shutil, "which", lambda name: None)
    check = by_name(preflight._cuda(full))["torch.compile"]
    assert check.status == preflight.WARN and check.detail.startswith("no Triton and no C compiler:")
    assert "Triton" in check.detail and "C compiler" in check.detail and "compile_training=false" in check.fix
    monkeypatch.setattr(preflight.shutil, "which", lambda name: "/usr/bin/cc" if name == "cc" else None)
    only_triton = by_name(preflight._cuda(full))["torch.compile"]
    assert only_triton.detail.startswith("no Triton:")
    uncompiled = full.replace(compile_training=False, compile_generation=False)
    assert "torch.compile" not in by_name(preflight._cuda(uncompiled))
