"""Nothing unsafe is loaded: safetensors only, no pickle, no remote code, uploads stay in memory.

Source checks read ``medcap_helpers/`` (and the benchmarks and notebooks, which call it) with ``ast``
where a plain grep would not be enough: every ``from_pretrained(`` call that loads weights must pass
``use_safetensors=True`` (directly or in the ``**kwargs`` dict it is given); processor, tokenizer and
config loads read JSON/tokenizer files only; peft's ``PeftModel.from_pretrained`` is allowed only where
the folder was first checked to hold ``adapter_model.safetensors`` (peft would otherwise fall back to
``torch.load`` of ``adapter_model.bin``).
"""

from __future__ import annotations

import ast
import builtins
import io
import json
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from medcap_helpers import checkpoints, errors
from medcap_helpers.config import MedcapConfig
from medcap_helpers.demo import CaptionDemo
from medcap_helpers.errors import ModelLoadError

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "medcap_helpers"
SOURCES = sorted(PACKAGE.rglob("*.py")) + sorted((REPO / "benchmarks").glob("*.py"))
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
UNSAFE = {
    "trust_remote_code=True": r"trust_remote_code\s*=\s*True",
    "torch.load(": r"torch\.load\s*\(",
    "pickle.load": r"\bpickle\.loads?\b",
    "import pickle": r"^\s*(?:import|from)\s+(?:c?pickle|dill|joblib)\b",
    "weights_only=False": r"weights_only\s*=\s*False",
    "use_safetensors=False": r"use_safetensors\s*=\s*False",
    "safe_serialization=False": r"safe_serialization\s*=\s*False",
}
NON_WEIGHT_LOADERS = ("Processor", "ProcessorPil", "Tokenizer", "TokenizerFast", "Config", "GenerationConfig")
"""Receivers of ``from_pretrained`` that read JSON / tokenizer files, never weights."""
PEFT_LOADS = {("checkpoints.py", "load_adapter_model"), ("merge.py", "_merge")}
"""Where ``PeftModel.from_pretrained`` may be called (each guarded: see the tests below)."""


def code_of(path: Path) -> str:
    if path.suffix == ".ipynb":
        book = json.loads(path.read_text())
        return "\n".join("".join(cell["source"]) for cell in book["cells"] if cell["cell_type"] == "code")
    return path.read_text()


@pytest.mark.parametrize("path", SOURCES + NOTEBOOKS, ids=lambda p: str(p.relative_to(REPO)))
def test_no_pickle_loading_and_no_remote_code(path: Path) -> None:
    code = code_of(path)
    found = [name for name, pattern in UNSAFE.items() if re.search(pattern, code, re.MULTILINE)]
    assert not found, f"{path.relative_to(REPO)} contains {found}"


