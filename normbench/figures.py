"""The report's figures, drawn from the aggregated table and the per-epoch curves.

``FIGURES`` is the one list of figures (name -> file name, drawing function, what it shows); the
report writes each of them and the tests read the same table. A drawing function takes
``(table, curves, protocol)`` and returns a matplotlib Figure on the Agg canvas (no pyplot, no
global backend change).

Every norm has one colour and one marker in every figure of every report (``norm_style``); lines of
one norm in one panel (its normalization batches, options) differ in line style, never two alike.
Every panel has a title of its own that says what sets it apart (model, setting, placement, SGD
batch, norm), and the panels of one figure, compared side by side, share their y-axis (and, on a
batch axis, their batches). A line joins only batches its arm was measured at: it breaks where the
axis has a batch the arm lacks. Points and lines are means over seeds; the bars and bands around
them span the seeds' lowest to highest value (min-max, as each figure's title says), never a value
no seed had. A batch-independent norm in an emulated per-device sweep is one setting, trained once
per seed: a flat band across the sweep's batches, labelled with its seed count. The legend sits
outside the data, coinciding lines are nudged sideways so neither hides the other, and every figure
states its protocol and how many seeds its points average.
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

from normbench import length
from normbench.collect import BATCH_STAT_SETTINGS
from normbench.table import (
    EMPTY,
    base_norm,
    ci95_half_width,
    format_setting,
    is_missing,
    norm_order,
    seed_values,
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
# Lines of one norm that differ in something else (an option, a virtual batch, an SGD batch): the
# named styles, then dash patterns of their own (linestyle), so no two lines of a panel look alike.
LINESTYLES = ["-", "--", ":", "-."]
MORE_DASHES = [(0, (8, 2)), (0, (1, 4)), (0, (5, 2, 1, 2, 1, 2)), (0, (10, 3, 2, 3)), (0, (2, 2)),
               (0, (12, 2, 2, 2, 2, 2))]

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


def linestyle(index: int):
    """The `index`-th line style: the named ones, then dash patterns, each unlike all before it."""
    if index < len(LINESTYLES):
        return LINESTYLES[index]
    index -= len(LINESTYLES)
    if index < len(MORE_DASHES):
        return MORE_DASHES[index]
    index -= len(MORE_DASHES)
    return (0, (3 + index, 2, *(1, 2) * (1 + index % 3)))  # a dash of its own length, then dots


SPREAD_TEXT = "min–max over the seeds"
CI_TEXT = "95% CI of the mean (the seeds' own values not recorded)"


def seeds_phrase(seed_counts, spread: str = "bars", what: str = SPREAD_TEXT) -> tuple[str, bool]:
    """What the points average and what their `spread` (bars, bands) spans (`what`: the seeds'
    lowest to highest value, or the CI of the mean), for a title, and whether to draw the spread
    (only over >1 seed). Never mean ± std: it can reach below the lowest seed or above the highest."""
    counts = sorted({int(n) for n in seed_counts if n > 0})
    if not counts or counts[-1] == 1:
        return "one seed", False
    span = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    return f"mean over {span} seeds; {spread}: {what}", True


def _seeds_count_text(n: int) -> str:
    return "one seed" if n == 1 else f"{n} seeds"


# --------------------------------------------------------------------------------------------
# Shared drawing helpers
# --------------------------------------------------------------------------------------------

LEGEND_WIDTH = 2.6  # inches to the right of the panels
MAX_COLUMNS = 4  # panels in a row; 5 where each row is one group (five norms, one placement)
BAND_GID = "band"  # the gid of a batch-independent norm's band and of its mean line
PLACEMENT_TEXT = {"before": "norm before the ReLU", "after": "norm after the ReLU"}  # conv-norm-ReLU, conv-ReLU-norm


def _columns(n: int, most: int = MAX_COLUMNS) -> int:
    """Columns for n panels: at most `most`, rows as full as they can be (8 -> 4 + 4)."""
    n = max(n, 1)
    return math.ceil(n / math.ceil(n / most))


def _layout(group_sizes: list[int]) -> tuple[int, int, list[tuple[int, int]]]:
    """(rows, columns, (row, column) of each panel) for groups of panels in order: one row (or
    more) per group where groups hold several panels, so that what differs between groups (a
    placement, a setting) reads down the rows; otherwise the panels fill rows in turn."""
    group_sizes = [size for size in group_sizes if size > 0] or [1]
    if len(group_sizes) == 1 or max(group_sizes) == 1:
        total = sum(group_sizes)
        ncols = _columns(total)
        return math.ceil(total / ncols), ncols, [divmod(i, ncols) for i in range(total)]
    ncols = _columns(max(group_sizes), MAX_COLUMNS + 1)
    positions, row = [], 0
    for size in group_sizes:
        positions += [(row + i // ncols, i % ncols) for i in range(size)]
        row += math.ceil(size / ncols)
    return row, ncols, positions


def _new_figure(group_sizes: list[int]):
    """A Figure on the Agg canvas with one axes per panel (in groups, _layout), all sharing their
    y-axis (the panels are compared), room for a legend. Returns (figure, axes in panel order)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    nrows, ncols, positions = _layout(group_sizes)
    panel_size = (5.0, 3.8) if ncols <= 3 else (4.2, 3.4)
    fig = Figure(figsize=(panel_size[0] * ncols + LEGEND_WIDTH, panel_size[1] * nrows + 0.6),
                 layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    used = set(positions)
    for r in range(nrows):
        for c in range(ncols):
            if (r, c) not in used:
                grid[r, c].set_visible(False)
    return fig, [grid[r, c] for r, c in positions]


def _style_axes(ax, title: str, xlabel: str, ylabel: str, batches=None) -> None:
    """Labels and grid (the y label on the first column: the panels share their y-axis); with
    `batches`, a log2 batch axis ticked at the batches, large on the left and small on the right
    as in the Group Norm paper's Figure 1."""
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
    width_inches = ax.get_position().width * ax.figure.get_figwidth()
    ax.set_title(textwrap.fill(title, width=max(int(width_inches * 11), 30), break_on_hyphens=False),
                 fontsize="medium")
    ax.set_xlabel(xlabel)
    spec = ax.get_subplotspec()
    ax.set_ylabel(ylabel if spec is None or spec.is_first_col() else "")
    ax.grid(True, alpha=0.3)


def _legend_handles(axes) -> dict[str, object]:
    """One legend entry per label, in the order first seen: its handles on the first panel that
    draws it as a line (a band and its mean line together, where it is only ever a band)."""
    found: dict[str, tuple[bool, list]] = {}
    for ax in axes:
        on_ax: dict[str, list] = {}
        for handle, label in zip(*ax.get_legend_handles_labels()):
            on_ax.setdefault(label, []).append(handle)
        for label, handles in on_ax.items():
            band = all(handle.get_gid() == BAND_GID for handle in handles)
            if label not in found or (found[label][0] and not band):
                found[label] = (band, handles)
    return {label: handles[0] if len(handles) == 1 else tuple(handles) for label, (_, handles) in found.items()}


def _finish(fig, axes, title: str, protocol: str) -> None:
    """One legend for the whole figure, outside the panels; title plus the protocol line."""
    handles = _legend_handles(axes)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside right center", fontsize="small",
                   frameon=False)
    width_chars = int(fig.get_figwidth() * 14)
    text = textwrap.fill(title, width=max(width_chars, 60), break_on_hyphens=False)
    protocol_text = textwrap.fill(f"Protocol: {protocol}", width=max(width_chars, 60), break_on_hyphens=False)
    fig.suptitle(f"{text}\n{protocol_text}", fontsize="medium")


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


