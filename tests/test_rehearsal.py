"""The rehearsal profile: real-scale IU X-Ray with nothing downloaded (random BLIP-large, placeholder images)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from medcap_helpers import data, model, processing, rehearsal
from medcap_helpers.config import (
    PROFILE_DEFAULTS,
    RANDOM_BLIP_LARGE,
    ConfigError,
    MedcapConfig,
)
from medcap_helpers.reports import (
    bundled_reports,
    clean_text,
    study_id_from_image_id,
    xrv_reports_archive,
)


@pytest.fixture(scope="module")
def small_rehearsal(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        xrv_reports_archive()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return rehearsal.make_rehearsal_data(tmp_path_factory.mktemp("rehearsal"), workers=2, limit=30)


def test_the_profile_is_full_with_nothing_downloaded() -> None:
    full, rehearsal_profile = PROFILE_DEFAULTS["full"], PROFILE_DEFAULTS["rehearsal"]
    differing = {k for k in set(full) | set(rehearsal_profile) if full.get(k) != rehearsal_profile.get(k)}
    assert differing == {"run_dir", "model_name", "data_path", "images_dir", "max_new_tokens", "min_new_tokens"}
    config = MedcapConfig.from_profile("rehearsal")
    assert config.model_name == RANDOM_BLIP_LARGE and config.min_new_tokens == config.max_new_tokens == 75
    assert config.data_source == "openi" and config.split_mode == "r2gen" and config.views == "both"
    with pytest.raises(ConfigError, match="exceeds max_new_tokens"):
        config.replace(min_new_tokens=80)


def test_one_placeholder_per_image_id_in_the_open_i_layout(small_rehearsal: Path) -> None:
    reports = bundled_reports().reports[:30]
    expected = {image_id for r in reports for image_id in r.image_ids}
    written = {p.stem for p in (small_rehearsal / "NLMCXR_png").glob("*.png")}
    assert written == expected
    sizes = {Image.open(small_rehearsal / "NLMCXR_png" / f"{i}.png").size for i in sorted(expected)[:10]}
    assert all(max(size) == 512 for size in sizes)
    assert (small_rehearsal / "NLMCXR_reports.tgz").read_bytes() == xrv_reports_archive().read_bytes()


def test_the_open_i_source_reads_it_as_a_download(small_rehearsal: Path, tmp_path: Path) -> None:
    config = MedcapConfig.from_profile("rehearsal", run_dir=str(tmp_path), device="cpu", model_name="tiny",
                                       data_path=str(small_rehearsal / "NLMCXR_reports.tgz"),
                                       images_dir=str(small_rehearsal / "NLMCXR_png"))
    dd, report = data.build_dataset(config, progress=False)
    assert report.reports_total == 3955 and report.skipped_images == []
    studies = {study_id_from_image_id(i) for r in bundled_reports().reports[:30] if clean_text(r.findings)
               for i in r.image_ids}
    inside = studies & set(data.r2gen_split())
    assert sum(len(dd[s]) for s in data.SPLITS) == len(inside) > 0  # one row per study, both views
    assert report.studies_outside_split == len(studies - inside)
    assert any(r["image_2"] is not None for r in dd["train"])


def test_the_random_blip_large_is_built_once_in_the_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wiring of the random model (the real size is the GPU's job: here BLIP-large's config is swapped
    for a tiny one): 384 px processor, special ids pointing at the offline tokenizer, built once."""
    tiny = model.tiny_blip_config(4000, image_size=64, init_range=0.02)
    monkeypatch.setattr(model, "blip_large_config", lambda: tiny)
    config = MedcapConfig.from_profile("rehearsal", run_dir=str(tmp_path), device="cpu", load_in_4bit=False)
    texts = ["Heart size is normal. The lungs are clear.", "Small left pleural effusion."] * 20
    base, processor = model.load_model_and_processor(config, texts=texts)
    folder = processing.local_model_dir(config)
    assert folder.name == "random_blip_large" and (folder / "model.safetensors").is_file()
    assert processor.image_processor.size["height"] == 384
    assert base.config.text_config.bos_token_id == processor.tokenizer.bos_token_id
    first = (folder / "model.safetensors").stat().st_mtime_ns
    model.load_model_and_processor(config, texts=texts)
    assert (folder / "model.safetensors").stat().st_mtime_ns == first
