"""The tutorial and the demo in a real browser: JupyterLab and the Voilà page, driven by Playwright.

Playwright's Python API drives Debian's Chromium (``/usr/bin/chromium``, installed by ``.ci/run`` with
apt; never ``playwright install``). Without Chromium or Playwright the tests skip with the reason,
except under CI (``CI`` set), where they fail: CI installs both.

* JupyterLab (``--allow-root``, a free port, a token) serves a temporary copy of the notebooks; a copy
  of the session's finished smoke run sits in ``runs/smoke`` of a project root named by
  ``MEDCAP_PROJECT_ROOT``. Notebooks 01 → 06 are opened in order and run with Run → Run All Cells:
  no error output, and each one found the run folder.
* In 06 and in the page ``medcap demo`` serves: a real radiograph is uploaded through the file chooser
  and both captions appear; a text file named ``.png``, an empty file, an image over the pixel limit
  and a file over the byte limit each get their message, and the next good upload still works.
* Screenshots go to ``<pytest tmp>/screenshots`` and to ``$MEDCAP_SCREENSHOTS`` when set. Afterwards no
  uploaded bytes are on disk and no notebook holds widget state or an upload.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from medcap_helpers.config import STAGES
from medcap_helpers.pipeline import PROJECT_ROOT_ENV
from medcap_helpers.upload import DEFAULT_MAX_UPLOAD_BYTES
from tests.conftest import IU_SAMPLE, REPO_ROOT

pytestmark = pytest.mark.slow

CHROMIUM = Path(os.environ.get("MEDCAP_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage"]
CAPTIONERS = ("base model",)
FINE_TUNED_LABELS = ("fine-tuned (NF4)", "fine-tuned (adapter on 4-bit base)")
NOTEBOOK_TIMEOUT_S = 600
UPLOAD_TIMEOUT_MS = 180_000
GOOD_IMAGES = ("1000_IM-0003-1001.dcm.png", "1000_IM-0003-2001.dcm.png")


def _require_browser() -> None:
    reason = None
    if not CHROMIUM.is_file():
        reason = f"{CHROMIUM} is absent (apt-get install chromium; .ci/run does)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "playwright is not installed (pip install playwright; .ci/run does)"
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests must run in CI: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    _require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folders = [tmp_path_factory.mktemp("screenshots")]
    if os.environ.get("MEDCAP_SCREENSHOTS"):
        folders.append(Path(os.environ["MEDCAP_SCREENSHOTS"]))

    def take(page: Any, name: str, **kwargs: Any) -> None:
        first = folders[0] / f"{name}.png"
        page.screenshot(path=str(first), **kwargs)
        for folder in folders[1:]:
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(first, folder / first.name)
    take.folders = folders
    return take


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, smoke_run: dict) -> Path:
    """A project root for the browser: a copy of the notebooks and of the finished smoke run in runs/smoke."""
    root = tmp_path_factory.mktemp("project")
    shutil.copytree(REPO_ROOT / "notebooks", root / "notebooks",
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    shutil.copytree(smoke_run["dir"], root / "runs" / "smoke", symlinks=True,
                    ignore=shutil.ignore_patterns("kernel-ipc-*", ".lock*"))
    return root


@pytest.fixture(scope="module")
def uploads(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The files the tests upload: two real radiographs and four that must each get their message."""
    if not IU_SAMPLE.is_dir():
        pytest.skip(f"{IU_SAMPLE} is absent: the real IU X-Ray sample ships with the project's CI only")
    folder = tmp_path_factory.mktemp("uploads")
    files = {f"good{n}": IU_SAMPLE / "kaggle_normalized" / name for n, name in enumerate(GOOD_IMAGES)}
    (folder / "notes.png").write_text("Patient notes, not an image.\n")
    (folder / "empty.png").write_bytes(b"")
    marker = PngInfo()
    marker.add_text("probe", os.urandom(24).hex())  # something of its own to look for on disk afterwards
    Image.new("1", (12_000, 12_000)).save(folder / "huge.png", pnginfo=marker)  # 144 M pixels, a small file
    (folder / "heavy.png").write_bytes(os.urandom(DEFAULT_MAX_UPLOAD_BYTES + 1024 * 1024))
    files.update({path.stem: path for path in folder.iterdir()})
    return files


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_http(url: str, process: subprocess.Popen, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{url} did not answer in {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen) -> None:
    """Stop a server this test started (its own process group: the CLI and the Voilà it runs)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def _server(command: list[str], env: dict[str, str], log: Path, url: str, timeout_s: float = 120) -> subprocess.Popen:
    with open(log, "w") as handle:
        process = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                   start_new_session=True)
    try:
        _wait_for_http(url, process, timeout_s, log)
    except BaseException:
        _stop(process)
        raise
    return process


def _isolated_jupyter_env(folder: Path, **extra: str) -> dict[str, str]:
    """No user Jupyter config or settings: the servers run as a fresh install would."""
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(folder / "config"), "JUPYTER_RUNTIME_DIR": str(folder / "runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(folder / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(folder / "workspaces")}
    env.pop(PROJECT_ROOT_ENV, None)
    news = folder / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True, exist_ok=True)
    news.write_text('{"fetchNews": "false"}')  # no "Would you like to get notified" toast in the screenshots
    return {**env, **extra}


# --- the upload demo, the same in 06 and on the page ---------------------------------------------
def exercise_upload_demo(page: Any, scope: Any, uploads: dict[str, Path], shot: Any, name: str) -> dict[str, float]:
    """Good upload, the four bad ones (each with its message), a good one again; seconds per good upload."""
    button = scope.locator("button.medcap-upload-button")
    button.wait_for(timeout=UPLOAD_TIMEOUT_MS)
    title = button.get_attribute("title")
    assert title and title != "null" and "radiograph" in title, title
    assert "radiograph" in (button.get_attribute("aria-label") or "")
    status = scope.locator(".medcap-status")
    seconds = {}

    def upload(key: str, expected: str) -> None:
        start = time.monotonic()
        with page.expect_file_chooser() as chooser:
            button.click()
        chooser.value.set_files(str(uploads[key]))
        status.filter(has_text=expected).wait_for(timeout=UPLOAD_TIMEOUT_MS)
        scope.locator(".medcap-upload[aria-busy=false]").wait_for(timeout=UPLOAD_TIMEOUT_MS)
        assert button.is_enabled(), f"the button stays disabled after {key}"
        seconds[key] = time.monotonic() - start

    def captions_shown(file_name: str) -> None:
        results = scope.locator(".medcap-results")
        captions = results.locator(".medcap-caption")
        captions.nth(1).wait_for(timeout=UPLOAD_TIMEOUT_MS)
        labels = [captions.nth(i).get_attribute("data-captioner") for i in range(captions.count())]
        # The base model and the final model 05 chose: an NF4 merge or the adapter on its 4-bit base.
        assert labels[0] == CAPTIONERS[0] and len(labels) == 2 and labels[1] in FINE_TUNED_LABELS, labels
        for i, label in enumerate(labels):
            assert captions.nth(i).inner_text().strip(), f"no {label} caption for {file_name}"
        assert results.locator(".medcap-seconds").count() == len(labels)

    with page.expect_file_chooser() as chooser:
        button.click()
    chooser.value.set_files(str(uploads["good0"]))
    scope.locator(".medcap-upload[aria-busy=true]").wait_for(timeout=30_000)  # the busy indicator shows
    assert button.is_disabled()
    status.filter(has_text=f"Captioned {uploads['good0'].name}").wait_for(timeout=UPLOAD_TIMEOUT_MS)
    scope.locator(".medcap-upload[aria-busy=false]").wait_for(timeout=UPLOAD_TIMEOUT_MS)
    captions_shown(uploads["good0"].name)
    shot(page, f"{name}-captioned", full_page=True)

    upload("notes", "notes.png: not an image")
    upload("empty", "empty.png: the file is empty (0 bytes)")
    upload("huge", "huge.png: 12000x12000 = 144,000,000 pixels is more than the limit of 50,000,000 pixels")
    assert "89,478,485" not in status.inner_text() and "89478485" not in status.inner_text()
    shot(page, f"{name}-too-many-pixels", full_page=True)
    upload("heavy", "heavy.png is 21.0 MB; the limit is 20.0 MB")
    upload("good1", f"Captioned {uploads['good1'].name}")
    captions_shown(uploads["good1"].name)
    shot(page, f"{name}-captioned-again", full_page=True)
    return seconds


def assert_no_upload_left(folders: list[Path], uploads: dict[str, Path], notebooks: list[Path]) -> None:
    """Neither the uploaded bytes nor the file names are on disk (outside the originals) or in a notebook."""
    probes = {}
    for key in ("good0", "good1", "heavy"):
        data = uploads[key].read_bytes()
        probes[key] = data[len(data) // 2: len(data) // 2 + 64]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        probes["huge"] = Image.open(uploads["huge"]).text["probe"].encode()
    originals = {path.resolve() for path in uploads.values()}
    for folder in folders:
        for path in folder.rglob("*"):
            if not path.is_file() or path.is_symlink() or path.resolve() in originals:
                continue
            data = path.read_bytes()
            for key, probe in probes.items():
                assert probe not in data, f"the bytes of {uploads[key].name} are in {path}"
    for path in notebooks:
        text = path.read_text()
        book = json.loads(text)
        assert "widgets" not in book.get("metadata", {}), f"{path} holds widget state"
        for upload in uploads.values():
            assert upload.name not in text, f"{path} names the upload {upload.name}"
        assert "data:image/png;base64" not in text, f"{path} holds a thumbnail"


# --- JupyterLab: 01 → 06, then the upload box of 06 ----------------------------------------------
NOTEBOOK_STATE = """(path) => {
  const app = window.jupyterapp;
  if (!app) return null;
  const panel = Array.from(app.shell.widgets('main')).find((w) => w.context && w.context.path === path);
  if (!panel || !panel.content || !panel.content.model) return null;
  let pending = 0; const errors = []; const texts = [];
  for (const cell of Array.from(panel.content.model.cells)) {
    if (cell.type !== 'code') continue;
    if (cell.executionCount === null) pending += 1;
    for (const output of cell.outputs.toJSON()) {
      if (output.output_type === 'error') errors.push(`${output.ename}: ${output.evalue}`);
      if (output.text) texts.push(Array.isArray(output.text) ? output.text.join('') : output.text);
    }
  }
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  return { pending, errors, texts, kernel: kernel ? kernel.status : null };
}"""

FINISH_NOTEBOOK = """async ([path, save]) => {
  const app = window.jupyterapp;
  const panel = Array.from(app.shell.widgets('main')).find((w) => w.context && w.context.path === path);
  if (save) { await panel.context.save(); }
  await panel.sessionContext.shutdown();
  panel.context.model.dirty = false;
  panel.dispose();
}"""


def _run_all(page: Any, path: str) -> dict[str, Any]:
    """Open ``path`` in JupyterLab, Run → Run All Cells, wait until every code cell ran; its state."""
    page.evaluate("(path) => { window.jupyterapp.commands.execute('docmanager:open', {path}); }", path)
    page.wait_for_function(f"({NOTEBOOK_STATE})({json.dumps(path)})?.kernel === 'idle'", timeout=120_000)
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
    deadline = time.monotonic() + NOTEBOOK_TIMEOUT_S
    while time.monotonic() < deadline:
        state = page.evaluate(NOTEBOOK_STATE, path)
        assert not state["errors"], f"{path}: error output {state['errors']}"
        if state["pending"] == 0 and state["kernel"] == "idle":
            return state
        time.sleep(1)
    pytest.fail(f"{path} did not finish in {NOTEBOOK_TIMEOUT_S} s: {state}")


@pytest.fixture(scope="module")
def jupyterlab(project: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port, token = _free_port(), "medcap-browser-test"
    folder = tmp_path_factory.mktemp("jupyter")
    command = [sys.executable, "-m", "jupyterlab", "--allow-root", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={project}", "--LabApp.expose_app_in_browser=True"]
    env = _isolated_jupyter_env(folder, **{PROJECT_ROOT_ENV: str(project)})
    base = f"http://127.0.0.1:{port}"
    process = _server(command, env, folder / "server.log", f"{base}/api/status?token={token}")
    try:
        yield f"{base}/lab?token={token}"
    finally:
        _stop(process)


def test_jupyterlab_steps_through_01_to_06_and_the_upload_demo_works(
        browser: Any, uploads: dict[str, Path], jupyterlab: str, project: Path, screenshots: Any) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(60_000)
    page.goto(jupyterlab)
    page.wait_for_function("!!window.jupyterapp", timeout=120_000)
    page.evaluate("async () => { await window.jupyterapp.restored; }")
    run_dir = project / "runs" / "smoke"
    timings = {}
    for stage in STAGES:
        path = f"notebooks/{stage}.ipynb"
        start = time.monotonic()
        state = _run_all(page, path)
        timings[stage] = time.monotonic() - start
        if stage == STAGES[0]:
            assert any(f"run={run_dir.resolve()}" in text for text in state["texts"]), state["texts"]
        if stage != STAGES[-1]:
            page.evaluate(FINISH_NOTEBOOK, [path, False])
    screenshots(page, "jupyterlab-06-after-run-all")

    output = page.locator(".jp-OutputArea-output", has=page.locator("button.medcap-upload-button"))
    output.scroll_into_view_if_needed()
    timings["uploads"] = sum(exercise_upload_demo(page, output, uploads, screenshots, "jupyterlab-06").values())
    page.evaluate(FINISH_NOTEBOOK, [f"notebooks/{STAGES[-1]}.ipynb", True])  # saved as a user would
    page.close()
    print("JupyterLab seconds:", {k: round(v) for k, v in timings.items()})

    for stage in STAGES:
        assert (run_dir / "metrics" / f"{stage}.json").is_file()
    notebooks = sorted((project / "notebooks").glob("*.ipynb")) + sorted((run_dir / "notebooks").glob("*.ipynb"))
    assert_no_upload_left([project], uploads, notebooks)


# --- the Voilà page of ``medcap demo`` -----------------------------------------------------------
def test_voila_demo_page_captions_uploads_and_is_usable_by_keyboard(
        browser: Any, uploads: dict[str, Path], smoke_run: dict, screenshots: Any,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = tmp_path_factory.mktemp("voila")
    run_dir = folder / "run"
    shutil.copytree(smoke_run["dir"], run_dir, symlinks=True, ignore=shutil.ignore_patterns("kernel-ipc-*", ".lock*"))
    port = _free_port()
    command = [sys.executable, "-m", "medcap_helpers.cli", "demo", "--run", str(run_dir), "--port", str(port),
               "--no-browser"]
    url = f"http://127.0.0.1:{port}/"
    start = time.monotonic()
    process = _server(command, _isolated_jupyter_env(folder), folder / "voila.log", url)
    try:
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.set_default_timeout(60_000)
        page.goto(url)
        button = page.locator("button.medcap-upload-button")
        button.wait_for(timeout=UPLOAD_TIMEOUT_MS)
        ready = time.monotonic() - start
        body = page.locator("body").inner_text()
        assert "not a diagnosis" in body.lower() and page.locator(f'code[title="{run_dir}"]').count() == 1
        assert "show_page" not in body and page.locator(".jp-InputArea").count() == 0, "code is shown"
        assert "127.0.0.1" in (folder / "voila.log").read_text()

        # The button is disabled while the page's kernel is busy (loading the models on a loaded machine).
        page.wait_for_function("!document.querySelector('button.medcap-upload-button').disabled",
                               timeout=UPLOAD_TIMEOUT_MS)
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        # Keyboard: Tab reaches the upload button, Enter opens the file chooser. On a loaded machine the page
        # can still be rendering its last outputs, which may move the focus between the Tab and the Enter:
        # then the Tabs start again (three tries, each one the whole keyboard path).
        for _ in range(3):
            for _ in range(20):
                if page.evaluate("document.activeElement?.classList.contains('medcap-upload-button')"):
                    break
                page.keyboard.press("Tab")
            else:
                pytest.fail("Tab never reaches the upload button")
            try:
                with page.expect_file_chooser(timeout=20_000) as chooser:
                    page.keyboard.press("Enter")
                break
            except PlaywrightTimeout:
                continue
        else:
            pytest.fail("Enter on the focused upload button never opened the file chooser")
        chooser.value.set_files([])  # cancelled: nothing happens
        assert button.is_enabled()

        seconds = exercise_upload_demo(page, page, uploads, screenshots, "voila")
        clear = page.get_by_role("button", name="Clear")
        assert clear.get_attribute("title") == "Forget the last image and its captions"
        clear.click()
        page.locator(".medcap-status", has_text="Cleared.").wait_for()
        assert page.locator(".medcap-results").count() == 0
        page.close()
        print(f"Voilà: page ready in {ready:.0f} s, uploads {({k: round(v, 1) for k, v in seconds.items()})}")
    finally:
        _stop(process)
    assert_no_upload_left([run_dir, folder], uploads, [])


def test_demo_page_screenshot_for_the_readme(browser: Any, uploads: dict[str, Path], smoke_run: dict,
                                             tmp_path_factory: pytest.TempPathFactory) -> None:
    """Only with ``MEDCAP_README_SCREENSHOT=docs/demo.png``: a small screenshot of the page for the README."""
    target = os.environ.get("MEDCAP_README_SCREENSHOT")
    if not target:
        pytest.skip("set MEDCAP_README_SCREENSHOT=docs/demo.png to refresh the README's screenshot")
    folder = tmp_path_factory.mktemp("readme")
    run_dir = folder / "runs" / "smoke"  # the page shows the folder's name, as after `make smoke`
    shutil.copytree(smoke_run["dir"], run_dir, symlinks=True, ignore=shutil.ignore_patterns("kernel-ipc-*", ".lock*"))
    port = _free_port()
    command = [sys.executable, "-m", "medcap_helpers.cli", "demo", "--run", str(run_dir), "--port",
               str(port), "--no-browser"]
    url = f"http://127.0.0.1:{port}/"
    process = _server(command, _isolated_jupyter_env(folder), folder / "voila.log", url)
    try:
        page = browser.new_page(viewport={"width": 960, "height": 720})
        page.goto(url)
        button = page.locator("button.medcap-upload-button")
        button.wait_for(timeout=UPLOAD_TIMEOUT_MS)
        with page.expect_file_chooser() as chooser:
            button.click()
        chooser.value.set_files(str(uploads["good0"]))
        page.locator(".medcap-status", has_text="Captioned").wait_for(timeout=UPLOAD_TIMEOUT_MS)
        raw = page.screenshot(full_page=True)
        page.close()
    finally:
        _stop(process)
    image = Image.open(io.BytesIO(raw)).convert("RGB")
    image = image.quantize(colors=64)
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    image.save(target, optimize=True)
    assert Path(target).stat().st_size < 200_000
