"""Bad input gets a clear answer: one row per bad input, through the library's public functions.

Each row builds its input under ``tmp_path`` and names the expected outcome:

* an exception type, whose message must contain every listed fragment (the offending file name or
  value, and what is wrong) and no traceback;
* :func:`converted`: the file loads as 8-bit RGB (no error);
* :func:`counted`: the data stage skips it, counts it in a :class:`~medcap_helpers.sources.DataReport`
  field and, where the report lists names, lists it.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from medcap_helpers import (
    budget,
    checkpoints,
    data,
    errors,
    images,
    model,
    reports,
    runs,
    sources,
)
from medcap_helpers.config import ConfigError, MedcapConfig
from medcap_helpers.errors import DataSourceError, ModelLoadError
from medcap_helpers.images import ImageLoadError
from medcap_helpers.reports import ReportParseError
from medcap_helpers.sources import DataReport

Action = Callable[[], Any]
Case = tuple[Action, list[str]]  # what to run, fragments the message (or listing) must contain


# --------------------------------------------------------------------------------------- builders
def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write(path: Path, content: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        path.write_text(content)
    else:
        path.write_bytes(content)
    return path


def grey_png(size: int = 16) -> bytes:
    return png_bytes(Image.new("L", (size, size), 90))


def report_xml(uid: str, findings: str | None, image_ids: list[str]) -> str:
    section = f'<AbstractText Label="FINDINGS">{findings}</AbstractText>' if findings is not None else ""
    parents = "".join(f'<parentImage id="{i}"/>' for i in image_ids)
    return (f'<eCitation><IUXRId id="{uid}"/><Abstract>{section}'
            f'<AbstractText Label="IMPRESSION">No acute disease.</AbstractText></Abstract>{parents}</eCitation>')


def openi_config(tmp: Path, **overrides: Any) -> MedcapConfig:
    return MedcapConfig.from_profile("smoke", run_dir=str(tmp / "run"), data_source="openi",
                                     data_path=str(tmp / "reports"), images_dir=str(tmp / "images"), **overrides)


def openi_folder(tmp: Path, entries: dict[str, str | None], extra_images: tuple[str, ...] = ()) -> MedcapConfig:
    """Reports ``uid -> findings`` (None: no FINDINGS section), each with one image on disk."""
    for uid, findings in entries.items():
        image_id = f"CXR{uid}_IM-00{uid}-1001"
        write(tmp / "reports" / f"{uid}.xml", report_xml(uid, findings, [image_id]))
        write(tmp / "images" / f"{image_id}.png", grey_png())
    for image_id in extra_images:
        write(tmp / "images" / f"{image_id}.png", grey_png())
    return openi_config(tmp)


def load_report(config: MedcapConfig) -> DataReport:
    return sources.load_examples(config, progress=False)[1]


def smoke_config(tmp: Path, **overrides: Any) -> MedcapConfig:
    return MedcapConfig.from_profile("smoke", run_dir=str(tmp / "run"), **overrides)


# --------------------------------------------------------------------------------------- outcomes
def converted(result: Image.Image, fragments: list[str]) -> None:
    assert isinstance(result, Image.Image) and result.mode == "RGB"
    for fragment in fragments:  # e.g. "max=255": the pixel range the conversion must produce
        key, value = fragment.split("=")
        assert int(getattr(np.asarray(result), key)()) == int(value), fragment


def counted(field: str, expected: int) -> Callable[[DataReport, list[str]], None]:
    def check(report: DataReport, fragments: list[str]) -> None:
        value = getattr(report, field)
        assert (len(value) if isinstance(value, list) else value) == expected, f"{field}={value!r}"
        if isinstance(value, list):  # the listing names the file
            listed = " ".join(str(item) for item in value)
            for fragment in fragments:
                assert fragment in listed, f"{fragment!r} not listed in {field}: {listed}"
    check.__name__ = f"counted({field}={expected})"
    return check


# --------------------------------------------------------------------------------------- images
def zero_byte_png(tmp: Path) -> Case:
    path = write(tmp / "empty.png", b"")
    return lambda: images.load_image(path), ["empty.png", "empty (0 bytes)"]


def truncated_png(tmp: Path) -> Case:
    whole = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)))
    path = write(tmp / "cut.png", whole[: len(whole) // 2])
    return lambda: images.inspect_image(path), ["cut.png", "truncated"]


def truncated_png_full_decode(tmp: Path) -> Case:
    whole = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)))
    path = write(tmp / "cut.png", whole[: len(whole) // 2])
    return lambda: images.load_image(path), ["cut.png", "damaged or truncated"]


def text_file_named_png(tmp: Path) -> Case:
    path = write(tmp / "notes.png", "FINDINGS: the heart is normal.\n")
    return lambda: images.load_image(path), ["notes.png", "not an image"]


def missing_image_file(tmp: Path) -> Case:
    return lambda: images.load_image(tmp / "absent.png"), ["absent.png", "cannot read"]


def png_16bit(tmp: Path) -> Case:
    values = np.array([[0, 1024], [2048, 4095]], dtype=np.uint16)  # a 12-bit radiograph stored in 16 bits
    path = tmp / "wide.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    return lambda: images.load_image(path), ["min=0", "max=255"]  # full 8-bit range, not clipped


def rgba_png(tmp: Path) -> Case:
    path = write(tmp / "alpha.png", png_bytes(Image.new("RGBA", (8, 8), (255, 255, 255, 0))))
    return lambda: images.load_image(path), ["max=0"]  # transparent -> black, not the white under it


def palette_png(tmp: Path) -> Case:
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 200, 200, 200] + [0] * 762)
    path = write(tmp / "palette.png", png_bytes(image))
    return lambda: images.load_image(path), ["max=200", "min=200"]


def cmyk_jpeg(tmp: Path) -> Case:
    path = write(tmp / "print.jpg", png_bytes(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG"))
    return lambda: images.load_image(path), ["min=255"]  # no ink = white


def decompression_bomb(tmp: Path) -> Case:
    path = write(tmp / "huge.png", png_bytes(Image.new("L", (300, 300))))
    return lambda: images.load_image(path, max_pixels=10_000), ["huge.png", "90,000 pixels", "max_image_pixels"]


def empty_upload(tmp: Path) -> Case:
    return lambda: images.load_image_bytes(b"", "chest-upload.png"), ["chest-upload.png", "empty"]


# --------------------------------------------------------------------------------------- reports
def malformed_xml(tmp: Path) -> Case:
    path = write(tmp / "7.xml", "<eCitation><AbstractText Label='FINDINGS'>cut off")
    return lambda: reports.read_report(path), ["7.xml", "not valid XML"]


def xml_unknown_encoding(tmp: Path) -> Case:
    path = write(tmp / "8.xml", '<?xml version="1.0" encoding="klingon"?><eCitation/>')
    return lambda: reports.read_report(path), ["8.xml", "klingon"]


def truncated_reports_tgz(tmp: Path) -> Case:
    archive = tmp / "NLMCXR_reports.tgz"
    rng = np.random.default_rng(0)
    with tarfile.open(archive, "w:gz") as tar:
        for uid in range(1, 200):
            blob = report_xml(str(uid), rng.bytes(150).hex(), []).encode()
            info = tarfile.TarInfo(f"ecgen-radiology/{uid}.xml")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    return lambda: reports.load_reports(archive), ["NLMCXR_reports.tgz", "cut short"]


def xml_without_findings(tmp: Path) -> Case:
    config = openi_folder(tmp, {"1": "The heart is normal.", "2": None})
    return lambda: load_report(config), []


def malformed_xml_in_reports_folder(tmp: Path) -> Case:
    config = openi_folder(tmp, {"1": "The heart is normal."})
    write(tmp / "reports" / "9.xml", "<eCitation><IUXRId id='9'/>")
    return lambda: load_report(config), ["9.xml", "not valid XML"]


def report_names_missing_images(tmp: Path) -> Case:
    config = openi_folder(tmp, {"1": "The heart is normal."})
    write(tmp / "reports" / "2.xml", report_xml("2", "Small effusion.", ["CXR2_IM-0002-1001", "CXR2_IM-0002-2001"]))
    return lambda: load_report(config), []


def r2gen_annotation_names_missing_images(tmp: Path) -> Case:
    annotation = write(tmp / "iu_xray" / "annotation.json", json.dumps({
        "train": [{"id": "CXR1_IM-0001", "report": "The heart is normal.",
                   "image_path": ["CXR1_IM-0001/0.png", "CXR1_IM-0001/1.png"]}], "val": [], "test": []}))
    write(tmp / "iu_xray" / "images" / "CXR1_IM-0001" / "0.png", grey_png())  # 1.png is missing
    config = smoke_config(tmp, data_source="r2gen", data_path=str(annotation))
    return lambda: load_report(config), []


def images_without_report(tmp: Path) -> Case:
    config = openi_folder(tmp, {"1": "The heart is normal."}, extra_images=("CXR77_IM-0077-1001", "scan_0001"))
    return lambda: load_report(config), []


def unreadable_image_in_dataset(tmp: Path) -> Case:
    config = openi_folder(tmp, {"1": "The heart is normal.", "2": "Small effusion."})
    path = tmp / "images" / "CXR2_IM-002-1001.png"
    path.write_bytes(path.read_bytes()[:-20])  # the end (IEND) is cut off
    return lambda: load_report(config), ["CXR2_IM-002-1001.png", "truncated"]


def kaggle(tmp: Path, reports_csv: str | bytes) -> MedcapConfig:
    folder = tmp / "kaggle"
    write(folder / "indiana_reports.csv", reports_csv)
    write(folder / "indiana_projections.csv", "uid,filename,projection\n1,1_IM-0001-1001.dcm.png,Frontal\n")
    write(folder / "images_normalized" / "1_IM-0001-1001.dcm.png", grey_png())
    return smoke_config(tmp, data_source="kaggle", data_path=str(folder))


def csv_missing_columns(tmp: Path) -> Case:
    config = kaggle(tmp, "uid,impression\n1,Normal.\n")
    return lambda: sources.load_examples(config, progress=False), ["indiana_reports.csv", "['findings']"]


def csv_not_text(tmp: Path) -> Case:
    config = kaggle(tmp, b"uid,findings,impression\n1,\xff\xfe\x00\x81,Normal\n")
    return lambda: sources.load_examples(config, progress=False), ["indiana_reports.csv", "UTF-8"]


def r2gen_not_json(tmp: Path) -> Case:
    annotation = write(tmp / "annotation.json", '{"train": [')
    config = smoke_config(tmp, data_source="r2gen", data_path=str(annotation))
    write(tmp / "images" / "x.txt", "")
    return lambda: sources.load_examples(config, progress=False), ["annotation.json", "not valid JSON"]


def r2gen_entry_without_id(tmp: Path) -> Case:
    annotation = write(tmp / "annotation.json", json.dumps({"train": [{"report": "Normal.", "image_path": []}]}))
    write(tmp / "images" / "x.txt", "")
    config = smoke_config(tmp, data_source="r2gen", data_path=str(annotation))
    return lambda: sources.load_examples(config, progress=False), ["annotation.json", "entry 0 of 'train'"]


def missing_data_path(tmp: Path) -> Case:
    config = smoke_config(tmp, data_source="openi", data_path=str(tmp / "NLMCXR_reports.tgz"),
                          images_dir=str(tmp))
    return lambda: sources.load_examples(config, progress=False), ["NLMCXR_reports.tgz", "does not exist"]


def empty_dataset_after_filtering(tmp: Path) -> Case:
    config = openi_folder(tmp, {"1": None, "2": "XXXX XXXX."})  # no findings / only de-id tokens
    return lambda: data.build_dataset(config, progress=False), [
        "No usable examples", str(tmp / "reports"), "2 without findings"]


# --------------------------------------------------------------------------------------- settings
def lora_r_zero(tmp: Path) -> Case:
    return lambda: smoke_config(tmp, lora_r=0), ["lora_r", "got 0"]


def negative_learning_rate(tmp: Path) -> Case:
    return lambda: smoke_config(tmp, learning_rate=-2e-4), ["learning_rate", "-0.0002"]


def unknown_target_module(tmp: Path) -> Case:
    return lambda: smoke_config(tmp, lora_target_modules=("query", "attn_proj")), ["'attn_proj'", "query"]


def unknown_setting(tmp: Path) -> Case:
    return lambda: smoke_config(tmp, batch_size=8), ["batch_size", "per_device_train_batch_size"]


def negative_vram_budget(tmp: Path) -> Case:
    return lambda: smoke_config(tmp, vram_budget_gb=-4), ["vram_budget_gb", "-4"]


def vram_budget_smaller_than_model(tmp: Path) -> Case:
    def probe(candidate: budget.TrainingCandidate) -> tuple[float, float]:
        raise RuntimeError("CUDA out of memory. Tried to allocate 512.00 MiB")

    def fit() -> budget.TrainingCandidate:
        outcome = budget.fit_to_budget(budget.candidate_settings(2), probe, budget_gb=0.5)
        assert [o.status for o in outcome.tried] == ["out of memory"] * 4  # every candidate was tried
        return outcome.chosen_or_raise()

    return fit, ["Nothing fits in 0.50 GB", "batch 1 × accumulation 2, checkpointing on: peak allocated – → out of memory",
                 "--vram-budget-gb"]


# --------------------------------------------------------------------------------------- outputs, models
def output_folder_under_a_file(tmp: Path) -> Case:
    write(tmp / "afile", "a regular file, not a folder")
    return lambda: runs.ensure_run_dir(tmp / "afile" / "run"), [str(tmp / "afile" / "run"), "--out"]


def missing_adapter_folder(tmp: Path) -> Case:
    config = smoke_config(tmp)
    return lambda: checkpoints.load_adapter_model(config, tmp / "run" / "adapter"), [
        str(tmp / "run" / "adapter"), "adapter_config.json"]


def missing_adapter_folder_merge(tmp: Path) -> Case:
    return lambda: checkpoints.check_adapter_dir(tmp / "run" / "adapter"), [str(tmp / "run" / "adapter"), "03_qlora_train"]


def pickle_only_adapter(tmp: Path) -> Case:
    folder = tmp / "adapter"
    write(folder / "adapter_config.json", json.dumps({"peft_type": "LORA", "r": 8}))
    write(folder / "adapter_model.bin", b"\x80\x04pickle")
    config = smoke_config(tmp)
    return lambda: checkpoints.load_adapter_model(config, folder), [str(folder), "adapter_model.safetensors"]


def tiny_config_folder(tmp: Path) -> Path:
    folder = tmp / "blip"
    model.tiny_blip_config(100, hidden_size=16, num_layers=1, num_heads=2).save_pretrained(folder)
    return folder


def corrupt_safetensors(tmp: Path) -> Case:
    folder = tiny_config_folder(tmp)
    write(folder / "model.safetensors", b"\x00\x01garbage" * 16)
    config = smoke_config(tmp, load_in_4bit=False)
    return lambda: model.load_base_model(config, model_path=folder), [f"'{folder}'", "safetensors"]


def pickle_only_model_weights(tmp: Path) -> Case:
    folder = tiny_config_folder(tmp)
    write(folder / "pytorch_model.bin", b"\x80\x04pickle")
    config = smoke_config(tmp, load_in_4bit=False)
    return lambda: model.load_base_model(config, model_path=folder), [f"'{folder}'", "model.safetensors"]


def model_folder_without_config(tmp: Path) -> Case:
    (tmp / "weights_only").mkdir()
    config = smoke_config(tmp)
    return lambda: model.load_base_model(config, model_path=tmp / "weights_only"), ["weights_only", "config.json"]


# --------------------------------------------------------------------------------------- the table
BAD_INPUTS = [
    pytest.param(zero_byte_png, ImageLoadError, id="zero-byte-png"),
    pytest.param(truncated_png, ImageLoadError, id="truncated-png"),
    pytest.param(truncated_png_full_decode, ImageLoadError, id="truncated-png-full-decode"),
    pytest.param(text_file_named_png, ImageLoadError, id="text-file-named-png"),
    pytest.param(missing_image_file, ImageLoadError, id="missing-image-file"),
    pytest.param(png_16bit, converted, id="16-bit-png-converted"),
    pytest.param(rgba_png, converted, id="rgba-png-converted"),
    pytest.param(palette_png, converted, id="palette-png-converted"),
    pytest.param(cmyk_jpeg, converted, id="cmyk-jpeg-converted"),
    pytest.param(decompression_bomb, ImageLoadError, id="over-pixel-limit"),
    pytest.param(empty_upload, ImageLoadError, id="empty-upload"),
    pytest.param(malformed_xml, ReportParseError, id="malformed-xml"),
    pytest.param(xml_unknown_encoding, ReportParseError, id="xml-unknown-encoding"),
    pytest.param(truncated_reports_tgz, ReportParseError, id="truncated-reports-tgz"),
    pytest.param(xml_without_findings, counted("dropped_empty_target", 1), id="xml-without-findings-counted"),
    pytest.param(malformed_xml_in_reports_folder, counted("reports_malformed", 1), id="malformed-xml-in-folder-listed"),
    pytest.param(report_names_missing_images, counted("images_missing", 2), id="report-names-missing-images"),
    pytest.param(r2gen_annotation_names_missing_images, counted("images_missing", 1),
                 id="annotation-names-missing-images"),
    pytest.param(images_without_report, counted("images_without_report", 2), id="images-without-report"),
    pytest.param(unreadable_image_in_dataset, counted("skipped_images", 1), id="unreadable-image-listed"),
    pytest.param(csv_missing_columns, DataSourceError, id="csv-missing-columns"),
    pytest.param(csv_not_text, DataSourceError, id="csv-not-utf8"),
    pytest.param(r2gen_not_json, DataSourceError, id="annotation-not-json"),
    pytest.param(r2gen_entry_without_id, DataSourceError, id="annotation-entry-without-id"),
    pytest.param(missing_data_path, DataSourceError, id="missing-data-path"),
    pytest.param(empty_dataset_after_filtering, DataSourceError, id="empty-dataset-after-filtering"),
    pytest.param(lora_r_zero, ConfigError, id="lora-r-zero"),
    pytest.param(negative_learning_rate, ConfigError, id="negative-learning-rate"),
    pytest.param(unknown_target_module, ConfigError, id="unknown-lora-target-module"),
    pytest.param(unknown_setting, ConfigError, id="unknown-setting"),
    pytest.param(negative_vram_budget, ConfigError, id="negative-vram-budget"),
    pytest.param(vram_budget_smaller_than_model, errors.BudgetTooSmall, id="vram-budget-smaller-than-model"),
    pytest.param(output_folder_under_a_file, errors.RunFolderError, id="output-folder-not-writable"),
    pytest.param(missing_adapter_folder, ModelLoadError, id="missing-adapter-folder"),
    pytest.param(missing_adapter_folder_merge, errors.AdapterNotFound, id="missing-adapter-folder-merge"),
    pytest.param(pickle_only_adapter, ModelLoadError, id="pickle-only-adapter"),
    pytest.param(corrupt_safetensors, ModelLoadError, id="corrupt-safetensors"),
    pytest.param(pickle_only_model_weights, ModelLoadError, id="pickle-only-model-weights"),
    pytest.param(model_folder_without_config, ModelLoadError, id="model-folder-without-config"),
]


@pytest.mark.parametrize("make, expected", BAD_INPUTS)
def test_bad_input_gets_a_clear_answer(make: Callable[[Path], Case], expected: Any, tmp_path: Path) -> None:
    action, fragments = make(tmp_path)
    if isinstance(expected, type) and issubclass(expected, BaseException):
        with pytest.raises(expected) as caught:
            action()
        message = str(caught.value)
        assert fragments, "an error row must name what its message has to contain"
        for fragment in fragments:
            assert fragment in message, f"{fragment!r} not in the message: {message}"
        assert "Traceback" not in message
    else:
        expected(action(), fragments)


def test_the_table_covers_at_least_twenty_distinct_inputs() -> None:
    ids = [param.id for param in BAD_INPUTS]
    assert len(ids) == len(set(ids)) >= 20
    assert len({param.values[0] for param in BAD_INPUTS}) == len(ids)
