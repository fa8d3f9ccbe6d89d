"""The upload button of the demo: :class:`ipywidgets.FileUpload`'s kernel API, a front end of its own.

The stock FileUpload sends a whole file in one websocket message. Jupyter Server and Voilà close the
connection on a message over 10 MiB (tornado's default ``websocket_max_message_size``) without a word,
and later uploads do nothing. :class:`UploadButton`'s front end (an anywidget ES module, no build step)
instead

* refuses a file over ``max_bytes`` in the browser: no byte is sent, the kernel gets its name and size
  and answers with a message;
* sends the others in chunks of :data:`CHUNK_BYTES` as custom messages, which the kernel assembles in
  memory (never in widget state, never on disk);
* is a labelled ``<button>`` (text, ``title`` and ``aria-label``; Tab and Enter work) that shows a
  spinner and is disabled, with ``aria-busy``, from the moment a file is chosen until the kernel calls
  :meth:`UploadButton.done`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import anywidget
import ipywidgets as widgets
import traitlets

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
CHUNK_BYTES = 1024 * 1024
"""Size of the pieces an upload travels in, far below the servers' 10 MiB websocket message limit."""

_UPLOAD_ESM = """
function render({ model, el }) {
  const input = document.createElement("input");
  input.type = "file";
  input.hidden = true;
  input.tabIndex = -1;
  const button = document.createElement("button");
  button.type = "button";
  button.className = "medcap-upload-button jupyter-widgets jupyter-button widget-button";
  const spinner = document.createElement("span");
  spinner.className = "medcap-spinner";
  spinner.setAttribute("aria-hidden", "true");
  const label = document.createElement("span");
  button.append(spinner, label);
  el.classList.add("medcap-upload");
  el.append(button, input);
  let busy = false;
  let serial = 0;

  function update() {
    input.accept = model.get("accept");
    input.multiple = model.get("multiple");
    label.textContent = busy ? model.get("busy_description") : model.get("description");
    const tip = model.get("tooltip") || model.get("description");
    button.title = tip;
    button.setAttribute("aria-label", busy ? model.get("busy_description") : tip);
    button.disabled = busy || model.get("disabled");
    el.setAttribute("aria-busy", busy ? "true" : "false");
    spinner.hidden = !busy;
  }
  function setBusy(value) { busy = value; update(); }

  async function upload(file) {
    const id = ++serial;
    const meta = { id, name: file.name, type: file.type, size: file.size, last_modified: file.lastModified };
    if (file.size > model.get("max_bytes")) {      // never sent: the kernel answers with the message
      model.send({ event: "too_large", ...meta });
      return;
    }
    try {
      model.send({ event: "start", ...meta });
      const chunk = model.get("chunk_bytes");
      for (let offset = 0; offset < file.size; offset += chunk) {
        const buffer = await file.slice(offset, offset + chunk).arrayBuffer();
        model.send({ event: "chunk", id, offset }, undefined, [buffer]);
      }
      model.send({ event: "end", id });
    } catch (error) {
      model.send({ event: "unreadable", ...meta, reason: String(error) });
    }
  }

  button.addEventListener("click", () => { if (!button.disabled) input.click(); });
  input.addEventListener("change", () => {
    const files = Array.from(input.files || []);
    input.value = "";
    if (!files.length) return;
    setBusy(true);
    upload(files[0]);
  });
  model.on("msg:custom", (message) => {
    if (message && message.event === "done") {
      const hadFocus = document.activeElement === button || document.activeElement === document.body;
      setBusy(false);
      if (hadFocus) button.focus();
    }
  });
  for (const name of ["description", "tooltip", "disabled", "accept", "multiple", "busy_description"]) {
    model.on(`change:${name}`, update);
  }
  update();
}
export default { render };
"""

_UPLOAD_CSS = """
.medcap-upload-button { display: inline-flex; align-items: center; gap: 0.5em; width: auto;
  padding: 0 1em; min-height: 2.2em; }
.medcap-upload-button:focus-visible { outline: 3px solid #1f5f9f; outline-offset: 2px; }
.medcap-spinner { width: 0.9em; height: 0.9em; border: 2px solid currentColor; border-right-color: transparent;
  border-radius: 50%; animation: medcap-spin 0.8s linear infinite; }
.medcap-spinner[hidden] { display: none; }
@keyframes medcap-spin { to { transform: rotate(360deg); } }
@media (prefers-reduced-motion: reduce) { .medcap-spinner { animation: none; } }
"""


class UploadButton(anywidget.AnyWidget, widgets.FileUpload):
    """A :class:`ipywidgets.FileUpload` (same kernel API: ``value``, ``accept``, ``multiple``) whose
    front end is a labelled, keyboard-usable button with a busy spinner, that never sends a file over
    ``max_bytes`` and sends the others in chunks (see the module docstring).

    The kernel hands each finished upload to the handlers of :meth:`on_upload` as a FileUpload-style
    list of one entry (name, type, size, content, last_modified); a file over ``max_bytes`` arrives
    with ``content=None`` and its size. Call :meth:`done` after handling one: the button is ready again.
    """

    _esm = _UPLOAD_ESM
    _css = _UPLOAD_CSS
    max_bytes = traitlets.Int(DEFAULT_MAX_UPLOAD_BYTES).tag(sync=True)
    chunk_bytes = traitlets.Int(CHUNK_BYTES).tag(sync=True)
    busy_description = traitlets.Unicode("Captioning…").tag(sync=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._incoming: dict[str, Any] | None = None
        self._handlers: list[Callable[[list[dict[str, Any]]], Any]] = []
        self.on_msg(self._on_front_end_message)

    def on_upload(self, handler: Callable[[list[dict[str, Any]]], Any]) -> None:
        self._handlers.append(handler)

    def done(self) -> None:
        """Tell the front end the last upload was handled (it stops the spinner)."""
        self.send({"event": "done"})

    def _deliver(self, entry: dict[str, Any]) -> None:
        for handler in self._handlers:
            handler([entry])

    def _on_front_end_message(self, _widget: Any, content: Mapping[str, Any], buffers: Sequence[Any]) -> None:
        event = content.get("event")
        meta = {"name": str(content.get("name") or ""), "type": str(content.get("type") or ""),
                "size": int(content.get("size") or 0), "last_modified": content.get("last_modified")}
        if event == "start":
            self._incoming = {**meta, "id": content.get("id"), "parts": [], "received": 0}
        elif event == "chunk" and self._incoming and content.get("id") == self._incoming["id"] and buffers:
            part = bytes(buffers[0])
            self._incoming["received"] += len(part)
            if self._incoming["received"] > self.max_bytes:  # a front end that ignored max_bytes
                incoming, self._incoming = self._incoming, None
                self._deliver({**{k: incoming[k] for k in meta}, "size": incoming["received"], "content": None})
                return
            self._incoming["parts"].append(part)
        elif event == "end" and self._incoming and content.get("id") == self._incoming["id"]:
            incoming, self._incoming = self._incoming, None
            data = b"".join(incoming.pop("parts"))
            self._deliver({**{k: incoming[k] for k in meta}, "size": len(data), "content": memoryview(data)})
        elif event == "too_large":
            self._deliver({**meta, "content": None})
        elif event == "unreadable":
            self._deliver({**meta, "content": None, "error": f"the browser could not read the file "
                                                             f"({content.get('reason')})"})
