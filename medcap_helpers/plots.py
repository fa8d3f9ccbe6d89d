"""Figures the notebooks show; each is also saved under ``<run_dir>/figures`` for ``summary.md``."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np


def _save(fig: Any, path: str | Path | None) -> Any:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
    _show_now(fig)
    return fig


def _show_now(fig: Any) -> None:
    """In a notebook with the inline backend, show the figure where it is made, not when the cell ends, so
    the interpretation a cell prints after it comes after it (the figure is then closed: shown once)."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:  # pragma: no cover
        return
    if get_ipython() is not None and "inline" in plt.get_backend():
        display(fig)
        plt.close(fig)


def _wrap(text: str, width: int = 48, max_lines: int = 6) -> str:
    lines = textwrap.wrap(text or "(empty)", width)
    return "\n".join(lines[:max_lines] + (["…"] if len(lines) > max_lines else []))


def plot_length_histograms(word_counts: Sequence[int], token_counts: Sequence[int] | None = None,
                           max_target_tokens: int | None = None, path: str | Path | None = None) -> Any:
    """Report length in words (and tokens, with the training truncation length marked)."""
    panels = 2 if token_counts is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 3.4), squeeze=False)
    axes[0][0].hist(word_counts, bins=40, color="#4477aa")
    axes[0][0].set(xlabel="words per report", ylabel="reports", title="Report length (words)")
    if token_counts is not None:
        ax = axes[0][1]
        ax.hist(token_counts, bins=40, color="#228833")
        ax.set(xlabel="tokens per report", title="Report length (tokens)")
        if max_target_tokens:
            ax.axvline(max_target_tokens, color="#cc3311", linestyle="--", label=f"max_target_tokens={max_target_tokens}")
            ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def show_image_grid(images: Sequence[Any], captions: Sequence[str], ncols: int = 3,
                    path: str | Path | None = None, title: str | None = None) -> Any:
    """Images with their (wrapped) report text underneath."""
    n = len(images)
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 6.0 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions):
        ax.imshow(image, cmap="gray")
        ax.set_title(_wrap(caption), fontsize=7, loc="left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def show_predictions(images: Sequence[Any], columns: Mapping[str, Sequence[str]],
                     path: str | Path | None = None) -> Any:
    """One row per image: the image, then one text panel per system (reference first)."""
    n = len(images)
    ncols = 1 + len(columns)
    fig, axes = plt.subplots(n, ncols, figsize=(3.4 * ncols, 3.0 * max(n, 1)), squeeze=False)
    for row, image in enumerate(images):
        axes[row][0].imshow(image, cmap="gray")
        axes[row][0].axis("off")
        for col, (name, texts) in enumerate(columns.items(), start=1):
            ax = axes[row][col]
            ax.axis("off")
            ax.text(0, 1, _wrap(texts[row], 34, 12), va="top", fontsize=7, family="monospace")
            if row == 0:
                ax.set_title(name, fontsize=9, loc="left")
    fig.tight_layout()
    return _save(fig, path)


def plot_training_curves(history: Sequence[Mapping[str, Any]], log_history: Sequence[Mapping[str, Any]] = (),
                         path: str | Path | None = None) -> Any:
    """Training loss per logging step, eval loss and validation CIDEr per epoch."""
    fig, (ax_loss, ax_cider) = plt.subplots(1, 2, figsize=(11, 3.6))
    steps = [(e["epoch"], e["loss"]) for e in log_history if "loss" in e and "epoch" in e]
    if steps:
        ax_loss.plot(*zip(*steps), color="#4477aa", label="train loss (per log step)")
    evals = [(h["epoch"], h["eval_loss"]) for h in history if h.get("eval_loss") is not None]
    if evals:
        ax_loss.plot(*zip(*evals), "o-", color="#ee6677", label="validation loss")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_loss.legend()
    ciders = [(h["epoch"], h.get("val_cider", h.get("eval_cider"))) for h in history]
    ciders = [c for c in ciders if c[1] is not None]
    if ciders:
        ax_cider.plot(*zip(*ciders), "o-", color="#228833")
        best = max(ciders, key=lambda c: c[1])
        ax_cider.plot(*best, "o", markersize=11, markerfacecolor="none", markeredgecolor="#cc3311")
        low, high = ax_cider.get_ylim()
        ax_cider.set_ylim(low, high + 0.18 * (high - low))  # room for the label under the title
        ax_cider.annotate(f"best {best[1]:.3f} (epoch {best[0]:g})", best, textcoords="offset points",
                          xytext=(0, 10), ha="center", va="bottom", fontsize=9)
    ax_cider.set(xlabel="epoch", ylabel="CIDEr", title="Validation CIDEr (generated reports)")
    fig.tight_layout()
    return _save(fig, path)


