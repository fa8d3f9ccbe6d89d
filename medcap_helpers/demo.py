"""Interactive demo: upload a chest radiograph, compare captions from several captioners side by side.

:class:`CaptionDemo` wraps an ipywidgets 8 ``FileUpload``. Each upload is decoded from memory with
:func:`medcap_helpers.images.load_image_bytes` (never written to disk), captioned by every captioner,
and shown as a thumbnail next to one caption per captioner. Bad input (not an image, a zero-byte or
truncated file, too many pixels, too many bytes, no file) gives a message in the status line that
names the file and the reason; it never raises, so the kernel keeps running. A captioner that
raises gets an error message in its own column.

Privacy: after each upload the widget's ``value`` is cleared (``upload.value = ()``), so the
uploaded bytes are not kept in widget state. The small thumbnail shown in the results stays in the
live widget state until :meth:`CaptionDemo.clear` is called or the kernel stops. The notebook must
therefore never save widget state: leave "Save Widget State Automatically" off in Jupyter, and keep
``metadata.widgets`` out of the ``.ipynb`` (papermill and nbconvert do not write it by default; the
notebook hygiene test checks that the metadata holds no widget state).

This module does not import torch: captioners are plain callables ``PIL.Image.Image -> str`` that
the notebook builds from the base and fine-tuned models.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ipywidgets as widgets
from PIL import Image

from medcap_helpers.checkpoints import load_captioner, load_processor_from
from medcap_helpers.config import MedcapConfig
from medcap_helpers.devices import device_map_for, pick_device
from medcap_helpers.errors import ImageLoadError
from medcap_helpers.evaluation import final_model_dir
from medcap_helpers.generation import generate_reports
from medcap_helpers.images import load_image_bytes
from medcap_helpers.model import load_base_model

Captioner = Callable[[Image.Image], str]

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
THUMBNAIL_SIZE = (256, 256)

_STATUS_COLOURS = {"info": "#555555", "ok": "#228833", "error": "#cc3311"}


def _megabytes(n_bytes: int) -> str:
    return f"{n_bytes / (1024 * 1024):.1f} MB"


def _thumbnail_data_uri(image: Image.Image) -> str:
    """A small PNG of ``image`` as a ``data:`` URI, built in memory."""
    thumbnail = image.copy()
    thumbnail.thumbnail(THUMBNAIL_SIZE)
    buffer = io.BytesIO()
    thumbnail.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _empty_result(file_name: str | None = None) -> dict[str, Any]:
    return {"file_name": file_name, "captions": {}, "captioner_errors": {}, "error": None}


class CaptionDemo:
    """Upload widget plus side-by-side captions from each captioner.

    ``captioners`` maps a label (e.g. ``"base"``, ``"fine-tuned"``) to a callable that turns an
    8-bit RGB image into a caption. ``max_pixels`` bounds the decoded image size and
    ``max_upload_bytes`` the raw upload size. Display :attr:`widget`; read :attr:`last_result`.
    """

    def __init__(self, captioners: Mapping[str, Captioner], max_pixels: int,
                 max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, show_thumbnail: bool = True) -> None:
        if not captioners:
            raise ValueError("captioners is empty: give at least one, e.g. {'fine-tuned': caption_fn}")
        for label, captioner in captioners.items():
            if not callable(captioner):
                raise TypeError(f"captioner {label!r} is a {type(captioner).__name__}, not a callable")
        for field, limit in (("max_pixels", max_pixels), ("max_upload_bytes", max_upload_bytes)):
            if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
                raise ValueError(f"{field} must be a positive int, got {limit!r}")
        self.captioners: dict[str, Captioner] = dict(captioners)
        self.max_pixels = max_pixels
        self.max_upload_bytes = max_upload_bytes
        self.show_thumbnail = show_thumbnail
        self.last_result: dict[str, Any] = _empty_result()
        """Text-only outcome of the last upload: file_name, captions, captioner_errors, error."""

        self.upload = widgets.FileUpload(accept="image/*", multiple=False, description="Upload X-ray")
        self.status = widgets.HTML()
        self.results = widgets.HTML()
        self._box = widgets.VBox([self.upload, self.status, self.results])
        self._clearing_upload = False
        self.upload.observe(self._on_upload_change, names="value")
        self._set_status("info", f"Upload a chest radiograph (at most {_megabytes(max_upload_bytes)}, "
                                 f"{max_pixels:,} pixels) to caption it with: "
                                 + ", ".join(self.captioners) + ".")

    @property
    def widget(self) -> widgets.VBox:
        """The top-level box to pass to ``display()``."""
        return self._box

    def caption_image(self, image: Image.Image) -> dict[str, str]:
        """Caption ``image`` with every captioner, for non-interactive use; a captioner's error propagates."""
        return {label: captioner(image) for label, captioner in self.captioners.items()}

    def clear(self) -> None:
        """Forget the last upload: empty the results, status and :attr:`last_result`."""
        self._clear_upload_value()
        self.results.value = ""
        self.last_result = _empty_result()
        self._set_status("info", "Cleared.")

    def handle_upload(self, value: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Decode the first uploaded file, caption it and show the outcome; never raises for bad input.

        ``value`` is a ``FileUpload.value``: a sequence of dicts with keys name, type, size,
        content (a memoryview) and last_modified. Returns (and stores in :attr:`last_result`) the
        text-only outcome.
        """
        try:
            return self._handle_upload(value)
        finally:
            self._clear_upload_value()

    def _handle_upload(self, value: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not value:
            return self._fail(None, "No file was received. Choose an image file and upload it again.")
        upload = value[0]
        file_name = str(upload.get("name") or "(unnamed file)")
        note = f" Only the first of {len(value)} files was used." if len(value) > 1 else ""

        content = upload.get("content")
        if content is None:
            return self._fail(file_name, f"{file_name}: the upload held no file content.")
        try:
            n_bytes = memoryview(content).nbytes
        except TypeError:
            return self._fail(file_name, f"{file_name}: the upload content is a {type(content).__name__}, not bytes.")
        if n_bytes > self.max_upload_bytes:
            return self._fail(file_name, f"{file_name} is {_megabytes(n_bytes)}; the limit is "
                                         f"{_megabytes(self.max_upload_bytes)}. Upload a smaller image.")
        try:
            image = load_image_bytes(bytes(content), file_name, self.max_pixels)
        except ImageLoadError as error:
            return self._fail(file_name, str(error))
        except Exception as error:  # a decoder bug must not take the demo down either
            return self._fail(file_name, f"{file_name} could not be read ({type(error).__name__}: {error}).")

        result = _empty_result(file_name)
        for label, captioner in self.captioners.items():
            try:
                caption = captioner(image)
            except Exception as error:
                result["captioner_errors"][label] = f"{type(error).__name__}: {error}"
                continue
            if not isinstance(caption, str):
                result["captioner_errors"][label] = f"returned a {type(caption).__name__}, not a str"
                continue
            result["captions"][label] = caption

        self.last_result = result
        self.results.value = self._results_html(result, image)
        size = f"{image.width}×{image.height}"
        if result["captioner_errors"]:
            failed = ", ".join(result["captioner_errors"])
            self._set_status("error", f"Captioned {file_name} ({size}); failed: {failed}.{note}")
        else:
            self._set_status("ok", f"Captioned {file_name} ({size}).{note}")
        return result

    def _fail(self, file_name: str | None, message: str) -> dict[str, Any]:
        self.last_result = _empty_result(file_name)
        self.last_result["error"] = message
        self.results.value = ""
        self._set_status("error", message)
        return self.last_result

    def _results_html(self, result: Mapping[str, Any], image: Image.Image) -> str:
        """One table row: thumbnail, then a cell per captioner (caption or error), all escaped."""
        header = ['<th style="text-align:left">image</th>'] if self.show_thumbnail else []
        cells = []
        if self.show_thumbnail:
            alt = html.escape(result["file_name"] or "", quote=True)
            cells.append(f'<td style="vertical-align:top"><img src="{_thumbnail_data_uri(image)}" alt="{alt}"/></td>')
        for label in self.captioners:
            header.append(f'<th style="text-align:left">{html.escape(label)}</th>')
            if label in result["captions"]:
                body = html.escape(result["captions"][label]) or "<i>(empty caption)</i>"
            else:
                error = html.escape(result["captioner_errors"].get(label, "no caption"))
                body = f'<span style="color:{_STATUS_COLOURS["error"]}">error: {error}</span>'
            cells.append(f'<td style="vertical-align:top; max-width:28em; white-space:pre-wrap">{body}</td>')
        return (f'<p><b>{html.escape(result["file_name"] or "")}</b></p>'
                f'<table><tr>{"".join(header)}</tr><tr>{"".join(cells)}</tr></table>')

    def _set_status(self, kind: str, message: str) -> None:
        self.status.value = f'<span style="color:{_STATUS_COLOURS[kind]}">{html.escape(message)}</span>'

    def _clear_upload_value(self) -> None:
        """Drop the uploaded bytes from widget state without triggering another round of handling."""
        if not self.upload.value:
            return
        self._clearing_upload = True
        try:
            self.upload.value = ()
        finally:
            self._clearing_upload = False

    def _on_upload_change(self, change: Mapping[str, Any]) -> None:
        if self._clearing_upload:
            return
        self.handle_upload(change["new"])


def demo_captioners(config: MedcapConfig) -> dict[str, Captioner]:
    """Functions image -> report for the demo: the base model and the final fine-tuned NF4 model."""
    run = Path(config.run_dir)
    base = load_base_model(config)
    base_processor = load_processor_from(run / "adapter")
    tuned, tuned_processor = load_captioner(final_model_dir(run), device_map=device_map_for(pick_device(config)))

    def captioner(model: Any, processor: Any) -> Captioner:
        def caption(image: Any) -> str:
            return generate_reports(model, processor, [image], max_new_tokens=config.max_new_tokens,
                                    num_beams=config.num_beams, batch_size=1, progress=False)[0]
        return caption

    return {"base model": captioner(base, base_processor), "fine-tuned (NF4)": captioner(tuned, tuned_processor)}