def _draw_band(ax, span: list, mean: float, low: float, high: float, *, label: str, color: str, marker,
               linestyle, hollow: bool = False) -> None:
    """One setting's result that holds at every batch of `span` (a batch-independent norm in an
    emulated per-device sweep): its mean as a flat line without markers (no batch of the span was
    a run of its own) over a band from `low` to `high` (its spread over seeds; none where NaN)."""
    xs = [max(span), min(span)]
    if not (pd.isna(low) or pd.isna(high)):
        ax.fill_between(xs, [low] * 2, [high] * 2, color=color, alpha=0.15, linewidth=0, label=label,
                        gid=BAND_GID)
    ax.plot(xs, [mean, mean], label=label, color=color, marker=marker, markevery=[], linestyle=linestyle,
            markerfacecolor="white" if hollow else color, markersize=6, linewidth=1.5, gid=BAND_GID)


def _shared_ylim(axes, low: float, high: float, bands: list[tuple[float, float]]) -> None:
    """One y range for the panels (they share it): the lines' means from `low` to `high`, and the
    bands as far as half that range again beyond them; a band reaching further (one seed that
    diverged for a while) runs off the axis, and its panel says how far it goes."""
    reach = 0.5 * max(high - low, 1e-9)
    band_low = min([b[0] for b in bands], default=np.inf)
    band_high = max([b[1] for b in bands], default=-np.inf)
    bottom, top = max(min(low, band_low), low - reach), min(max(high, band_high), high + reach)
    margin = 0.05 * max(top - bottom, 1e-9)
    axes[0].set_ylim(bottom - margin, top + margin)
    for ax, (lo, hi) in zip(axes, bands):
        notes = ([f"band up to {hi:.3g} (off the axis)"] if hi > top + margin else []) + \
                ([f"band down to {lo:.3g} (off the axis)"] if lo < bottom - margin else [])
        if notes:
            ax.text(0.02, 0.98, "\n".join(notes), transform=ax.transAxes, ha="left", va="top", fontsize="small",
                    bbox={"facecolor": "white", "edgecolor": "0.7", "alpha": 0.9})


