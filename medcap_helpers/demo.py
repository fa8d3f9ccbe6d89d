"""Interactive demo: upload a chest radiograph, compare captions from several captioners side by side.

:class:`CaptionDemo` shows an upload button (:class:`UploadButton`), a status line, the image beside
one caption per captioner with the seconds each took, and a note that this is not a diagnosis. Each
upload is decoded from memory with :func:`medcap_helpers.images.load_image_bytes` (never written to
disk) and captioned by every captioner. Bad input (not an image, a zero-byte or truncated file, too
many pixels, too many bytes, no file) gives a message in the status line that names the file and the
reason; it never raises, so the kernel keeps running. A captioner that raises gets an error message
in its own column. While an upload is sent and captioned the button shows a spinner and is disabled.

Uploads of any size get an answer: the front end of :class:`medcap_helpers.upload.UploadButton` never
sends a file larger than ``max_upload_bytes`` (it tells the kernel its name and size, and the kernel
answers with the too-large message), and sends the others in 1 MiB chunks, far below the 10 MiB
websocket message limit of Jupyter Server and Voilà, so no server setting has to change.

Privacy: the uploaded bytes never enter widget state (the chunks are custom messages, assembled in
memory and dropped after captioning). The small thumbnail shown in the results stays in the live
widget state until :meth:`CaptionDemo.clear` (the "Clear" button) or the kernel stops. The notebook
must therefore never save widget state: leave "Save Widget State Automatically" off in Jupyter, and
keep ``metadata.widgets`` out of the ``.ipynb`` (the pipeline executes notebooks with
``store_widget_state=False``; the notebook hygiene test checks the committed notebooks).

:func:`demo_page` is the whole demo as one widget for the Voilà page ``medcap demo`` serves
(``demo_page/demo.ipynb``, shipped with the package).

Captioners are plain callables ``PIL.Image.Image -> str``; :func:`demo_captioners` builds them from a
run's base and final NF4 models.
"""

from __future__ import annotations

import base64
import html
import io
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ipywidgets as widgets
from PIL import Image

from medcap_helpers.checkpoints import (
    is_adapter_dir,
    load_final_model,
    load_processor_from,
)
from medcap_helpers.config import MedcapConfig
from medcap_helpers.devices import device_map_for, pick_device
from medcap_helpers.errors import ImageLoadError, MedcapError
from medcap_helpers.evaluation import final_model_dir
from medcap_helpers.generation import generate_reports
from medcap_helpers.images import load_image_bytes, use_pixel_limit
from medcap_helpers.model import load_base_model
from medcap_helpers.runs import DEMO_RUN_ENV, check_finished_run
from medcap_helpers.upload import DEFAULT_MAX_UPLOAD_BYTES, UploadButton

Captioner = Callable[[Image.Image], str]

THUMBNAIL_SIZE = (256, 256)
NOT_A_DIAGNOSIS = ("Research demo, not a medical device: these captions are machine-generated text, "
                   "not a diagnosis. Do not use them for clinical decisions.")

_STATUS_COLOURS = {"info": "#555555", "busy": "#1f5f9f", "ok": "#228833", "error": "#cc3311"}


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
    return {"file_name": file_name, "captions": {}, "captioner_errors": {}, "seconds": {}, "error": None}


