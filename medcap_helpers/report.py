"""The run's ``summary.md``: final table, plots, stage metrics, versions and commit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TABLE_COLUMNS = ("CIDEr", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "METEOR")


def format_table(rows: dict[str, dict[str, Any]], columns: tuple[str, ...] = TABLE_COLUMNS) -> str:
    """A markdown table: one row per system, CIDEr with its bootstrap interval when recorded."""
    present = [c for c in columns if any(c in r for r in rows.values())]
    lines = ["| system | " + " | ".join(present) + " |", "|---|" + "---:|" * len(present)]
    for name, row in rows.items():
        cells = []
        for column in present:
            value = row.get(column)
            if value is None:
                cells.append("–")
                continue
            cell = f"{value:.3f}"
            low, high = row.get(f"{column}_ci_low"), row.get(f"{column}_ci_high")
            if low is not None and high is not None:
                cell += f" [{low:.3f}, {high:.3f}]"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
        if final.get("test_note"):
            parts += [final["test_note"], ""]
    figures = sorted((run_dir / "figures").glob("*.png")) if (run_dir / "figures").is_dir() else []
    if figures:
        parts += ["## Plots", ""] + [f"![{f.stem}](figures/{f.name})" for f in figures] + [""]
    metric_files = sorted((run_dir / "metrics").glob("*.json")) if (run_dir / "metrics").is_dir() else []
    if metric_files:
        parts += ["## Stages", ""] + [f"- `{f.stem}`: [metrics/{f.name}](metrics/{f.name}), "
                                      f"[notebook](notebooks/{f.stem}.ipynb)" for f in metric_files] + [""]
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
        return "Test set\n" + format_table(final["test_table"])
    done = sorted(p.stem for p in (run_dir / "metrics").glob("*.json")) if (run_dir / "metrics").is_dir() else []
    return "Stages with metrics: " + (", ".join(done) or "none")