def _interleaved(means: list[float], y_span: float, styles: list) -> list:
    """Line styles for flat band lines at `means`: their own `styles`, but lines that (nearly)
    coincide, within 1% of the y span, get interleaved dashes instead, so that each shows between
    the others' dashes (coinciding markers are nudged sideways; a band holds at every batch)."""
    order = sorted(range(len(means)), key=lambda i: means[i])
    clusters: list[list[int]] = []
    for i in order:
        if clusters and means[i] - means[clusters[-1][-1]] <= 0.01 * max(y_span, 1e-9):
            clusters[-1].append(i)
        else:
            clusters.append([i])
    result = list(styles)
    dash = 5.0
    for cluster in (c for c in clusters if len(c) > 1):
        for k, i in enumerate(cluster):
            result[i] = (k * dash, (dash, dash * (len(cluster) - 1)))
    return result


def _bars(ax, x, mean, low, high, color: str) -> None:
    """Error bars from `low` to `high` around each point (_spread_bounds; none where NaN)."""
    x, mean, low, high = (np.asarray(v, dtype=float) for v in (x, mean, low, high))
    keep = ~(np.isnan(x) | np.isnan(mean) | np.isnan(low) | np.isnan(high))
    if keep.any():
        ax.errorbar(x[keep], mean[keep], yerr=[(mean - low)[keep], (high - mean)[keep]], fmt="none",
                    ecolor=color, capsize=3, linewidth=1)


def _several(mean, n) -> list[bool]:
    return [k > 1 and not pd.isna(m) for m, k in zip(mean, n)]


def _all_seeds_known(mean, n, seeds: list) -> bool:
    """Whether every row of several seeds has each of its seeds' values in `seeds`."""
    return all(len(v) == int(k) for v, k, several in zip(seeds, n, _several(mean, n)) if several)


def _spread_bounds(mean: pd.Series, std: pd.Series, n: pd.Series, seeds: list,
                   ci: bool | None = None) -> tuple[list, list, str]:
    """Per row, the spread to draw around `mean` and what it is: each row's lowest to highest seed
    where every row of several seeds has all its seeds' values (`seeds`), else (the per-seed values
    were not recorded; or with `ci`) the 95% CI of the mean from its std; NaN for a row of one
    seed. Either way no bar or band spans more than the seeds support (a CI is about the mean, and
    says so)."""
    several = _several(mean, n)
    if (_all_seeds_known(mean, n, seeds) if ci is None else not ci):
        low = [float(np.min(v)) if s else np.nan for v, s in zip(seeds, several)]
        high = [float(np.max(v)) if s else np.nan for v, s in zip(seeds, several)]
        return low, high, SPREAD_TEXT
    half = [ci95_half_width(sd, int(k)) if s else np.nan for sd, k, s in zip(std, n, several)]
    return [m - h for m, h in zip(mean, half)], [m + h for m, h in zip(mean, half)], CI_TEXT


def _break_gaps(line: pd.DataFrame, batches) -> pd.DataFrame:
    """`line` (sorted by x) with a row of NaN wherever the axis has a batch between two of its
    points that it lacks: the line breaks there instead of joining batches across one it never
    measured."""
    xs = list(line["x"])
    pieces, start = [], 0
    for i in range(1, len(xs)):
        lo, hi = sorted((xs[i - 1], xs[i]))
        if any(lo < b < hi for b in batches):
            pieces += [line.iloc[start:i], pd.DataFrame({"x": [np.nan]})]
            start = i
    if not pieces:
        return line
    return pd.concat([*pieces, line.iloc[start:]], ignore_index=True)


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
    """How a panel's settings differ from the others', e.g. "epochs=2, data.subset=2000" (a setting
    the panel has no value of is left out)."""
    return ", ".join(f"{key}={format_setting(values[key])}" for key in settings if not _is_na(values[key]))


def _group_text(values: dict, settings: list[str], *, model: bool, placement: bool) -> str:
    """What sets a group of panels apart: model, differing settings, placement."""
    parts = [values["model"] if model else "", _setting_text(values, settings),
             PLACEMENT_TEXT.get(values["placement"], f"placement={values['placement']}") if placement else ""]
    return ", ".join(filter(None, parts))


def _unique(titles: list[str]) -> list[str]:
    """Titles as they are, but a title two panels would share gets the panel's number."""
    counts = {title: titles.count(title) for title in titles}
    return [f"{title} (panel {i + 1})" if counts[title] > 1 else title for i, title in enumerate(titles)]


def _secondary_styles(keys: list[tuple]) -> dict[tuple, object]:
    """A line style per distinct secondary key (options, virtual batch, SGD batch), in order, no
    two alike (linestyle)."""
    distinct = list(dict.fromkeys(keys))
    return {key: linestyle(i) for i, key in enumerate(distinct)}


def _secondary_order(key: tuple) -> tuple:
    """Secondary keys (options label, batch or None, ...): no options first, no batch (plain runs,
    batch-independent norms) first, then batches large to small."""
    options, batch, *rest = key
    return (options, batch is not None, -(batch or 0), *rest)


def _matches(column: pd.Series, value) -> np.ndarray:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return column.isna().to_numpy()
    return (column == value).fillna(False).to_numpy(dtype=bool)