VALUE_LABELS = {"val_cider": "validation CIDEr", "peak_gpu_gb": "peak GPU memory (GB)",
                "peak_rss_gb": "peak RSS (GB)", "wall_time_s": "time (s)"}


def plot_sweep_heatmap(trials: Sequence[Mapping[str, Any]], value_key: str = "val_cider",
                       path: str | Path | None = None) -> Any:
    """CIDEr over LoRA rank × alpha; infeasible trials (over the VRAM budget) hatched."""
    ranks = sorted({t["lora_r"] for t in trials})
    alphas = sorted({t["lora_alpha"] for t in trials})
    grid = np.full((len(ranks), len(alphas)), np.nan)
    for t in trials:
        if t.get(value_key) is not None:
            grid[ranks.index(t["lora_r"]), alphas.index(t["lora_alpha"])] = t[value_key]
    fig, ax = plt.subplots(figsize=(1.6 * len(alphas) + 2.5, 1.0 * len(ranks) + 1.8))
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    label_text = VALUE_LABELS.get(value_key, value_key)
    fig.colorbar(image, ax=ax, label=label_text)
    ax.set_xticks(range(len(alphas)), [str(a) for a in alphas])
    ax.set_yticks(range(len(ranks)), [str(r) for r in ranks])
    ax.set(xlabel="LoRA alpha", ylabel="LoRA rank r", title=f"Sweep: {label_text}")
    for t in trials:
        i, j = ranks.index(t["lora_r"]), alphas.index(t["lora_alpha"])
        value = grid[i, j]
        label = "–" if np.isnan(value) else _value_label(value)
        # Dark text on the bright (yellow-green) end of viridis, white on the dark end.
        colour = "black" if not np.isnan(value) and float(image.norm(value)) > 0.6 else "white"
        if t.get("feasible") is False:
            label += "\nover budget"
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//", edgecolor=colour))
        ax.text(j, i, label, ha="center", va="center", color=colour, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _value_label(value: float) -> str:
    """3 decimals, or 3 significant digits for small non-zero values (0.00014, not 0.000)."""
    if value == 0 or abs(value) >= 0.01:
        return f"{value:.3f}"
    return np.format_float_positional(value, precision=2, fractional=False)


def plot_metric_bars(table: Mapping[str, Mapping[str, Any]], metric: str = "CIDEr",
                     path: str | Path | None = None) -> Any:
    """One bar per system with its bootstrap interval where recorded."""
    names = list(table)
    values = [table[n].get(metric) or 0.0 for n in names]
    lows = [table[n].get(f"{metric}_ci_low") for n in names]
    highs = [table[n].get(f"{metric}_ci_high") for n in names]
    errors = None
    if all(lo is not None for lo in lows) and all(hi is not None for hi in highs):
        errors = np.array([[v - lo for v, lo in zip(values, lows)], [hi - v for v, hi in zip(values, highs)]])
        errors = np.clip(errors, 0, None)
    # Horizontal bars: system names are long and read best as row labels, in the table's order.
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(names) + 1.3))
    positions = np.arange(len(names))
    ax.barh(positions, values, xerr=errors, capsize=4, color="#4477aa", height=0.6)
    ax.set_yticks(positions, [textwrap.fill(n, 32) for n in names])
    ax.invert_yaxis()
    ax.set_xlim(left=0)
    ax.set(xlabel=metric, title=f"Test {metric}" + (" (95% bootstrap CI over studies)" if errors is not None else ""))
    fig.tight_layout()
    return _save(fig, path)


def examples_side_by_side(split: Any, systems: dict[str, Sequence[str]], n: int) -> tuple[list[Any], dict[str, list[str]]]:
    """The first ``n`` images with their reference and every system's prediction (for plots.show_predictions)."""
    n = min(n, len(split))
    images = [split[i]["image"].convert("RGB") for i in range(n)]
    columns = {"reference": [split[i]["text"] for i in range(n)]}
    columns.update({name: list(predictions[:n]) for name, predictions in systems.items()})
    return images, columns
