"""CaptionDemo: uploads go through the FileUpload widget's state, as they do from a browser."""

from __future__ import annotations

import datetime as dt
import html
import io
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from medcap_helpers.data import load_saved_dataset
from medcap_helpers.demo import CaptionDemo, demo_captioners

MAX_PIXELS = 10_000


def png_bytes(width: int = 12, height: int = 8, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), color=128).save(buffer, format="PNG")
    return buffer.getvalue()


def upload_entry(name: str, data: bytes, mime: str = "image/png") -> dict[str, Any]:
    return {"name": name, "type": mime, "size": len(data), "content": memoryview(data), "last_modified": 0}


def describe_size(image: Image.Image) -> str:
    return f"{image.width}x{image.height} {image.mode}"


def constant_report(image: Image.Image) -> str:
    return "No acute cardiopulmonary abnormality."


@pytest.fixture
def calls() -> list[str]:
    return []


@pytest.fixture
def demo(calls: list[str]) -> CaptionDemo:
    def base(image: Image.Image) -> str:
        calls.append("base")
        return describe_size(image)

    def fine_tuned(image: Image.Image) -> str:
        calls.append("fine-tuned")
        return constant_report(image)

    return CaptionDemo({"base": base, "fine-tuned": fine_tuned}, max_pixels=MAX_PIXELS)


def browser_upload(demo: CaptionDemo, *entries: dict[str, Any]) -> None:
    """Deliver an upload the way the front end does: through set_state, which fires the observer."""
    demo.upload.set_state({"value": list(entries)})


def test_png_upload_is_captioned_by_every_captioner(demo: CaptionDemo) -> None:
    browser_upload(demo, upload_entry("chest.png", png_bytes(12, 8)))

    assert demo.last_result["file_name"] == "chest.png"
    assert demo.last_result["error"] is None
    assert demo.last_result["captions"] == {"base": "12x8 RGB",
                                            "fine-tuned": "No acute cardiopulmonary abnormality."}
    assert demo.last_result["captioner_errors"] == {}
    for text in ("chest.png", "12x8 RGB", "No acute cardiopulmonary abnormality.", "base", "fine-tuned",
                 "data:image/png;base64,"):
        assert text in demo.results.value
    assert "chest.png" in demo.status.value


def test_direct_value_assignment_fires_the_observer(demo: CaptionDemo) -> None:
    # kernel-side values hold last_modified as a datetime (set_state converts the browser's milliseconds)
    entry = {**upload_entry("direct.png", png_bytes()), "last_modified": dt.datetime.now(dt.UTC)}
    demo.upload.value = (entry,)
    assert demo.last_result["captions"]["base"] == "12x8 RGB"


def test_upload_value_is_cleared_after_success_and_after_failure(demo: CaptionDemo) -> None:
    browser_upload(demo, upload_entry("chest.png", png_bytes()))
    assert demo.upload.value == ()
    # clearing the value must not itself count as an (empty) upload
    assert demo.last_result["error"] is None and demo.last_result["captions"]

    browser_upload(demo, upload_entry("notes.txt", b"not an image", "text/plain"))
    assert demo.upload.value == ()


def test_non_image_gives_a_message_naming_the_file(demo: CaptionDemo, calls: list[str]) -> None:
    browser_upload(demo, upload_entry("notes.txt", b"patient notes, not an image\n", "text/plain"))

    error = demo.last_result["error"]
    assert error and "notes.txt" in error
    assert "notes.txt" in demo.status.value
    assert demo.last_result["captions"] == {}
    assert demo.results.value == ""
    assert calls == []