def _final_values(rows: pd.DataFrame, curves: pd.DataFrame, metric: str, keys: list[str]) -> list[np.ndarray]:
    """For each row, `metric` at the last epoch of each of its seeds' runs (the numbers the
    table's mean averages)."""
    if metric not in curves.columns or curves.empty or not len(rows):
        return [np.array([])] * len(rows)
    last = curves.sort_values("epoch", kind="stable").groupby("path", sort=False).tail(1)
    values = []
    for row in rows.to_dict("records"):
        mask = np.logical_and.reduce([_matches(last[key], row[key]) for key in keys])
        values.append(last.loc[mask, metric].dropna().to_numpy(dtype=float))
    return values


def _seed_errors(rows: pd.DataFrame) -> list[np.ndarray]:
    """Each row's test error (%) of each completed seed (the table's seed_test_acc)."""
    if "seed_test_acc" not in rows.columns:
        return [np.array([])] * len(rows)
    return [100.0 - np.array(list(seed_values(text).values()), dtype=float) for text in rows["seed_test_acc"]]


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------

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


def _band_span(rows: pd.DataFrame, candidate: pd.DataFrame) -> list[float]:
    """The per-device batches a batch-independent norm's one run holds at, as a flat band: those of
    the emulated per-device sweep (virtual batches at its SGD batch) among `rows`, the runs of its
    panel or group; none where it is no such one run."""
    virtual = rows[rows["virtual_batch"].notna()]
    if (virtual.empty or len(candidate) != 1 or not candidate["norm_batch"].isna().all()
            or int(candidate["batch_size"].iloc[0]) not in set(virtual["batch_size"].astype(int))):
        return []
    return sorted(set(virtual["x"]))


def _band_label(norm: str, n_seeds: int) -> str:
    return f"{norm} [batch-independent: one setting, {_seeds_count_text(n_seeds)}]"


def plot_error_vs_batch(table: pd.DataFrame, curves: pd.DataFrame, protocol: str):
    """Test error vs normalization batch (log2), one line per norm (a band for a batch-independent
    norm's one setting in an emulated per-device sweep), one panel per model, differing setting and
    placement, bars from the lowest to the highest seed."""
    rows, lr_note = _one_lr_per_setting(table)
    rows = rows[rows["n_completed"] > 0].copy()
    settings = table_setting_columns(table)
    rows["error"] = 100.0 - rows["test_acc_mean"]
    rows["error_low"], rows["error_high"], spread_text = _spread_bounds(
        rows["error"], rows["test_acc_std"], rows["n_completed"], _seed_errors(rows))
    rows = _share_batch_independent(rows, settings)
    looks = norm_styles(rows["norm"])
    rows["x"] = _batch_x(rows)
    rows["sgd_batch_if_virtual"] = rows["batch_size"].where(rows["virtual_batch"].notna())
    several_placements = rows["placement"].nunique() > 1
    panel_keys = ["model", *settings, "placement"]
    line_keys = ["norm", "sgd_batch_if_virtual", "devices"]

    # Panels (model, differing settings, placement), each with its lines in table order.
    panels = []
    sorted_rows = sort_table(rows, settings)
    for panel_key, panel in (sorted_rows.groupby(panel_keys, dropna=False, sort=False) if len(rows) else []):
        lines = []
        for (norm, sgd_batch, devices), line in panel.groupby(line_keys, dropna=False, sort=False):
            sgd_batch = None if pd.isna(sgd_batch) else int(sgd_batch)
            label = norm
            if sgd_batch is not None:
                label += f", virtual batch (SGD batch {sgd_batch})"
            if devices > 1:
                label += f", {int(devices)} devices"
            span = _band_span(panel, line)
            if span:
                label = _band_label(label, int(line["n_completed"].iloc[0]))
            elif line["norm_batch"].isna().all():
                label += " [batch-independent]"
            secondary = (norm if norm != base_norm(norm) else "", sgd_batch, int(devices))
            lines.append({"secondary": secondary, "norm": norm, "label": label, "rows": line.sort_values("x"),
                          "span": span})
        title = _group_text(dict(zip(panel_keys, panel_key)), settings, model=True, placement=several_placements)
        panels.append((title, lines))
    styles = _secondary_styles(sorted({line["secondary"] for _, lines in panels for line in lines},
                                      key=_secondary_order))
    batches = sorted({x for _, lines in panels for line in lines for x in (line["span"] or line["rows"]["x"])})
    any_band = any(line["span"] for _, lines in panels for line in lines)
    seeds_text, show_spread = seeds_phrase(rows["n_completed"], "bars and bands" if any_band else "bars",
                                           spread_text)
    errors = rows["error"].dropna()
    error_span = float(errors.max() - errors.min()) if len(errors) else 1.0
    fig, axes = _new_figure([1] * max(len(panels), 1))
    if not panels:
        _style_axes(axes[0], "(no completed runs)", BATCH_XLABEL, "test error (%)")
    for ax, title, (_, lines) in zip(axes, _unique([title for title, _ in panels]), panels):
        measured = [line for line in lines if not line["span"]]
        for offset, line in zip(_offsets(len(measured), step=0.12, max_total=0.6), measured):
            data = _break_gaps(line["rows"], batches)
            x = data["x"] * 2.0 ** offset  # nudged sideways on the log2 axis
            color = _draw_line(ax, x, data["error"], norm=line["norm"], label=line["label"],
                               linestyle=styles[line["secondary"]], style=looks[line["norm"]])
            if show_spread:
                _bars(ax, x, data["error"], data["error_low"], data["error_high"], color)
        banded = [line for line in lines if line["span"]]
        band_styles = _interleaved([line["rows"]["error"].iloc[0] for line in banded], error_span,
                                   [styles[line["secondary"]] for line in banded])
        for line, band_style in zip(banded, band_styles):
            row = line["rows"].iloc[0]
            look = looks[line["norm"]]
            _draw_band(ax, line["span"], row["error"], row["error_low"] if show_spread else np.nan,
                       row["error_high"] if show_spread else np.nan, label=line["label"], color=look.color,
                       marker=look.marker, linestyle=band_style, hollow=line["norm"] != base_norm(line["norm"]))
        _style_axes(ax, title, BATCH_XLABEL, "test error (%)", batches=batches)
    title = f"Test error vs normalization batch ({seeds_text})"
    _finish(fig, axes, title + (f"; {lr_note}" if lr_note else ""), protocol)
    return fig