class CaptionDemo:
    """Upload button plus side-by-side captions from each captioner, with timings and a notice.

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
        """Text-only outcome of the last upload: file_name, captions, captioner_errors, seconds, error."""

        limits = f"PNG or JPEG, at most {_megabytes(max_upload_bytes)} and {max_pixels:,} pixels"
        self.upload = UploadButton(accept="image/*", multiple=False, description="Upload a radiograph",
                                   tooltip=f"Choose a chest radiograph to caption ({limits})",
                                   max_bytes=max_upload_bytes)
        self.clear_button = widgets.Button(description="Clear", tooltip="Forget the last image and its captions")
        self.status = widgets.HTML()
        self.results = widgets.HTML()
        self.notice = widgets.HTML(f'<p class="medcap-notice" role="note"><b>Not a diagnosis.</b> '
                                   f'{html.escape(NOT_A_DIAGNOSIS)}</p>')
        self._box = widgets.VBox([self.notice, self.upload, self.status, self.results, self.clear_button])
        self._box.add_class("medcap-demo")
        self._clearing_upload = False
        self.upload.observe(self._on_upload_change, names="value")
        self.upload.on_upload(self.handle_upload)
        self.clear_button.on_click(lambda _button: self.clear())
        self._set_status("info", f"Upload a chest radiograph ({limits}) to caption it with: "
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
        content (a memoryview; None for a file the browser did not send because it is over
        ``max_upload_bytes``) and last_modified. Returns (and stores in :attr:`last_result`) the
        text-only outcome.
        """
        try:
            return self._handle_upload(value)
        finally:
            self._clear_upload_value()
            self.upload.done()

    def _handle_upload(self, value: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not value:
            return self._fail(None, "No file was received. Choose an image file and upload it again.")
        upload = value[0]
        file_name = str(upload.get("name") or "(unnamed file)")
        note = f" Only the first of {len(value)} files was used." if len(value) > 1 else ""

        content = upload.get("content")
        try:
            n_bytes = memoryview(content).nbytes if content is not None else int(upload.get("size") or 0)
        except TypeError:
            return self._fail(file_name, f"{file_name}: the upload content is a {type(content).__name__}, not bytes.")
        if n_bytes > self.max_upload_bytes:
            return self._fail(file_name, f"{file_name} is {_megabytes(n_bytes)}; the limit is "
                                         f"{_megabytes(self.max_upload_bytes)}. Upload a smaller image.")
        if content is None:
            reason = upload.get("error") or "the upload held no file content"
            return self._fail(file_name, f"{file_name}: {reason}. Choose the file again.")
        self._set_status("busy", f"Captioning {file_name} with {', '.join(self.captioners)} …")
        try:
            image = load_image_bytes(bytes(content), file_name, self.max_pixels)
        except ImageLoadError as error:
            return self._fail(file_name, str(error))
        except Exception as error:  # a decoder bug must not take the demo down either
            return self._fail(file_name, f"{file_name} could not be read ({type(error).__name__}: {error}).")

        result = _empty_result(file_name)
        for label, captioner in self.captioners.items():
            start = time.perf_counter()
            try:
                caption = captioner(image)
            except Exception as error:
                result["captioner_errors"][label] = f"{type(error).__name__}: {error}"
                continue
            finally:
                result["seconds"][label] = time.perf_counter() - start
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
        """One table row: thumbnail, then a cell per captioner (caption or error, and its time), all escaped."""
        header = ['<th scope="col" style="text-align:left">image</th>'] if self.show_thumbnail else []
        cells = []
        if self.show_thumbnail:
            alt = html.escape(f"the uploaded image {result['file_name'] or ''}", quote=True)
            cells.append(f'<td style="vertical-align:top"><img src="{_thumbnail_data_uri(image)}" alt="{alt}"/></td>')
        for label in self.captioners:
            header.append(f'<th scope="col" style="text-align:left">{html.escape(label)}</th>')
            attribute = html.escape(label, quote=True)
            if label in result["captions"]:
                body = (f'<span class="medcap-caption" data-captioner="{attribute}">'
                        f'{html.escape(result["captions"][label]) or "<i>(empty caption)</i>"}</span>')
            else:
                error = html.escape(result["captioner_errors"].get(label, "no caption"))
                body = (f'<span class="medcap-caption-error" data-captioner="{attribute}" '
                        f'style="color:{_STATUS_COLOURS["error"]}">error: {error}</span>')
            if label in result["seconds"]:
                body += f'<br/><small class="medcap-seconds">{result["seconds"][label]:.2f} s</small>'
            cells.append(f'<td style="vertical-align:top; max-width:28em; white-space:pre-wrap">{body}</td>')
        return (f'<p><b>{html.escape(result["file_name"] or "")}</b></p>'
                f'<table class="medcap-results"><tr>{"".join(header)}</tr><tr>{"".join(cells)}</tr></table>')

    def _set_status(self, kind: str, message: str) -> None:
        self.status.value = (f'<span class="medcap-status medcap-status-{kind}" role="status" aria-live="polite" '
                             f'style="color:{_STATUS_COLOURS[kind]}">{html.escape(message)}</span>')

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
    """Functions image -> report for the demo: the base model and the final fine-tuned model 05 chose (a
    merged NF4 model, or the adapter on the 4-bit base)."""
    run = Path(config.run_dir)
    base = load_base_model(config)
    base_processor = load_processor_from(run / "adapter")
    final_dir = final_model_dir(run)
    tuned, tuned_processor = load_final_model(config, final_dir, device_map=device_map_for(pick_device(config)))
    tuned_label = "fine-tuned (adapter on 4-bit base)" if is_adapter_dir(final_dir) else "fine-tuned (NF4)"

    def captioner(model: Any, processor: Any) -> Captioner:
        def caption(image: Any) -> str:
            return generate_reports(model, processor, [image], max_new_tokens=config.max_new_tokens,
                                    num_beams=config.num_beams, batch_size=1, progress=False)[0]
        return caption

    return {"base model": captioner(base, base_processor), tuned_label: captioner(tuned, tuned_processor)}


def captions_markdown(captions: Mapping[str, str]) -> str:
    """Captions of one image by each model, one bullet per model."""
    return "\n".join(f"- **{name}**: {caption or '(empty)'}" for name, caption in captions.items())


# --- the Voilà page (``medcap demo``) -------------------------------------------------------------
def run_config(run_dir: str | os.PathLike[str]) -> MedcapConfig:
    """The saved config of a finished run, for reading it (the folder may have moved since)."""
    run = check_finished_run(run_dir)
    return MedcapConfig.load(run / "config.json").replace(run_dir=str(run))


def demo_page(run_dir: str | os.PathLike[str] | None) -> widgets.Widget:
    """The page ``medcap demo`` serves: a title, the run it shows, and the upload demo with the run's base
    and final NF4 models; or, without a finished run, a message naming the command that makes one."""
    title = widgets.HTML("<h1>medcap: caption a chest radiograph</h1>")
    if not run_dir:
        return widgets.VBox([title, _page_message(f"No run folder given: start this page with "
                                                  f"medcap demo --run RUN_DIR (${DEMO_RUN_ENV} is unset).")])
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bars on the page
    try:
        config = run_config(run_dir)
        use_pixel_limit(config.max_image_pixels)
        box = CaptionDemo(demo_captioners(config), max_pixels=config.max_image_pixels)
    except MedcapError as error:
        return widgets.VBox([title, _page_message(str(error))])
    run_name = (f'<code title="{html.escape(config.run_dir, quote=True)}">'
                f"{html.escape(Path(config.run_dir).name)}</code>")
    about = widgets.HTML(
        f"<p>Run {run_name} (profile <code>{html.escape(config.profile)}</code>, "
        f"model <code>{html.escape(str(config.model_name))}</code>). The base model and the fine-tuned NF4 model "
        "caption each upload side by side; the time under each caption is how long it took.</p>"
        + ("<p><b>Smoke run:</b> a tiny model trained on placeholder images; its captions say nothing about "
           "model quality.</p>" if config.is_smoke else ""))
    return widgets.VBox([title, about, box.widget])


def show_page() -> None:
    """Display :func:`demo_page` for the run in ``$MEDCAP_DEMO_RUN`` (the page notebook's one cell)."""
    from IPython.display import display

    display(demo_page(os.environ.get(DEMO_RUN_ENV)))


def _page_message(message: str) -> widgets.HTML:
    return widgets.HTML(f'<p class="medcap-page-message" role="alert" style="color:{_STATUS_COLOURS["error"]}">'
                        f"{html.escape(message)}</p>")