def test_truncated_png_is_rejected(demo: CaptionDemo, calls: list[str]) -> None:
    data = png_bytes(64, 64, "RGB")
    browser_upload(demo, upload_entry("cut.png", data[: len(data) // 2]))

    assert demo.last_result["error"] and "cut.png" in demo.last_result["error"]
    assert calls == []


def test_zero_byte_file_is_rejected(demo: CaptionDemo, calls: list[str]) -> None:
    browser_upload(demo, upload_entry("empty.png", b""))

    assert demo.last_result["error"] and "empty.png" in demo.last_result["error"]
    assert calls == []


def test_image_over_the_pixel_limit_is_rejected(calls: list[str]) -> None:
    def never(image: Image.Image) -> str:
        calls.append("never")
        return ""

    demo = CaptionDemo({"base": never}, max_pixels=100)
    browser_upload(demo, upload_entry("big.png", png_bytes(20, 20)))

    error = demo.last_result["error"]
    assert error and "big.png" in error
    assert "pixel" in error.lower()
    assert calls == []
    assert demo.upload.value == ()


def test_upload_over_the_byte_limit_is_rejected_before_decoding(calls: list[str]) -> None:
    demo = CaptionDemo({"base": describe_size}, max_pixels=MAX_PIXELS, max_upload_bytes=10)
    browser_upload(demo, upload_entry("heavy.png", png_bytes()))

    error = demo.last_result["error"]
    assert error and "heavy.png" in error and "limit" in error


def test_empty_upload_gives_a_message(demo: CaptionDemo) -> None:
    result = demo.handle_upload(())

    assert result["error"] and "No file" in result["error"]
    assert demo.last_result is result


def test_only_the_first_of_several_files_is_used(demo: CaptionDemo) -> None:
    browser_upload(demo, upload_entry("first.png", png_bytes(3, 4)), upload_entry("second.png", png_bytes(5, 6)))

    assert demo.last_result["file_name"] == "first.png"
    assert demo.last_result["captions"]["base"] == "3x4 RGB"
    assert "first of 2 files" in demo.status.value


def test_a_failing_captioner_shows_an_error_for_that_captioner_only() -> None:
    def broken(image: Image.Image) -> str:
        raise RuntimeError("CUDA out of memory")

    demo = CaptionDemo({"base": describe_size, "fine-tuned": broken}, max_pixels=MAX_PIXELS)
    browser_upload(demo, upload_entry("chest.png", png_bytes()))

    assert demo.last_result["error"] is None
    assert demo.last_result["captions"] == {"base": "12x8 RGB"}
    assert "CUDA out of memory" in demo.last_result["captioner_errors"]["fine-tuned"]
    assert "CUDA out of memory" in demo.results.value
    assert "fine-tuned" in demo.status.value
    assert demo.upload.value == ()


def test_file_names_and_captions_are_html_escaped() -> None:
    demo = CaptionDemo({"base": lambda image: "<script>alert(1)</script> & more"}, max_pixels=MAX_PIXELS)
    browser_upload(demo, upload_entry('<img src=x onerror="alert(2)">.png', png_bytes()))

    shown = demo.results.value + demo.status.value
    assert "<script>" not in shown and "&lt;script&gt;" in shown
    assert "<img src=x" not in shown and "&lt;img src=x" in shown
    assert demo.last_result["captions"]["base"] == "<script>alert(1)</script> & more"

    browser_upload(demo, upload_entry("<b>bad</b>.txt", b"nope", "text/plain"))
    assert "<b>bad" not in demo.status.value and "&lt;b&gt;bad" in demo.status.value


def test_caption_image_for_non_interactive_use(demo: CaptionDemo) -> None:
    image = Image.new("RGB", (7, 5))
    assert demo.caption_image(image) == {"base": "7x5 RGB", "fine-tuned": "No acute cardiopulmonary abnormality."}


def test_widget_layout_and_upload_settings(demo: CaptionDemo) -> None:
    box = demo.widget
    assert demo.upload in box.children and demo.status in box.children and demo.results in box.children
    assert demo.upload.accept == "image/*" and demo.upload.multiple is False


def test_clear_forgets_the_last_result(demo: CaptionDemo) -> None:
    browser_upload(demo, upload_entry("chest.png", png_bytes()))
    demo.clear()
    assert demo.results.value == "" and demo.last_result["file_name"] is None


@pytest.mark.parametrize("kwargs", [{"captioners": {}}, {"max_pixels": 0}, {"max_upload_bytes": -1},
                                    {"captioners": {"base": "not callable"}}])
def test_bad_construction_arguments_raise(kwargs: dict[str, Any]) -> None:
    arguments: dict[str, Any] = {"captioners": {"base": describe_size}, "max_pixels": MAX_PIXELS, **kwargs}
    with pytest.raises((ValueError, TypeError)):
        CaptionDemo(**arguments)


# --- the real captioners of a finished run ------------------------------------------------------
@pytest.mark.slow
def test_demo_captions_an_upload_with_the_runs_base_and_final_models(smoke_run: dict) -> None:
    """demo_captioners loads the base model and 05's final model (merged NF4 or the adapter); an upload of a
    test image through the widget gets a caption from each, the same reports 06 recorded for that image."""
    from datasets import Image as ImageFeature

    from medcap_helpers.evaluation import ADAPTER_SYSTEM, final_system

    config = smoke_run["config"]
    final = final_system(config.run_dir)
    tuned = "fine-tuned (adapter on 4-bit base)" if final == ADAPTER_SYSTEM else "fine-tuned (NF4)"
    captioners = demo_captioners(config)
    assert list(captioners) == ["base model", tuned]
    box = CaptionDemo(captioners, max_pixels=config.max_image_pixels)

    test = load_saved_dataset(config.run_dir)[0]["test"].with_format(None)
    stored = test.cast_column("image", ImageFeature(decode=False))[0]["image"]
    data = stored["bytes"] or Path(stored["path"]).read_bytes()
    assert data.startswith(b"\x89PNG")
    browser_upload(box, upload_entry("chest.png", data))

    result = box.last_result
    assert result["error"] is None and result["captioner_errors"] == {}
    assert set(result["captions"]) == {"base model", tuned}
    for label, caption in result["captions"].items():
        assert isinstance(caption, str) and caption.strip(), label
        assert html.escape(caption) in box.results.value, label
    assert box.upload.value == ()

    # The same models as the test table: the captions are 06's recorded reports for this image.
    recorded = json.loads((Path(config.run_dir) / "predictions" / "test.json").read_text())
    assert recorded["image_id"][0] == test[0]["image_id"]
    assert result["captions"]["base model"] == recorded["systems"]["zero-shot base"][0]
    assert result["captions"][tuned] == recorded["systems"][final][0]