OWN_PANEL_LINES = 3  # a norm with this many lines in a panel (normalization batches) gets a panel of its own


def _panel_order(panel_keys: list[tuple]) -> list[tuple]:
    """Distinct panels (group..., SGD batch, devices, subject): model, settings and placement in
    table order, SGD batch descending within them, then devices, subjects in table order."""
    distinct = list(dict.fromkeys(panel_keys))
    group_order = list(dict.fromkeys(p[:-3] for p in distinct))
    subject_order = list(dict.fromkeys(p[-1] for p in distinct))
    return sorted(distinct, key=lambda p: (group_order.index(p[:-3]), -p[-3], p[-2], subject_order.index(p[-1])))


def _subjects(lines: list[tuple]) -> list[str]:
    """For each line (panel key, ..., norm, ...), the norm whose own panel it goes to ("" for the
    panel of the others): a norm with OWN_PANEL_LINES or more lines in its panel (bn at five
    normalization batches) gets one, so no panel holds more line styles of one colour than can be
    told apart at a glance (the Group Norm paper's curves are one panel per norm, too)."""
    counts: dict[tuple, int] = {}
    for panel, _, norm, *_ in lines:
        counts[panel, norm] = counts.get((panel, norm), 0) + 1
    return [norm if counts[panel, norm] >= OWN_PANEL_LINES else "" for panel, _, norm, *_ in lines]


