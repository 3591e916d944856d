"""Figures the chapters share: results bars and diagrams, drawn with matplotlib."""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch


def accuracy_bars(rows: Mapping[str, Mapping[str, float]], title: str = "") -> Figure:
    """Grouped bars: one group per column (task family, overall), one bar per row (model or setting)."""
    labels = list(rows)
    columns = list(next(iter(rows.values())))
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    for i, label in enumerate(labels):
        values = [100 * rows[label][c] for c in columns]
        bars = ax.bar(
            np.arange(len(columns)) + (i - (len(labels) - 1) / 2) * width, values, width, label=label
        )
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    ax.set_xticks(np.arange(len(columns)), columns)
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(0, 109)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def _box(ax, xy: tuple[float, float], text: str, color: str, width: float = 2.6, height: float = 0.9) -> None:
    x, y = xy
    patch = FancyBboxPatch(
        (x - width / 2, y - height / 2),
        width,
        height,
        boxstyle="round,pad=0.05",
        facecolor=color,
        edgecolor="#333333",
        linewidth=0.8,
    )
    ax.add_patch(patch)
    ax.text(x, y, text, ha="center", va="center", fontsize=8.5, wrap=True)


def _arrow(ax, start: tuple[float, float], end: tuple[float, float], label: str = "") -> None:
    ax.annotate("", xy=end, xytext=start, arrowprops={"arrowstyle": "->", "color": "#333333", "lw": 0.9})
    if label:
        ax.text((start[0] + end[0]) / 2 + 0.08, (start[1] + end[1]) / 2, label, fontsize=7.5, color="#444444")


def decision_flow() -> Figure:
    """Prompting, RAG or fine-tuning: the questions to ask, in order."""
    fig, ax = plt.subplots(figsize=(8.4, 4.6))
    ax.set_xlim(0, 12)
    ax.set_ylim(0, 7)
    ax.axis("off")
    question, answer = "#fdf3d8", "#dcebf7"
    _box(ax, (2.2, 6.2), "Does a clear prompt with a few\nexamples already work?", question, width=3.6)
    _box(ax, (2.2, 4.4), "Is what is missing knowledge\n(facts, documents, fresh data)?", question, width=3.6)
    _box(ax, (2.2, 2.6), "Is it behaviour: format, style,\nskill, tone, refusals?", question, width=3.6)
    _box(ax, (7.6, 6.2), "Prompt engineering\n(system prompt, few-shot)", answer, width=3.4)
    _box(ax, (7.6, 4.4), "Retrieval (RAG)\nfetch the facts at query time", answer, width=3.4)
    _box(ax, (7.6, 2.6), "Fine-tuning\n(full, or PEFT such as LoRA)", answer, width=3.4)
    _box(ax, (7.6, 0.8), "Often both: RAG for facts,\nfine-tuning for behaviour", "#e3f1df", width=3.4)
    _arrow(ax, (4.0, 6.2), (5.9, 6.2), "yes")
    _arrow(ax, (2.2, 5.75), (2.2, 4.85), "no")
    _arrow(ax, (4.0, 4.4), (5.9, 4.4), "yes")
    _arrow(ax, (2.2, 3.95), (2.2, 3.05), "no")
    _arrow(ax, (4.0, 2.6), (5.9, 2.6), "yes")
    _arrow(ax, (7.6, 3.95 - 1.8), (7.6, 1.25), "")
    fig.tight_layout()
    return fig
