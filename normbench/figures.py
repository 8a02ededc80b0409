"""The report's figures, drawn from the aggregated table and the per-epoch curves.

``FIGURES`` is the one list of figures (name -> file name, drawing function, what it shows); the
report writes each of them and the tests read the same table. A drawing function takes
``(table, curves, protocol)`` and returns a matplotlib Figure on the Agg canvas (no pyplot, no
global backend change).

Every norm has one colour and one marker in every figure of every report (``norm_style``), the
legend sits outside the data, coinciding lines are nudged sideways so neither hides the other,
and every figure states its protocol and how many seeds its points average.
"""

from __future__ import annotations

import colorsys
import functools
import math
import textwrap
import zlib
from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np
import pandas as pd

from normbench.collect import BATCH_STAT_SETTINGS
from normbench.table import (
    EMPTY,
    base_norm,
    format_setting,
    is_missing,
    norm_order,
    setting_keys,
    sort_table,
    table_setting_columns,
)

# One colour and marker per norm, picked by the norm's index in the registry (so `gn` looks the
# same whichever norms a report holds): today's twelve norms keep these colours and markers, and a
# norm past them takes the next of an endless sequence of further colours and markers, each
# distinct from every one before it. Norms the registry does not know take a light colour by a
# hash of their name (stable across reports, distinct from the registry's), moved on to the next
# free light colour where two of one figure would share it (norm_styles).
PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",  # tab10
    "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#000000", "#7b4173",  # tab10, black, tab20b
]
UNKNOWN_PALETTE = [
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5",  # tab20's light shades
    "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
]
MARKERS = ["o", "s", "^", "v", "D", "P", "X", "<", ">", "p", "*", "h", "8"]
# Lines of one norm that differ in something else (an option, placement, virtual batch).
LINESTYLES = ["-", "--", ":", "-."]

BATCH_XLABEL = "normalization batch (log2 scale)\nSGD batch for batch-independent norms"

_GOLDEN = (math.sqrt(5) - 1) / 2  # hue step: consecutive generated colours far apart on the colour wheel
# (saturation, value) levels of the generated colours, in turn: the registry's strong, the unknown
# norms' light. No level of one has the other's value, so the two sequences never share a colour.
_STRONG_LEVELS = ((0.85, 0.75), (0.65, 0.55), (0.9, 0.95))
_LIGHT_LEVELS = ((0.3, 1.0), (0.4, 0.97))


def _hsv_hex(hue: float, saturation: float, value: float) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(round(c * 255) for c in colorsys.hsv_to_rgb(hue % 1.0, saturation, value)))


def _generated_colour(k: int, levels) -> str:
    saturation, value = levels[k % len(levels)]
    return _hsv_hex(0.11 + k * _GOLDEN, saturation, value)


@functools.cache
def _sequence(kind: str, n: int) -> tuple:
    """The first `n` colours (kind "colour": the registry's; "light": unknown norms') or markers:
    the fixed ones, then generated ones, each distinct from all before it (and from every fixed one)."""
    fixed = {"colour": PALETTE, "light": UNKNOWN_PALETTE, "marker": MARKERS}[kind]
    taken = set(PALETTE) | set(UNKNOWN_PALETTE) | set(MARKERS)
    items = list(fixed[:n])
    k = 0
    while len(items) < n:
        if kind == "marker":  # stars, then asterisks, with ever more points: (points, 1 star / 2 asterisk, angle)
            item = (6 + k // 2, 1 + k % 2, 0)
        else:
            item = _generated_colour(k, _STRONG_LEVELS if kind == "colour" else _LIGHT_LEVELS)
        k += 1
        if item not in taken and item not in items:
            items.append(item)
    return tuple(items)


def _nth(kind: str, index: int):
    return _sequence(kind, index + 1)[index]


@dataclass(frozen=True)
class NormStyle:
    color: str
    marker: str | tuple


def norm_style(label: str, order: list[str] | None = None) -> NormStyle:
    """The colour and marker of a norm label; options (gn-groups16) keep their base norm's."""
    order = norm_order() if order is None else order
    base = base_norm(label)
    if base in order:
        index = order.index(base)
        return NormStyle(_nth("colour", index), _nth("marker", index))
    digest = zlib.crc32(base.encode())
    return NormStyle(UNKNOWN_PALETTE[digest % len(UNKNOWN_PALETTE)], MARKERS[digest % len(MARKERS)])


def norm_styles(labels, order: list[str] | None = None) -> dict[str, NormStyle]:
    """The style of each norm label of one figure (norm_style), no two norms in one colour: an
    unknown norm whose light colour another unknown norm of the figure already has (by name order)
    takes the next free one."""
    order = norm_order() if order is None else order
    labels = sorted(set(labels))
    styles: dict[str, NormStyle] = {}
    used: dict[str, str] = {}  # colour -> base norm
    for base in sorted({base_norm(label) for label in labels}, key=lambda b: (b not in order, b)):
        style = norm_style(base, order)
        if base not in order:
            slot = UNKNOWN_PALETTE.index(style.color)
            while used.get(_nth("light", slot), base) != base:
                slot += 1
            style = NormStyle(_nth("light", slot), style.marker)
        used[style.color] = base
        for label in labels:
            if base_norm(label) == base:
                styles[label] = style
    return styles


def seeds_phrase(seed_counts) -> tuple[str, bool]:
    """What the points average, for a title, and whether to draw the spread (only over >1 seed)."""
    counts = sorted({int(n) for n in seed_counts if n > 0})
    if not counts or counts[-1] == 1:
        return "one seed", False
    span = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    return f"mean ± std over {span} seeds", True


# --------------------------------------------------------------------------------------------
# Shared drawing helpers
# --------------------------------------------------------------------------------------------

LEGEND_WIDTH = 2.6  # inches to the right of the panels


def _new_figure(n_panels: int, panel_size=(5.0, 3.8)):
    """A Figure on the Agg canvas with `n_panels` axes (up to 3 a row), room for a legend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = min(max(n_panels, 1), 3)
    nrows = math.ceil(max(n_panels, 1) / ncols)
    fig = Figure(figsize=(panel_size[0] * ncols + LEGEND_WIDTH, panel_size[1] * nrows + 0.6),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, list(axes[:n_panels])


def _style_axes(ax, title: str, xlabel: str, ylabel: str, batches=None) -> None:
    """Labels and grid; with `batches`, a log2 batch axis ticked at the batches, large on the
    left and small on the right as in the Group Norm paper's Figure 1."""
    from matplotlib.ticker import MaxNLocator, NullLocator

    if batches is not None:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_minor_locator(NullLocator())
        batches = sorted(batches)
        if batches:
            ax.set_xticks(batches, [f"{b:g}" for b in batches])
            ax.set_xlim(max(batches) * 1.3, min(batches) / 1.3)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize="medium")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def _finish(fig, axes, title: str, protocol: str) -> None:
    """One legend for the whole figure, outside the panels; title plus the protocol line."""
    handles: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside right center", fontsize="small",
                   frameon=False)
    width_chars = int((fig.get_figwidth() - LEGEND_WIDTH) * 14)
    protocol_text = textwrap.fill(f"Protocol: {protocol}", width=max(width_chars, 60))
    fig.suptitle(f"{title}\n{protocol_text}", fontsize="medium")


def _offsets(n_lines: int, step: float, max_total: float) -> list[float]:
    """Symmetric sideways nudges for n lines, so lines with equal values stay visible."""
    if n_lines <= 1:
        return [0.0] * n_lines
    step = min(step, max_total / (n_lines - 1))
    return [(k - (n_lines - 1) / 2) * step for k in range(n_lines)]


def _draw_line(ax, x, y, *, norm: str, label: str, linestyle, style: NormStyle, markevery=None) -> str:
    """A norm's line in its colour and marker (hollow for a norm with non-default options)."""
    has_options = norm != base_norm(norm)
    ax.plot(x, y, label=label, color=style.color, marker=style.marker, linestyle=linestyle,
            markerfacecolor="white" if has_options else style.color, markersize=6, linewidth=1.5,
            markevery=markevery)
    return style.color