def plot_curves(table: pd.DataFrame, curves: pd.DataFrame, protocol: str, *, metric: str, ylabel: str):
    """`metric` per epoch (mean over seeds, a band from the lowest to the highest seed over several),
    one panel per SGD batch (and model / differing setting / placement), one line per norm and
    normalization batch; a norm with several normalization batches in a panel gets its own."""
    rows, lr_note = _one_lr_per_setting(table)
    settings = table_setting_columns(table)
    keys = [*setting_keys(settings), "lr"]
    looks = norm_styles(rows["norm"])
    plotted = curves.dropna(subset=[metric]) if metric in curves.columns else curves.iloc[0:0]
    several_placements = rows["placement"].nunique() > 1
    several_models = rows["model"].nunique() > 1
    rows = rows.assign(match=pd.Series([dict(zip(keys, values)) for values in rows[keys].itertuples(index=False)],
                                       index=rows.index, dtype=object))
    rows = sort_table(_share_batch_independent(rows, settings), settings)

    # (panel key, line key, norm, label, per-epoch mean/min/max/count) in table order
    lines = []
    for row in rows.to_dict("records"):  # dicts: keys like data.subset
        match = row["match"]  # the row's own values (a shared batch-independent row has none of eval_stats)
        mask = np.logical_and.reduce([_matches(plotted[key], match[key]) for key in keys])
        per_epoch = plotted[mask].groupby("epoch")[metric].agg(["mean", "min", "max", "count"])
        if per_epoch.empty:
            continue
        norm, virtual_batch = row["norm"], row["virtual_batch"]
        virtual_batch = None if pd.isna(virtual_batch) else int(virtual_batch)
        label = norm + (f" (norm batch {virtual_batch})" if virtual_batch is not None else "")
        panel = (row["model"], *(row[key] for key in settings), row["placement"], int(row["batch_size"]),
                 int(row["devices"]))
        secondary = (norm if norm != base_norm(norm) else "", virtual_batch)
        lines.append((panel, secondary, norm, label, per_epoch))
    lines = [((*line[0], subject), *line[1:]) for line, subject in zip(lines, _subjects(lines))]
    split = any(line[0][-1] for line in lines)

    seeds_text, show_spread = seeds_phrase((line[4]["count"].max() for line in lines), "bands")
    # Panels: model, settings and placement in table order, batch descending within them.
    panels = _panel_order([line[0] for line in lines])
    styles = _secondary_styles(sorted({line[1] for line in lines}, key=_secondary_order))
    groups = list(dict.fromkeys(panel[:-3] for panel in panels))
    fig, axes = _new_figure([sum(1 for p in panels if p[:-3] == group) for group in groups] or [1])
    if not panels:
        _style_axes(axes[0], "no completed runs", "epoch", ylabel)
    epochs = plotted["epoch"] if len(plotted) else pd.Series([1.0])
    first_epoch, last_epoch = float(epochs.min()), float(epochs.max())
    span = max(last_epoch - first_epoch, 1.0)
    pad = max(0.5, 0.04 * span)  # room for the nudged lines, also when there is one epoch
    titles = []
    for panel in panels:
        model, *setting_values, placement = panel[:-3]
        batch, devices, subject = panel[-3:]
        title = f"SGD batch {batch}" + (f" × {devices} devices" if devices > 1 else "")
        group = _group_text({"model": model, "placement": placement, **dict(zip(settings, setting_values))},
                            settings, model=several_models, placement=several_placements)
        what = f"{subject} at each normalization batch" if subject else "the other norms" if split else ""
        titles.append(", ".join(filter(None, [title, group, what])))
    means, bands = [], []  # every line's means; each panel's lowest and highest band edge
    for ax, panel, title in zip(axes, panels, _unique(titles)):
        panel_lines = [line for line in lines if line[0] == panel]
        bands.append((np.inf, -np.inf))
        for offset, (_, secondary, norm, label, per_epoch) in zip(
                _offsets(len(panel_lines), step=0.025 * span, max_total=min(0.15 * span, 0.5)), panel_lines):
            x = per_epoch.index.to_numpy(dtype=float) + offset
            markevery = max(1, math.ceil(len(x) / 15))
            color = _draw_line(ax, x, per_epoch["mean"], norm=norm, label=label,
                               linestyle=styles[secondary], style=looks[norm], markevery=markevery)
            means += list(per_epoch["mean"])
            spread = (per_epoch["count"] > 1).to_numpy()
            if show_spread and spread.any():
                ax.fill_between(x[spread], per_epoch["min"][spread], per_epoch["max"][spread], color=color,
                                alpha=0.15, linewidth=0)
                bands[-1] = (min(bands[-1][0], per_epoch["min"][spread].min()),
                             max(bands[-1][1], per_epoch["max"][spread].max()))
        _style_axes(ax, title, "epoch", ylabel)
        ax.set_xlim(first_epoch - pad, last_epoch + pad)
    if means:
        _shared_ylim(axes, min(means), max(means), bands)
    title = f"{ylabel[0].upper()}{ylabel[1:]} per epoch by normalization ({seeds_text})"
    _finish(fig, axes, title + (f"; {lr_note}" if lr_note else ""), protocol)
    return fig


# The three errors of issue 12: (key of the table's mean, label, colour, marker, line style).
GAP_LINES = [
    ("gap_train_batchstats_acc_mean", "(1) train error, mini-batch statistics", "#1b9e77", "o", "-"),
    ("gap_test_batchstats_acc_mean", "(2) test error, mini-batch statistics", "#d95f02", "s", "--"),
    ("gap_test_popstats_acc_mean", "(3) test error, population statistics", "#7570b3", "^", "-"),
]
NUMBER_WORDS = {1: "one error", 2: "two errors", 3: "three errors"}


