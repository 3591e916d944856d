"""Figures the chapters share: results bars and diagrams, drawn with matplotlib."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter


def accuracy_bars(
    rows: Mapping[str, Mapping[str, float]],
    title: str = "",
    intervals: Mapping[str, Mapping[str, tuple[float, float]]] | None = None,
) -> Figure:
    """Grouped bars: one group per column (task family, overall), one bar per row (model or setting).

    `intervals` (same keys as `rows`, values (low, high) fractions) draws each bar's error bar.
    """
    labels = list(rows)
    columns = list(next(iter(rows.values())))
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    for i, label in enumerate(labels):
        values = np.array([100 * rows[label][c] for c in columns])
        errors = None
        if intervals is not None:
            low = np.array([100 * intervals[label][c][0] for c in columns])
            high = np.array([100 * intervals[label][c][1] for c in columns])
            errors = np.array([values - low, high - values])  # distances below and above each bar
        bars = ax.bar(
            np.arange(len(columns)) + (i - (len(labels) - 1) / 2) * width,
            values,
            width,
            label=label,
            yerr=errors,
            capsize=2,
            error_kw={"elinewidth": 0.8, "ecolor": "#555555"},
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


def metric_panels(
    panels: Mapping[str, Mapping[str, float | tuple[float, float, float]]], title: str = ""
) -> Figure:
    """One small bar chart per metric, one bar per model; a (value, low, high) triple draws an error bar."""
    fig, axes = plt.subplots(1, len(panels), figsize=(2.3 * len(panels) + 0.6, 3.0), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (metric, bars) in zip(axes[0], panels.items(), strict=True):
        labels = list(bars)
        triples = [b if isinstance(b, tuple) else (b, b, b) for b in bars.values()]
        values = np.array([t[0] for t in triples])
        # matplotlib wants distances below and above each bar, not the interval's ends
        errors = np.array([[t[0] - t[1] for t in triples], [t[2] - t[0] for t in triples]])
        has_interval = any(isinstance(b, tuple) for b in bars.values())
        drawn = ax.bar(
            labels, values, color=colors[: len(labels)], yerr=errors if has_interval else None, capsize=3
        )
        ax.bar_label(drawn, fmt="%.3g", fontsize=7, padding=2)
        ax.set_title(metric, fontsize=8.5)
        ax.tick_params(axis="both", labelsize=7.5)
        ax.set_ylim(0, 1.2 * max(float(np.max(values + errors[1])), 1e-9))
        ax.spines[["top", "right"]].set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def quantization_tradeoff(
    bits: Mapping[str, float],
    logit_error: Mapping[str, Mapping[str, float]],
    accuracy: Mapping[str, float],
) -> Figure:
    """Left: bits per weight against max |Δlogit| per file and reader; right: exact match per served file."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.6, 3.3), gridspec_kw={"width_ratios": [1.1, 1]})
    for reader, errors in logit_error.items():
        files = list(errors)
        left.plot([bits[f] for f in files], [errors[f] for f in files], "o-", label=reader)
    for name, x in bits.items():  # label each file once, above its highest point
        top = max(errors.get(name, 0.0) for errors in logit_error.values())
        left.annotate(name, (x, top), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7.5)
    left.set_yscale("log")
    low, high = left.get_ylim()
    left.set_ylim(low, high * 3)  # room for the labels above the top points
    left.margins(x=0.08)
    left.set_xlabel("bits per weight (file size / parameters)")
    left.set_ylabel("max |Δlogit| vs transformers")
    left.legend(frameon=False, fontsize=7.5, loc="lower left")
    labels = list(accuracy)[::-1]  # first entry on top
    drawn = right.barh(labels, [100 * accuracy[k] for k in labels], color="#7aa6c2")
    right.bar_label(drawn, fmt="%.1f", fontsize=7.5, padding=2)
    right.set_xlabel("held-out exact match (%)")
    right.set_xlim(0, 109)
    right.tick_params(axis="y", labelsize=7.5)
    for ax in (left, right):
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig


def loss_curves(curves: Mapping[str, Sequence[tuple[int, float]]], title: str = "") -> Figure:
    """Training loss against step, one line per run; `curves` maps a label to (step, loss) pairs."""
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    for label, points in curves.items():
        if not points:
            raise ValueError(f"run {label!r} logged no loss; train for at least logging_steps steps")
        steps, losses = zip(*points, strict=True)
        ax.plot(steps, losses, marker="o", markersize=3, linewidth=1.2, label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (nats per token)")
    ax.set_ylim(bottom=0)
    ax.spines[["top", "right"]].set_visible(False)
    if len(curves) > 1:
        ax.legend(frameon=False, fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def memory_breakdown(
    breakdowns: Mapping[str, Mapping[str, float]], device_gib: float | None = None
) -> Figure:
    """Stacked horizontal bars: one bar per setting, one segment per memory component (GiB)."""
    labels = list(breakdowns)[::-1]  # first entry on top
    parts = [p for p in next(iter(breakdowns.values())) if any(b.get(p, 0) > 0 for b in breakdowns.values())]
    colors = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(parts), 2)))
    fig, ax = plt.subplots(figsize=(8.2, 0.55 * len(labels) + 1.6))
    left = np.zeros(len(labels))
    for part, color in zip(parts, colors, strict=False):
        values = np.array([breakdowns[label].get(part, 0.0) for label in labels])
        ax.barh(labels, values, left=left, color=color, label=part, edgecolor="white", linewidth=0.4)
        left += values
    for y, total in enumerate(left):
        ax.text(total, y, f" {total:.1f}", va="center", fontsize=7.5)
    if device_gib:
        ax.axvline(device_gib, color="#b22222", lw=1, ls="--")
        ax.text(device_gib, len(labels) - 0.4, " device", color="#b22222", fontsize=7.5)
    ax.set_xlabel("GiB at the step's peak")
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(frameon=False, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def estimate_vs_measured(measured: Sequence[float], estimated: Sequence[float], band: float = 0.15) -> Figure:
    """Estimated against measured values on log axes, with the y = x line and a +-band corridor."""
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    low, high = 0.8 * min(*measured, *estimated), 1.25 * max(*measured, *estimated)
    line = np.geomspace(low, high, 50)
    ax.fill_between(line, line * (1 - band), line * (1 + band), color="#dcebf7", label=f"within {band:.0%}")
    ax.plot(line, line, color="#555555", lw=0.8, label="estimate = measurement")
    ax.scatter(measured, estimated, s=18, color="#1f4e79", zorder=3)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    ticks = [t for t in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if low <= t <= high]
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(FixedLocator(ticks))
        axis.set_major_formatter(FuncFormatter(lambda t, _: f"{t:g}"))
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("measured peak (GiB)")
    ax.set_ylabel("fit_check estimate (GiB)")
    ax.legend(frameon=False, fontsize=7.5, loc="upper left")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig


def preference_curves(
    histories: Mapping[str, Sequence[Mapping[str, float]]], keys: Sequence[str], titles: Sequence[str] = ()
) -> Figure:
    """One panel per logged key (e.g. rewards/margins), one line per run, from TRL trainers' log histories."""
    fig, axes = plt.subplots(1, len(keys), figsize=(3.3 * len(keys), 2.9), squeeze=False)
    for i, (ax, key) in enumerate(zip(axes[0], keys, strict=True)):
        for label, history in histories.items():
            points = [(log["step"], log[key]) for log in history if key in log and "step" in log]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", ms=2.5, lw=1.1, label=label)
        ax.set_title(titles[i] if i < len(titles) else key, fontsize=9)
        ax.set_xlabel("training step", fontsize=8)
        ax.tick_params(labelsize=7.5)
        ax.spines[["top", "right"]].set_visible(False)
    if len(histories) > 1:
        axes[0][-1].legend(frameon=False, fontsize=7.5, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def error_by_blocksize(blocksizes: Sequence[int], series: Mapping[str, Sequence[float]]) -> Figure:
    """Quantization error (y, log) against block size (x, log), one line per data set or method."""
    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    for label, values in series.items():
        ax.plot(blocksizes, values, marker="o", ms=3.5, lw=1.2, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(list(blocksizes), [f"{b:,}" for b in blocksizes], fontsize=7.5)
    ax.set_xlabel("values per scale (block size)")
    ax.set_ylabel("RMS error / RMS of the data")
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(frameon=False, fontsize=7.5)
    fig.tight_layout()
    return fig


def codebook_histogram(
    values: Sequence[float], codes: Mapping[str, Sequence[float]], title: str = ""
) -> Figure:
    """Histogram of values scaled to [-1, 1], with each 4-bit codebook drawn as a row of ticks below it."""
    fig, ax = plt.subplots(figsize=(6.6, 3.4))
    ax.hist(values, bins=120, range=(-1, 1), color="#9dbcd4", density=True)
    top = ax.get_ylim()[1]
    for row, (label, code) in enumerate(codes.items()):
        y = -top * (0.08 + 0.09 * row)
        ax.scatter(code, [y] * len(code), marker="|", s=120, lw=1.4, label=label)
    ax.set_ylim(-top * (0.12 + 0.09 * len(codes)), top * 1.02)
    ax.set_yticks([t for t in ax.get_yticks() if 0 <= t <= top])
    ax.set_xlabel("weight / absmax of its block")
    ax.set_ylabel("density")
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(frameon=False, fontsize=7.5, loc="upper right")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig
