"""The run's ``summary.md``: final table, plots, stage metrics, versions and commit.

Every link in it is relative and points at a file that exists in the run folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medcap_helpers.atomic import write_text
from medcap_helpers.config import STAGES
from medcap_helpers.interpretation import differences_markdown
from medcap_helpers.metrics import collapse_markdown, format_table


def summary_markdown(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    config = _read(run_dir / "config.json")
    env = _read(run_dir / "environment.json")
    parts = [f"# medcap run: {run_dir.name}", ""]
    if config.get("data_source") == "smoke":
        parts += ["> **Smoke sample.** Real report text with placeholder images generated from it: this run",
                  "> checks that the pipeline works; its numbers say nothing about model quality.", ""]
    parts += [f"- profile: `{config.get('profile')}`, model: `{config.get('model_name')}`, "
              f"data: `{config.get('data_source')}`",
              f"- git commit: `{env.get('git_commit')}`", f"- GPU: {env.get('gpu') or 'none (CPU)'}", ""]
    final = _read(run_dir / "metrics" / "06_eval_and_demo.json")
    if final.get("test_table"):
        parts += ["## Test set", "", format_table(final["test_table"]), ""]
        if final.get("test_differences"):
            parts += [("Paired differences (95% paired-bootstrap intervals over the same test studies; a difference "
                       "is established only when its interval excludes 0):"), "",
                      differences_markdown(final["test_differences"]), ""]
        if final.get("ce_statement"):
            parts += [final["ce_statement"], ""]
        if final.get("test_note"):
            parts += [final["test_note"], ""]
        if final.get("collapse", {}).get("systems"):
            parts += ["Collapse signals (a generator that writes one report for every image has few distinct "
                      "reports and names findings far less often than the references):", "",
                      collapse_markdown(final["collapse"]), ""]
    figures = sorted((run_dir / "figures").glob("*.png")) if (run_dir / "figures").is_dir() else []
    if figures:
        parts += ["## Plots", ""] + [f"![{f.stem}](figures/{f.name})" for f in figures] + [""]
    stage_lines = []
    for stage in STAGES:
        links = [f"[{path}]({path})" for path in (f"metrics/{stage}.json", f"notebooks/{stage}.ipynb")
                 if (run_dir / path).is_file()]
        if links:
            stage_lines.append(f"- `{stage}`: " + ", ".join(links))
    extra = sorted(p for p in (run_dir / "metrics").glob("*.json") if p.stem not in STAGES) \
        if (run_dir / "metrics").is_dir() else []
    stage_lines += [f"- [metrics/{p.name}](metrics/{p.name})" for p in extra]
    if stage_lines:
        parts += ["## Stages", ""] + stage_lines + [""]
    packages = env.get("packages", {})
    if packages:
        parts += ["## Package versions", "", "| package | version |", "|---|---|"]
        parts += [f"| {name} | {version or '–'} |" for name, version in packages.items()] + [""]
    return "\n".join(parts)


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def final_table_text(run_dir: str | Path) -> str:
    """The final test table for the terminal (or what stages have run so far)."""
    run_dir = Path(run_dir)
    final = _read(run_dir / "metrics" / "06_eval_and_demo.json")
    if final.get("test_table"):
        text = "Test set\n" + format_table(final["test_table"])
        return text + ("\n" + final["ce_statement"] if final.get("ce_statement") else "")
    done = sorted(p.stem for p in (run_dir / "metrics").glob("*.json")) if (run_dir / "metrics").is_dir() else []
    return "Stages with metrics: " + (", ".join(done) or "none")


def write_summary(run_dir: str | Path) -> Path:
    """Write ``<run_dir>/summary.md`` (atomically)."""
    return write_text(Path(run_dir) / "summary.md", summary_markdown(run_dir))
