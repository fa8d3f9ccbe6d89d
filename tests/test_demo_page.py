"""``medcap demo`` and its page, and the upload button's protocol, without a browser (see test_browser.py)."""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest
from PIL import Image

from medcap_helpers import cli, demo, runs
from medcap_helpers.config import STAGES, MedcapConfig
from medcap_helpers.demo import CaptionDemo, check_finished_run, demo_page
from medcap_helpers.upload import CHUNK_BYTES, UploadButton


def png_bytes(width: int = 12, height: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 100).save(buffer, format="PNG")
    return buffer.getvalue()


def size_caption(image: Image.Image) -> str:
    return f"{image.width}x{image.height}"


class FrontEnd:
    """Sends what the upload button's JavaScript sends: too_large, or start / chunk... / end."""

    def __init__(self, button: UploadButton) -> None:
        self.button = button
        self.done = 0
        button.send = lambda content, buffers=None: setattr(self, "done", self.done + (content == {"event": "done"}))

    def upload(self, name: str, data: bytes, chunk: int = CHUNK_BYTES) -> None:
        meta = {"id": 1, "name": name, "type": "image/png", "size": len(data), "last_modified": 0}
        if len(data) > self.button.max_bytes:
            self.button._on_front_end_message(self.button, {"event": "too_large", **meta}, [])
            return
        self.button._on_front_end_message(self.button, {"event": "start", **meta}, [])
        for offset in range(0, len(data), chunk):
            self.button._on_front_end_message(self.button, {"event": "chunk", "id": 1, "offset": offset},
                                              [memoryview(data[offset: offset + chunk])])
        self.button._on_front_end_message(self.button, {"event": "end", "id": 1}, [])


def test_chunked_upload_is_assembled_captioned_and_timed() -> None:
    box = CaptionDemo({"base": size_caption, "tuned": size_caption}, max_pixels=10_000)
    front = FrontEnd(box.upload)
    front.upload("chest.png", png_bytes(12, 8), chunk=7)
    assert box.last_result["captions"] == {"base": "12x8", "tuned": "12x8"}
    seconds = box.last_result["seconds"]
    assert set(seconds) == {"base", "tuned"} and all(s >= 0 for s in seconds.values())
    assert box.results.value.count('class="medcap-seconds"') == 2
    assert front.done == 1 and box.upload.value == ()  # the button is ready again; no bytes in widget state


def test_a_file_over_the_byte_limit_is_never_sent_and_still_answered() -> None:
    box = CaptionDemo({"base": size_caption}, max_pixels=10_000, max_upload_bytes=100)
    assert box.upload.max_bytes == 100  # the front end refuses bigger files before sending a byte
    front = FrontEnd(box.upload)
    front.upload("heavy.png", b"x" * 5_000_000)
    assert box.last_result["error"] == "heavy.png is 4.8 MB; the limit is 0.0 MB. Upload a smaller image."
    assert front.done == 1
    front.upload("chest.png", png_bytes())  # and the next upload works
    assert box.last_result["captions"] == {"base": "12x8"} and front.done == 2


def test_chunks_beyond_the_limit_are_dropped() -> None:
    """A front end that ignores max_bytes cannot make the kernel hold more than the limit."""
    box = CaptionDemo({"base": size_caption}, max_pixels=10_000, max_upload_bytes=64)
    button = box.upload
    button._on_front_end_message(button, {"event": "start", "id": 7, "name": "sneaky.png", "size": 10}, [])
    button._on_front_end_message(button, {"event": "chunk", "id": 7, "offset": 0}, [memoryview(b"y" * 200)])
    assert "sneaky.png is 0.0 MB; the limit is 0.0 MB" in box.last_result["error"]
    assert button._incoming is None


def test_one_pixel_limit_and_one_message_for_uploads() -> None:
    buffer = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(buffer, format="PNG")  # 144 M pixels: over Pillow's 2x guard too
    box = CaptionDemo({"base": size_caption}, max_pixels=50_000_000)
    FrontEnd(box.upload).upload("huge.png", buffer.getvalue())
    assert box.last_result["error"] == ("huge.png: 12000x12000 = 144,000,000 pixels is more than the limit of "
                                        "50,000,000 pixels (max_image_pixels); downscale the image or raise the limit.")


def test_controls_are_labelled_and_the_notice_says_not_a_diagnosis() -> None:
    box = CaptionDemo({"base": size_caption}, max_pixels=10_000)
    assert box.upload.description == "Upload a radiograph"
    assert "chest radiograph" in box.upload.tooltip and "20.0 MB" in box.upload.tooltip
    assert box.clear_button.tooltip and box.clear_button.description == "Clear"
    assert "not a diagnosis" in box.notice.value and box.notice in box.widget.children
    assert 'role="status"' in box.status.value


# --- the page and the command ---------------------------------------------------------------------
def finished_run(folder: Path, done: tuple[str, ...] = STAGES) -> Path:
    runs.write_run_header(MedcapConfig.from_profile("smoke", run_dir=str(folder)))
    for stage in done:
        runs.mark_done(folder, stage)
    return folder


def test_without_a_finished_run_the_page_and_the_command_name_the_command(tmp_path: Path, capsys: Any) -> None:
    missing = tmp_path / "nothing"
    with pytest.raises(runs.StageNotRun, match=f"No medcap run in '{missing}'.*medcap run --profile smoke --out"):
        check_finished_run(missing)
    partial = finished_run(tmp_path / "partial", STAGES[:3])
    with pytest.raises(runs.StageNotRun, match=f"04_sweep, 05_merge_requant, 06_eval_and_demo not done.*"
                                               f"medcap run --profile smoke --out {partial}"):
        check_finished_run(partial)

    page = demo_page(partial)
    assert "medcap run --profile smoke --out" in page.children[-1].value
    assert "medcap demo --run RUN_DIR" in demo_page(None).children[-1].value

    assert cli.main(["demo", "--run", str(missing), "--no-browser"]) == 2
    assert "medcap run --profile smoke --out" in capsys.readouterr().err


def test_the_demo_command_serves_the_page_on_localhost(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = finished_run(tmp_path / "run")
    called: dict[str, Any] = {}
    monkeypatch.setattr(cli.subprocess, "call", lambda command, env: called.update(command=command, env=env) or 0)
    assert cli.main(["demo", "--run", str(run), "--port", "9123", "--no-browser"]) == 0
    command = called["command"]
    assert command[:3] == [sys.executable, "-m", "voila"] and command[3] == str(runs.DEMO_PAGE_NOTEBOOK)
    assert "--port=9123" in command and "--Voila.ip=127.0.0.1" in command and "--no-browser" in command
    assert "--strip_sources=True" in command  # no code on the page
    assert called["env"][demo.DEMO_RUN_ENV] == str(run.resolve())
    args = cli.make_parser().parse_args(["demo"])
    assert (args.host, args.port, args.run) == ("127.0.0.1", cli.DEFAULT_DEMO_PORT, "runs/smoke")


def test_the_page_notebook_ships_clean_and_only_calls_the_library() -> None:
    assert runs.DEMO_PAGE_NOTEBOOK.is_file()
    book = nbformat.read(runs.DEMO_PAGE_NOTEBOOK, as_version=4)
    code = [cell for cell in book.cells if cell.cell_type == "code"]
    assert len(code) == 1 and "demo.show_page()" in code[0].source
    assert not code[0].outputs and code[0].execution_count is None and "widgets" not in book.metadata
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert "demo_page/*.ipynb" in pyproject, "the page must ship as package data"