def plot_train_eval_gap(table: pd.DataFrame, curves: pd.DataFrame, protocol: str):
    """Training vs inference statistics in the style of Wu & Johnson 2021 ("Rethinking 'Batch' in
    BatchNorm"): error vs normalization batch (log2), one line per error type the runs recorded
    (train with mini-batch statistics, test with mini-batch statistics, test with population
    statistics), one panel per norm (a row of panels per model, differing setting and placement).
    A batch-independent norm's (2) and (3) coincide; in an emulated per-device sweep its one
    setting is a band across the sweep's normalization batches, as in error_vs_batch."""
    rows, lr_note = _one_lr_per_setting(table)
    rows = rows[rows["n_completed"] > 0].copy()
    settings = table_setting_columns(table)
    keys = [*setting_keys(settings), "lr"]
    present = [line for line in GAP_LINES if line[0] in rows.columns and rows[line[0]].notna().any()]
    seeds = {key: [100.0 - v for v in _final_values(rows, curves, key[: -len("_mean")], keys)]
             for key, *_ in present}  # as errors (%)
    ci = not all(_all_seeds_known(rows[key], rows["n_completed"], seeds[key]) for key in seeds)
    spread_text = CI_TEXT if ci else SPREAD_TEXT  # one kind of spread in the figure
    for key in seeds:  # the mean error and its spread's two ends
        rows[f"{key}_err"] = 100.0 - rows[key]
        rows[f"{key}_err_low"], rows[f"{key}_err_high"], _ = _spread_bounds(
            rows[f"{key}_err"], rows[key.replace("_mean", "_std")], rows["n_completed"], seeds[key], ci=ci)
    rows = _share_batch_independent(rows, settings)
    rows["x"] = _batch_x(rows)
    several_placements = rows["placement"].nunique() > 1
    several_models = rows["model"].nunique() > 1
    group_keys = ["model", *settings, "placement"]
    panel_keys = [*group_keys, "norm", "devices"]
    groups: dict[tuple, list] = {}
    sorted_rows = sort_table(rows, settings)
    for group_key, group in (sorted_rows.groupby(group_keys, dropna=False, sort=False) if len(rows) else []):
        group_text = _group_text(dict(zip(group_keys, group_key)), settings, model=several_models,
                                 placement=several_placements)
        for (norm, devices), panel in group.groupby(["norm", "devices"], dropna=False, sort=False):
            panel = panel.sort_values("x")
            span = _band_span(group, panel)
            name = ", ".join(filter(None, [norm + (f" × {int(devices)} devices" if devices > 1 else ""), group_text]))
            if span:
                name += f" [batch-independent: one setting, {_seeds_count_text(int(panel['n_completed'].iloc[0]))}]"
            elif panel["norm_batch"].isna().all():
                name += " [batch-independent]"
            groups.setdefault(group_key, []).append((name, panel, span))
    panels = [panel for group in groups.values() for panel in group]
    batches = sorted({x for _, panel, span in panels for x in (span or panel["x"])})
    any_band = any(span for *_, span in panels)
    seeds_text, show_spread = seeds_phrase(rows["n_completed"], "bars and bands" if any_band else "bars",
                                           spread_text)
    errors = pd.concat([rows[f"{key}_err"] for key, *_ in present]).dropna() if present else pd.Series([0.0])
    error_span = float(errors.max() - errors.min()) if len(errors) else 1.0
    fig, axes = _new_figure([len(group) for group in groups.values()] or [1])
    if not panels or not present:
        _style_axes(axes[0], "(no run recorded these errors)", BATCH_XLABEL, "error (%)")
    titles = _unique([title for title, *_ in panels])
    for ax, title, (_, panel, span) in zip(axes, titles, panels if present else []):
        if span:
            row = panel.iloc[0]
            band_styles = _interleaved([row[f"{key}_err"] for key, *_ in present], error_span,
                                       [style for *_, style in present])
            for (key, label, color, marker, _), style in zip(present, band_styles):
                _draw_band(ax, span, row[f"{key}_err"], row[f"{key}_err_low"] if show_spread else np.nan,
                           row[f"{key}_err_high"] if show_spread else np.nan, label=label, color=color,
                           marker=marker, linestyle=style)
        else:
            data = _break_gaps(panel, batches)
            for offset, (key, label, color, marker, style) in zip(_offsets(len(present), 0.06, 0.2), present):
                x = data["x"] * 2.0 ** offset
                ax.plot(x, data[f"{key}_err"], color=color, marker=marker, linestyle=style, label=label)
                if show_spread:
                    _bars(ax, x, data[f"{key}_err"], data[f"{key}_err_low"], data[f"{key}_err_high"], color)
        _style_axes(ax, title, BATCH_XLABEL, "error (%)", batches=batches)
    drawn = NUMBER_WORDS.get(len(present), f"{len(present)} errors")
    missing = [label for key, label, *_ in GAP_LINES if all(key != p[0] for p in present)]
    title = f"Training vs inference statistics: {drawn} vs normalization batch ({seeds_text})"
    if present and missing:
        title += f"; not recorded: {', '.join(missing)}"
    _finish(fig, axes, title + (f"; {lr_note}" if lr_note else ""), protocol)
    return fig


LENGTH_XLABEL = "training images (log2 scale)"


def _length_axis(ax, images) -> None:
    """A log2 axis of training images, ticked at the lengths run."""
    from matplotlib.ticker import NullLocator

    ax.set_xscale("log", base=2)
    ax.xaxis.set_minor_locator(NullLocator())
    ticks = sorted({float(v) for v in images})
    ax.set_xticks(ticks, [f"{v / 1000:g}k" if v >= 1000 else f"{v:g}" for v in ticks], rotation=30)
    if ticks:
        ax.set_xlim(min(ticks) / 1.3, max(ticks) * 1.3)


def _length_panels(rows: pd.DataFrame, context: list[str]) -> list[tuple[str, pd.DataFrame]]:
    panels = []
    for key, panel in rows.groupby(context, dropna=False, sort=False):
        values = dict(zip(context, key if isinstance(key, tuple) else (key,)))
        panels.append((" ".join(f"{k}={format_setting(v)}" if k != "model" else str(v) for k, v in values.items()
                                if not is_missing(v)), panel))
    return panels