def _function_defs(tree: ast.AST) -> list[ast.FunctionDef]:
    return [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _enclosing_function(tree: ast.AST, target: ast.AST) -> ast.FunctionDef | None:
    inner = None
    for function in _function_defs(tree):
        if any(node is target for node in ast.walk(function)):
            if inner is None or any(node is function for node in ast.walk(inner)):
                inner = function
    return inner


def _is_true(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _dict_passes_safetensors(function: ast.AST, name: str) -> bool:
    """``name = dict(..., use_safetensors=True, ...)`` (or an annotated one) in ``function``."""
    for node in ast.walk(function):
        value = None
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            value = node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
            value = node.value
        if (isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "dict"
                and any(k.arg == "use_safetensors" and _is_true(k.value) for k in value.keywords)):
            return True
    return False


def from_pretrained_calls() -> list[tuple[Path, ast.Call, str, ast.FunctionDef | None, ast.Module]]:
    calls = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr == "from_pretrained":
                receiver = ast.unparse(node.func.value)
                calls.append((path, node, receiver, _enclosing_function(tree, node), tree))
    return calls


def test_every_weight_load_in_the_package_is_safetensors_only() -> None:
    calls = from_pretrained_calls()
    assert len(calls) >= 8, "the AST walk found the package's from_pretrained calls"
    unsafe, peft_sites = [], set()
    for path, call, receiver, function, _ in calls:
        where = f"{path.name}:{call.lineno} {receiver}.from_pretrained"
        if receiver.endswith(NON_WEIGHT_LOADERS):
            continue
        if receiver == "PeftModel":
            peft_sites.add((path.name, function.name if function else "<module>"))
            continue
        direct = any(k.arg == "use_safetensors" and _is_true(k.value) for k in call.keywords)
        via_kwargs = any(k.arg is None and isinstance(k.value, ast.Name) and function is not None
                         and _dict_passes_safetensors(function, k.value.id) for k in call.keywords)
        if not (direct or via_kwargs):
            unsafe.append(where)
    assert not unsafe, f"weight loads without use_safetensors=True: {unsafe}"
    assert peft_sites <= PEFT_LOADS, f"PeftModel.from_pretrained outside the guarded loaders: {peft_sites - PEFT_LOADS}"


def test_every_caller_of_the_merge_helper_checks_the_adapter_first() -> None:
    """``merge._merge`` calls PeftModel.from_pretrained; whoever calls it checked the folder before."""
    tree = ast.parse((PACKAGE / "merge.py").read_text())
    callers = []
    for function in _function_defs(tree):
        lines = {name: [n.lineno for n in ast.walk(function) if isinstance(n, ast.Call)
                        and isinstance(n.func, ast.Name) and n.func.id == name]
                 for name in ("_merge", "check_adapter_dir")}
        if lines["_merge"]:
            callers.append(function.name)
            assert lines["check_adapter_dir"] and min(lines["check_adapter_dir"]) < min(lines["_merge"]), \
                f"merge.{function.name} merges an adapter it did not check with check_adapter_dir"
    assert callers, "merge.py has callers of _merge"


@pytest.mark.parametrize("loader", ["checkpoints.load_adapter_model", "checkpoints.check_adapter_dir"])
def test_adapter_loaders_refuse_pickle_only_adapters(loader: str, tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04not loaded")
    if loader == "checkpoints.load_adapter_model":
        with pytest.raises(ModelLoadError, match="adapter_model.safetensors"):
            checkpoints.load_adapter_model(MedcapConfig.from_profile("smoke", run_dir=str(tmp_path / "run")), folder)
    else:
        with pytest.raises(errors.AdapterNotFound, match="adapter_model.safetensors"):
            checkpoints.check_adapter_dir(folder)


def test_models_and_adapters_are_saved_as_safetensors() -> None:
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr == "save_pretrained" and "processor" not in ast.unparse(node.func.value):
                assert any(k.arg == "safe_serialization" and _is_true(k.value) for k in node.keywords), \
                    f"{path.name}:{node.lineno} saves weights without safe_serialization=True"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_hold_no_widget_state(path: Path) -> None:
    book = json.loads(path.read_text())
    assert "widgets" not in book.get("metadata", {})
    assert "application/vnd.jupyter.widget-state+json" not in path.read_text()


def test_demo_uploads_are_decoded_in_memory_never_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """An upload goes through the demo with every way of writing a file watched."""
    writes: list[str] = []
    real_open, real_os_open, real_save = builtins.open, os.open, Image.Image.save

    def watched_open(file, mode="r", *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if any(flag in mode for flag in "wax+"):
            writes.append(f"open({file!r}, {mode!r})")
        return real_open(file, mode, *args, **kwargs)

    def watched_os_open(path, flags, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            writes.append(f"os.open({path!r})")
        return real_os_open(path, flags, *args, **kwargs)

    def watched_save(self, fp, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if isinstance(fp, (str, os.PathLike)):
            writes.append(f"Image.save({fp!r})")
        return real_save(self, fp, *args, **kwargs)

    buffer = io.BytesIO()
    Image.new("L", (40, 30), 128).save(buffer, format="PNG")
    demo = CaptionDemo({"fine-tuned": lambda image: f"{image.width}x{image.height}"}, max_pixels=10_000)
    monkeypatch.setattr(builtins, "open", watched_open)
    monkeypatch.setattr(io, "open", watched_open)
    monkeypatch.setattr(os, "open", watched_os_open)
    monkeypatch.setattr(Image.Image, "save", watched_save)
    demo.upload.set_state({"value": [{"name": "chest.png", "type": "image/png", "size": len(buffer.getvalue()),
                                      "content": memoryview(buffer.getvalue()), "last_modified": 0}]})
    monkeypatch.undo()
    assert demo.last_result["captions"] == {"fine-tuned": "40x30"}
    assert not writes, f"the demo wrote the upload to disk: {writes}"
    assert demo.upload.value == (), "the uploaded bytes are dropped from the widget state"
