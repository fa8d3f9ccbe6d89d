"""The executed smoke notebooks read cleanly (issue 14): no warnings, no raw reprs, no progress-bar spam,
only the parameters that differ injected, and every table or figure followed by its interpretation.

Reads the notebooks the session's ``smoke_run`` (tests/conftest.py) executed; no pipeline of its own.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest

from medcap_helpers.config import STAGES
from medcap_helpers.interpretation import READING

pytestmark = pytest.mark.slow

WARNING_TEXT = re.compile(r"\b(\w*Warning|warn(ing)?s?\b|Failed to load|deprecated|Traceback)", re.IGNORECASE)
RAW_REPR = re.compile(r"PosixPath\(|\{'|\{\"|DatasetDict\(|<IPython\.core\.display")
WIDGET = "application/vnd.jupyter.widget-view+json"
TABLE_RULE = re.compile(r"^\|[-:| ]+\|$", re.MULTILINE)


TQDM_TEXT = re.compile(r"\d+%\|")


def outputs(cell: Any) -> Iterator[tuple[str, str]]:
    """(kind, text) of a code cell's outputs: kind is stdout/stderr, error, "progress" (a tqdm widget),
    "widget" (any other widget, such as the demo), or the MIME type of displayed data."""
    for output in cell.get("outputs", []):
        if output.output_type == "stream":
            yield output.name, output.text
        elif output.output_type == "error":
            yield "error", f"{output.ename}: {output.evalue}"
        elif WIDGET in output.get("data", {}):
            plain = output.data.get("text/plain", "")
            yield ("progress" if TQDM_TEXT.search(plain) else "widget"), plain
        else:  # the richest representation; text/plain is only the fallback of markdown, HTML and figures
            data = output.get("data", {})
            mime = next((m for m in ("image/png", "text/markdown", "text/html") if m in data), "text/plain")
            text = data.get(mime, "")
            yield mime, text if isinstance(text, str) else "".join(text)


def is_result(kind: str, text: str) -> bool:
    """A figure, or a markdown table of the run's numbers."""
    return kind == "image/png" or (kind == "text/markdown" and bool(TABLE_RULE.search(text)))


def is_progress(kind: str, text: str) -> bool:
    """A tqdm progress widget, or the Trainer's HTML progress table."""
    return kind == "progress" or (kind == "text/html" and "<progress" in text)


@pytest.fixture(scope="module")
def executed(smoke_run: dict) -> dict[str, nbformat.NotebookNode]:
    folder = Path(smoke_run["dir"]) / "notebooks"
    return {stage: nbformat.read(folder / f"{stage}.ipynb", as_version=4) for stage in STAGES}


def problems_in(book: nbformat.NotebookNode) -> list[str]:
    """Every hygiene problem of one executed notebook, each naming its cell (empty: clean)."""
    found: list[str] = []
    uninterpreted: int | None = None
    for index, cell in enumerate(book.cells):
        if cell.cell_type == "markdown":
            if uninterpreted is not None:
                found.append(f"cell {uninterpreted}: a table or figure with no interpretation before the next section")
                uninterpreted = None
            continue
        if "injected-parameters" in cell.metadata.get("tags", []):
            found += [f"cell {index}: injected line of {len(line)} characters" for line in cell.source.splitlines()
                      if len(line) > 200]
        bars = 0
        for kind, text in outputs(cell):
            if kind in ("stderr", "error"):
                found.append(f"cell {index}: {kind} output {text[:120]!r}")
            elif WARNING_TEXT.search(text) and kind not in ("image/png", "widget"):
                found.append(f"cell {index}: warning text {WARNING_TEXT.search(text).group(0)!r}")
            if kind in ("stdout", "text/plain") and RAW_REPR.search(text):
                found.append(f"cell {index}: raw repr {text[:120]!r}")
            if is_progress(kind, text):
                bars += 1
            if is_result(kind, text):
                uninterpreted = index
            elif kind == "text/markdown" and text.startswith(READING):
                uninterpreted = None
        if bars > 1:
            found.append(f"cell {index}: {bars} progress bars (at most one per step)")
    if uninterpreted is not None:
        found.append(f"cell {uninterpreted}: a table or figure with no interpretation after it")
    return found


@pytest.mark.parametrize("stage", STAGES)
def test_executed_notebook_is_quiet_readable_and_interpreted(executed: dict, stage: str) -> None:
    assert problems_in(executed[stage]) == []


def test_only_settings_that_differ_are_injected(executed: dict, smoke_run: dict) -> None:
    for stage, book in executed.items():
        injected = [c for c in book.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert len(injected) == 1, stage
        assert f'RUN_DIR = "{smoke_run["dir"]}"' in injected[0].source
        assert "OVERRIDES" not in injected[0].source and "PROFILE" not in injected[0].source, \
            "the smoke profile's own settings were injected"


def test_the_checker_finds_each_kind_of_problem() -> None:
    """The rules above fail on the problems issue 14 listed, so a clean result means something."""
    def code_cell(*outs: Any) -> Any:
        cell = nbformat.v4.new_code_cell("x")
        cell.outputs = list(outs)
        return cell

    def shown(mime: str, text: str) -> Any:
        return nbformat.v4.new_output("display_data", {mime: text})

    bad = nbformat.v4.new_notebook(cells=[
        code_cell(nbformat.v4.new_output("stream", name="stderr", text="Failed to load CPU gemm_4bit_forward")),
        code_cell(nbformat.v4.new_output("execute_result", {"text/plain": "PosixPath('/tmp/x')"}, execution_count=1)),
        code_cell(*[nbformat.v4.new_output("display_data", {WIDGET: {"model_id": "m"},
                                                            "text/plain": "Generating reports:   0%|   | 0/60"})] * 2),
        code_cell(shown("text/markdown", "| a |\n|---:|\n| 1 |")),
        nbformat.v4.new_markdown_cell("## next"),
        code_cell(shown("image/png", "iVBOR")),
    ])
    problems = " / ".join(problems_in(bad))
    for expected in ("cell 0: stderr", "cell 1: raw repr", "cell 2: 2 progress bars",
                     "cell 3: a table or figure with no interpretation before the next section",
                     "cell 5: a table or figure with no interpretation after it"):
        assert expected in problems
    good = nbformat.v4.new_notebook(cells=[code_cell(shown("image/png", "iVBOR"),
                                                     shown("text/markdown", f"{READING} It rose."))])
    assert problems_in(good) == []