def plot_length_error(table: pd.DataFrame, curves: pd.DataFrame, protocol: str):
    """Test error vs training length (log2 training images), one line per arm, 95% CI bars over its seeds, one
    panel per model and other differing setting; None for a report of one length."""
    rows = length.length_rows(table)
    if rows.empty:
        return None
    rows = rows[rows["n_completed"] > 0].copy()
    rows["error"] = 100.0 - rows["test_acc_mean"]
    # A panel per model and per other setting that differs (the arms' norms and batches are its lines).
    context = [k for k in length.arm_keys(table) if k == "model" or (
        k not in ("norm", "batch_size", "devices", "virtual_batch") and rows[k].nunique(dropna=False) > 1)]
    panels = _length_panels(rows, context)
    looks = norm_styles(rows["norm"])
    fig, axes = _new_figure([1] * len(panels))
    for ax, (title, panel) in zip(axes, panels):
        arms = list(dict.fromkeys(panel["arm"]))
        for arm in arms:
            line = panel[panel["arm"] == arm].sort_values("train_images")
            norm = line["norm"].iloc[0]
            same_norm = [a for a in arms if panel.loc[panel["arm"] == a, "norm"].iloc[0] == norm]
            color = _draw_line(ax, line["train_images"], line["error"], norm=norm, label=arm,
                               linestyle=linestyle(same_norm.index(arm)), style=looks[norm])
            half = line["test_acc_ci95"]
            _bars(ax, line["train_images"], line["error"], line["error"] - half, line["error"] + half, color)
        _style_axes(ax, title, LENGTH_XLABEL, "test error (%)")
        _length_axis(ax, panel["train_images"])
    seeds = sorted({int(n) for n in rows["n_completed"]})
    seeds_text = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}–{seeds[-1]}"
    _finish(fig, axes, f"Test error vs training length (mean over {seeds_text} seeds; bars: 95% CI of the mean)",
            protocol)
    return fig


def plot_length_gap(table: pd.DataFrame, curves: pd.DataFrame, protocol: str, pair=length.DEFAULT_GAP):
    """The test-accuracy gap of norm pair[0] over pair[1] vs training length (log2 training images), one line per
    arm of pair[0] (its normalization batches), Welch 95% CI bars; None without the pair at two lengths."""
    gaps = length.gap_rows(table, pair)
    if gaps.empty or gaps["train_images"].nunique() < 2:
        return None
    context = [k for k in ("model",) if k in gaps.columns]
    panels = _length_panels(gaps, context)
    look = norm_styles([pair[0]])[pair[0]]
    fig, axes = _new_figure([1] * len(panels))
    for ax, (title, panel) in zip(axes, panels):
        ax.axhline(0.0, color="0.5", linewidth=1)
        for index, ((arm, reference), line) in enumerate(panel.groupby(["arm", "reference"], sort=False)):
            line = line.sort_values("train_images")
            _draw_line(ax, line["train_images"], line["diff"], norm=pair[0], label=f"{arm} − {reference}",
                       linestyle=linestyle(index), style=look)
            _bars(ax, line["train_images"], line["diff"], line["ci_low"], line["ci_high"], look.color)
        _style_axes(ax, title, LENGTH_XLABEL, f"test acc, {pair[0]} − {pair[1]} (points)")
        _length_axis(ax, panel["train_images"])
    _finish(fig, axes, f"Test-accuracy gap of {pair[0]} over {pair[1]} vs training length (bars: Welch 95% CI)",
            protocol)
    return fig


@dataclass(frozen=True)
class FigureSpec:
    file_name: str
    draw: Callable  # (table, curves, protocol) -> matplotlib Figure, or None where the runs lack its axis
    shows: str
    always: bool = True  # drawn for every report (False: only where the runs vary its axis, the length)


FIGURES: dict[str, FigureSpec] = {
    "error_vs_batch": FigureSpec(
        "error_vs_batch.png", plot_error_vs_batch,
        "test error vs normalization batch (log2), one line per norm (a band for a batch-independent norm's one "
        "setting in an emulated per-device sweep), one panel per model, experiment and placement"),
    "train_eval_gap": FigureSpec(
        "train_eval_gap.png", plot_train_eval_gap,
        "train error with mini-batch statistics, test error with mini-batch and with population statistics vs "
        "normalization batch (log2), one line per recorded error, one panel per norm"),
    "curves_test_acc": FigureSpec(
        "curves_test_acc.png", partial(plot_curves, metric="test_acc", ylabel="test accuracy (%)"),
        "test accuracy per epoch, one line per norm and normalization batch, one panel per SGD batch, "
        "experiment and placement"),
    "length_error": FigureSpec(
        "length_error.png", plot_length_error,
        "test error vs training length (log2 training images), one line per arm, 95% CI bars; only where the "
        "runs differ in length", always=False),
    "length_gap": FigureSpec(
        "length_gap.png", plot_length_gap,
        "the test-accuracy gap of BN over GN vs training length, Welch 95% CI bars; only where both ran at "
        "several lengths", always=False),
    "curves_train_loss": FigureSpec(
        "curves_train_loss.png", partial(plot_curves, metric="train_loss", ylabel="train loss"),
        "train loss per epoch, one line per norm and normalization batch, one panel per SGD batch, "
        "experiment and placement"),
}