def _one_lr_per_setting(table: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Rows to plot: one per setting. Without --select-best, the lr with the best mean test
    accuracy is plotted (and the figure says so) when a setting was run at several lrs."""
    if "lr_selected" in table.columns:
        return table.rename(columns={"lr_selected": "lr"}), "lr chosen by validation accuracy"
    per_setting = table.groupby(setting_keys(table_setting_columns(table)), dropna=False, sort=False)
    if per_setting.ngroups == len(table):
        return table, ""
    best_index = per_setting["test_acc_mean"].apply(
        lambda accs: accs.idxmax() if accs.notna().any() else accs.index[0])
    return table.loc[list(best_index)], "best lr per point by test acc"


def _setting_text(values: dict, settings: list[str]) -> str:
    """How a panel's settings differ from the others', e.g. "epochs=2, data.subset=2000"."""
    return ", ".join(f"{key}={format_setting(values[key])}" for key in settings)


def _secondary_styles(keys: list[tuple]) -> dict[tuple, object]:
    """A line style per distinct secondary key (options, placement, virtual batch), in order."""
    distinct = list(dict.fromkeys(keys))
    return {key: LINESTYLES[i % len(LINESTYLES)] for i, key in enumerate(distinct)}


def _matches(column: pd.Series, value) -> np.ndarray:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return column.isna().to_numpy()
    return (column == value).fillna(False).to_numpy(dtype=bool)


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------

def _flat_across(run: pd.DataFrame, batches: list) -> pd.DataFrame:
    """A batch-independent norm's one run, repeated at each normalization batch of the sweep: its
    result holds at every one of them, a flat line as in the Group Norm paper's Figure 1."""
    return run.loc[run.index.repeat(len(batches))].assign(x=batches)


def _spread_batch_independent(lines: list[tuple]) -> list[tuple]:
    """In an emulated per-device sweep (virtual batches at one SGD batch), a batch-independent norm
    is one run whose error holds at every per-device batch: draw it as a flat line across them, as
    the Group Norm paper's Figure 1 does, instead of one point at the SGD batch."""
    virtual = [(secondary, line) for secondary, _, _, line in lines if secondary[2] is not None]
    if not virtual:
        return lines
    sgd_batches = {secondary[2] for secondary, _ in virtual}
    per_device = sorted({x for _, line in virtual for x in line["x"]})
    spread = []
    for secondary, norm, label, line in lines:
        if line["norm_batch"].isna().all() and len(line) == 1 and int(line["batch_size"].iloc[0]) in sgd_batches:
            line = _flat_across(line, per_device)
            label = label.replace("[batch-independent]", "[batch-independent: one run]")
        spread.append((secondary, norm, label, line))
    return spread


def _share_batch_independent(rows: pd.DataFrame, settings: list[str]) -> pd.DataFrame:
    """A batch-independent norm's run has no value for the settings of batch-dependent norms
    (eval_stats, ...): draw it in every panel of those settings, as the reference it is."""
    for key in (k for k in settings if k in BATCH_STAT_SETTINGS):
        values = [v for v in dict.fromkeys(rows[key]) if not _is_na(v)]
        if not values:
            continue
        missing = rows[key].map(_is_na)
        copies = [rows[missing].assign(**{key: value}) for value in values]
        rows = pd.concat([rows[~missing], *copies], ignore_index=True)
    return rows


def _is_na(value) -> bool:
    return is_missing(value) or value == EMPTY


def _batch_x(rows: pd.DataFrame) -> pd.Series:
    """Where a row sits on a batch axis: its normalization batch, or the SGD batch of a
    batch-independent norm (which has none)."""
    return rows["norm_batch"].fillna(rows["batch_size"]).astype(float)


def plot_error_vs_batch(table: pd.DataFrame, curves: pd.DataFrame, protocol: str):
    """Test error vs normalization batch (log2), one line per norm, one panel per model and
    differing setting."""
    rows, lr_note = _one_lr_per_setting(table)
    rows = rows[rows["n_completed"] > 0].copy()
    settings = table_setting_columns(table)
    rows = _share_batch_independent(rows, settings)
    looks = norm_styles(rows["norm"])
    rows["x"] = _batch_x(rows)
    rows["error"] = 100.0 - rows["test_acc_mean"]
    rows["sgd_batch_if_virtual"] = rows["batch_size"].where(rows["virtual_batch"].notna())
    show_placement = rows["placement"].nunique() > 1
    panel_keys = ["model", *settings]
    line_keys = ["placement", "norm", "sgd_batch_if_virtual", "devices"]
    seeds_text, show_spread = seeds_phrase(rows["n_completed"])

    # Panels (model and differing settings), each with its lines in table order.
    panels = []
    sorted_rows = sort_table(rows, settings)
    for panel_key, panel in (sorted_rows.groupby(panel_keys, dropna=False, sort=False) if len(rows) else []):
        lines = []
        for (placement, norm, sgd_batch, devices), line in panel.groupby(line_keys, dropna=False, sort=False):
            sgd_batch = None if pd.isna(sgd_batch) else int(sgd_batch)
            label = norm + (f" ({placement} act.)" if show_placement else "")
            if sgd_batch is not None:
                label += f", virtual batch (SGD batch {sgd_batch})"
            if devices > 1:
                label += f", {int(devices)} devices"
            if line["norm_batch"].isna().all():
                label += " [batch-independent]"
            secondary = (norm != base_norm(norm), placement, sgd_batch, int(devices))
            lines.append((secondary, norm, label, line.sort_values("x")))
        lines = _spread_batch_independent(lines)
        panel_row = dict(zip(panel_keys, panel_key))
        title = ", ".join(filter(None, [panel_row["model"], _setting_text(panel_row, settings)]))
        batches = sorted({x for *_, line in lines for x in line["x"]})
        panels.append((title, batches, lines))
    styles = _secondary_styles([line[0] for _, _, lines in panels for line in lines])

    fig, axes = _new_figure(max(len(panels), 1))
    if not panels:
        _style_axes(axes[0], "(no completed runs)", BATCH_XLABEL, "test error (%)")
    for ax, (title, batches, lines) in zip(axes, panels):
        for offset, (secondary, norm, label, line) in zip(_offsets(len(lines), step=0.12, max_total=0.6), lines):
            x = line["x"] * 2.0 ** offset  # nudged sideways on the log2 axis
            color = _draw_line(ax, x, line["error"], norm=norm, label=label, linestyle=styles[secondary],
                               style=looks[norm])
            spread = line["n_completed"] > 1
            if show_spread and spread.any():
                ax.errorbar(x[spread], line["error"][spread], yerr=line["test_acc_std"][spread], fmt="none",
                            ecolor=color, capsize=3, linewidth=1)
        _style_axes(ax, title, BATCH_XLABEL, "test error (%)", batches=batches)
    title = f"Test error vs normalization batch ({seeds_text})"
    _finish(fig, axes, title + (f"; {lr_note}" if lr_note else ""), protocol)
    return fig


def plot_curves(table: pd.DataFrame, curves: pd.DataFrame, protocol: str, *, metric: str, ylabel: str):
    """`metric` per epoch (mean over seeds, ± std band over several), one panel per SGD batch
    (and model / differing setting), one line per norm."""
    rows, lr_note = _one_lr_per_setting(table)
    settings = table_setting_columns(table)
    keys = [*setting_keys(settings), "lr"]
    looks = norm_styles(rows["norm"])
    plotted = curves.dropna(subset=[metric]) if metric in curves.columns else curves.iloc[0:0]
    show_placement = rows["placement"].nunique() > 1
    several_models = rows["model"].nunique() > 1

    # (panel key, line key, label, per-epoch mean/std/count) in table order
    lines = []
    for row in sort_table(rows, settings).to_dict("records"):  # dicts: keys like data.subset
        mask = np.logical_and.reduce([_matches(plotted[key], row[key]) for key in keys])
        per_epoch = plotted[mask].groupby("epoch")[metric].agg(["mean", "std", "count"])
        if per_epoch.empty:
            continue
        norm, virtual_batch = row["norm"], row["virtual_batch"]
        label = norm + (f" ({row['placement']} act.)" if show_placement else "")
        if not pd.isna(virtual_batch):
            label += f" (norm batch {virtual_batch})"
        panel = (row["model"], *(row[key] for key in settings), int(row["batch_size"]), int(row["devices"]))
        secondary = (norm != base_norm(norm), row["placement"],
                     None if pd.isna(virtual_batch) else int(virtual_batch))
        lines.append((panel, secondary, norm, label, per_epoch))

    seeds_text, show_spread = seeds_phrase(line[4]["count"].max() for line in lines)
    # Panels: model and settings in table order, batch descending within them.
    panels = _panel_order([line[0] for line in lines])
    styles = _secondary_styles([line[1] for line in lines])
    fig, axes = _new_figure(max(len(panels), 1))
    if not panels:
        _style_axes(axes[0], "no completed runs", "epoch", ylabel)
    epochs = plotted["epoch"] if len(plotted) else pd.Series([1.0])
    first_epoch, last_epoch = float(epochs.min()), float(epochs.max())
    span = max(last_epoch - first_epoch, 1.0)
    pad = max(0.5, 0.04 * span)  # room for the nudged lines, also when there is one epoch
    for ax, panel in zip(axes, panels):
        panel_lines = [line for line in lines if line[0] == panel]
        for offset, (_, secondary, norm, label, per_epoch) in zip(
                _offsets(len(panel_lines), step=0.025 * span, max_total=min(0.15 * span, 0.5)), panel_lines):
            x = per_epoch.index.to_numpy(dtype=float) + offset
            markevery = max(1, math.ceil(len(x) / 15))
            color = _draw_line(ax, x, per_epoch["mean"], norm=norm, label=label,
                               linestyle=styles[secondary], style=looks[norm], markevery=markevery)
            spread = per_epoch["count"] > 1
            if show_spread and spread.any():
                mean, std = per_epoch["mean"][spread], per_epoch["std"][spread]
                ax.fill_between(x[spread.to_numpy()], mean - std, mean + std, color=color, alpha=0.15,
                                linewidth=0)
        model, *setting_values = panel[:-2]
        batch, devices = panel[-2:]
        title = f"SGD batch {batch}" + (f" × {devices} devices" if devices > 1 else "")
        extra = [model if several_models else "", _setting_text(dict(zip(settings, setting_values)), settings)]
        title = ", ".join(filter(None, [title, *extra]))
        _style_axes(ax, title, "epoch", ylabel)
        ax.set_xlim(first_epoch - pad, last_epoch + pad)
    title = f"{ylabel[0].upper()}{ylabel[1:]} per epoch by normalization ({seeds_text}), one panel per SGD batch"
    _finish(fig, axes, title + (f"; {lr_note}" if lr_note else ""), protocol)
    return fig


def _panel_order(panel_keys: list[tuple]) -> list[tuple]:
    """Distinct panels: model and settings in table order, SGD batch descending within them."""
    distinct = list(dict.fromkeys(panel_keys))
    group_order = list(dict.fromkeys(p[:-2] for p in distinct))
    return sorted(distinct, key=lambda p: (group_order.index(p[:-2]), -p[-2], p[-1]))

# The three errors of issue 12: (key of the table's mean, label, colour, marker, line style).
GAP_LINES = [
    ("gap_train_batchstats_acc_mean", "(1) train error, mini-batch statistics", "#1b9e77", "o", "-"),
    ("gap_test_batchstats_acc_mean", "(2) test error, mini-batch statistics", "#d95f02", "s", "--"),
    ("gap_test_popstats_acc_mean", "(3) test error, population statistics", "#7570b3", "^", "-"),
]


def plot_train_eval_gap(table: pd.DataFrame, curves: pd.DataFrame, protocol: str):
    """Training vs inference statistics in the style of Wu & Johnson 2021 ("Rethinking 'Batch' in
    BatchNorm"): error vs normalization batch (log2), one line per error type (train with mini-batch statistics, test with
    mini-batch statistics, test with population statistics), one panel per norm (and model and
    differing setting). A batch-independent norm's (2) and (3) coincide; it is drawn flat across the
    normalization batches of the panels' sweep, as in error_vs_batch."""
    rows, lr_note = _one_lr_per_setting(table)
    rows = rows[rows["n_completed"] > 0].copy()
    settings = table_setting_columns(table)
    present = [line for line in GAP_LINES if line[0] in rows.columns and rows[line[0]].notna().any()]
    rows["x"] = _batch_x(rows)
    seeds_text, show_spread = seeds_phrase(rows["n_completed"])
    virtual = rows[rows["virtual_batch"].notna()]
    per_device = sorted(set(virtual["x"])) if len(virtual) else []
    panel_keys = ["model", *settings, "placement", "norm", "devices"]
    panels = []
    for key, panel in (sort_table(rows, settings).groupby(panel_keys, dropna=False, sort=False) if len(rows) else []):
        panel = panel.sort_values("x")
        independent = panel["norm_batch"].isna().all()
        if independent and per_device and len(panel) == 1:  # one run, drawn at every normalization batch
            panel = _flat_across(panel, per_device)
        row = dict(zip(panel_keys, key))
        title = ", ".join(filter(None, [row["norm"] + (" [batch-independent]" if independent else ""),
                                        row["model"], _setting_text(row, settings)]))
        panels.append((title, panel))
    fig, axes = _new_figure(max(len(panels), 1))
    if not panels or not present:
        _style_axes(axes[0], "(no run with the three errors)", BATCH_XLABEL, "error (%)")
    for ax, (title, panel) in zip(axes, panels if present else []):
        for offset, (key, label, color, marker, style) in zip(_offsets(len(present), 0.06, 0.2), present):
            x = panel["x"] * 2.0 ** offset
            ax.plot(x, 100.0 - panel[key], color=color, marker=marker, linestyle=style, label=label)
            spread = (panel["n_completed"] > 1) & panel[key.replace("_mean", "_std")].notna()
            if show_spread and spread.any():
                ax.errorbar(x[spread], 100.0 - panel[key][spread], yerr=panel[key.replace("_mean", "_std")][spread],
                            fmt="none", ecolor=color, capsize=3, linewidth=1)
        _style_axes(ax, title, BATCH_XLABEL, "error (%)", batches=sorted(set(panel["x"])))
    title = f"Training vs inference statistics: three errors vs normalization batch ({seeds_text})"
    _finish(fig, axes, title + (f"; {lr_note}" if lr_note else ""), protocol)
    return fig


@dataclass(frozen=True)
class FigureSpec:
    file_name: str
    draw: Callable  # (table, curves, protocol) -> matplotlib Figure
    shows: str


FIGURES: dict[str, FigureSpec] = {
    "error_vs_batch": FigureSpec(
        "error_vs_batch.png", plot_error_vs_batch,
        "test error vs normalization batch (log2), one line per norm, one panel per model and experiment"),
    "train_eval_gap": FigureSpec(
        "train_eval_gap.png", plot_train_eval_gap,
        "train error with mini-batch statistics, test error with mini-batch and with population statistics vs "
        "normalization batch (log2), one line per error, one panel per norm"),
    "curves_test_acc": FigureSpec(
        "curves_test_acc.png", partial(plot_curves, metric="test_acc", ylabel="test accuracy (%)"),
        "test accuracy per epoch, one line per norm, one panel per SGD batch and experiment"),
    "curves_train_loss": FigureSpec(
        "curves_train_loss.png", partial(plot_curves, metric="train_loss", ylabel="train loss"),
        "train loss per epoch, one line per norm, one panel per SGD batch and experiment"),
}
