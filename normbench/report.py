"""Turn a sweep of run folders into comparison tables and figures.

    normbench-report runs/ [--out DIR] [--target-acc 80] [--select-best lr]

A run folder is any directory holding ``summary.json`` (and ``metrics.csv``), as written by
the trainer. Library use::

    runs = collect_runs(["runs/"])          # one row per run
    table = aggregate(runs, target_acc=80)  # one row per model x placement x norm x batch x lr
    files = write_report(["runs/"], "runs/report")
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from normbench import atomic
from normbench.errors import UserError

PROG = "normbench-report"

# Norms in the order a reader expects to compare them; unknown norms follow alphabetically.
CANONICAL_NORM_ORDER = [
    "none", "bn", "brn", "gn", "ln", "in", "wn", "sn", "gn_ws", "frn", "evonorm_s0", "lrn",
]
PLACEMENT_ORDER = ["before", "after"]

# Keys a summary.json must have for the run to be usable; the others default to null.
REQUIRED_SUMMARY_KEYS = (
    "status", "model", "norm", "batch_size", "norm_batch", "lr", "seed", "test_acc",
)
OPTIONAL_SUMMARY_DEFAULTS = {
    "run_name": None, "reason": None, "placement": "before", "virtual_batch": None,
    "lr_effective": None, "epochs": None, "epochs_done": None, "best_test_acc": None,
    "test_loss": None, "train_loss": None, "train_acc": None, "val_acc": None,
    "best_val_acc": None, "wall_time_s": None, "seconds_per_epoch": None,
    "images_per_s": None, "diverged_step": None, "finished_at": None,
}
NUMERIC_COLUMNS = [
    "lr", "lr_effective", "test_acc", "best_test_acc", "test_loss", "train_loss", "train_acc",
    "val_acc", "best_val_acc", "wall_time_s", "seconds_per_epoch", "images_per_s",
]
INTEGER_COLUMNS = [
    "batch_size", "virtual_batch", "norm_batch", "seed", "epochs", "epochs_done", "diverged_step",
]
RUN_COLUMNS = ["path", *REQUIRED_SUMMARY_KEYS, *OPTIONAL_SUMMARY_DEFAULTS]

FINISHED_STATUSES = ("completed", "failed", "diverged")
REQUIRED_METRICS_COLUMNS = ("epoch", "test_acc", "train_loss")

# A table row is one setting (and one lr unless --select-best collapsed the lrs).
SETTING_KEYS = ["model", "placement", "norm", "batch_size", "virtual_batch"]
ROW_KEYS = [*SETTING_KEYS, "lr"]

# Two-sided 95% t quantiles, t_{0.975, dof} for dof = 1..30; 1.96 beyond.
_T975 = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
]

NO_RUNS_HINT = "a run folder holds summary.json; run a sweep first, e.g. normbench experiment=quick"
NO_VAL_HINT = (
    "--select-best lr picks the lr by validation accuracy, but no completed run has one; "
    "rerun the sweep with a validation split, e.g. data.val_split=5000"
)


class CorruptRun(Exception):
    """A run folder that cannot be used; the message says why."""


def _warn(message: str) -> None:
    one_line = " ".join(str(message).split())
    print(f"{PROG}: warning: {one_line}", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------

def _atomic_write_text(path: Path, text: str) -> None:
    atomic.write_text(path, text)


def _atomic_savefig(fig, path: Path) -> None:
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


# --------------------------------------------------------------------------------------------
# Collecting runs
# --------------------------------------------------------------------------------------------

def find_run_dirs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Every directory holding summary.json under `paths` (a path may itself be a run folder
    or a summary.json file). Run folders are not searched further. Sorted, no duplicates."""
    found: dict[str, Path] = {}
    for root in map(Path, paths):
        if root.is_file() and root.name == "summary.json":
            found.setdefault(os.path.realpath(root.parent), root.parent)
            continue
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            if "summary.json" in filenames:
                found.setdefault(os.path.realpath(dirpath), Path(dirpath))
                dirnames.clear()
    return sorted(found.values())


def read_summary(run_dir: Path) -> dict:
    """The summary.json of a run as a flat dict (without `config`), with `path` added."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptRun(f"unreadable summary.json ({e})") from None
    if not isinstance(summary, dict):
        raise CorruptRun("summary.json is not a JSON object")
    missing = [key for key in REQUIRED_SUMMARY_KEYS if key not in summary]
    if missing:
        raise CorruptRun(f"summary.json lacks {', '.join(missing)}")
    status = summary["status"]
    if status == "running":
        raise CorruptRun("run still running (status 'running')")
    if status not in FINISHED_STATUSES:
        raise CorruptRun(f"unknown status {status!r}")
    for key in ("batch_size", "seed"):
        if not _is_number(summary[key]):
            raise CorruptRun(f"{key} is not a number: {summary[key]!r}")
    if not _is_number(summary["lr"]):
        raise CorruptRun(f"lr is not a number: {summary['lr']!r}")
    for key in ("norm_batch", "virtual_batch"):
        if summary.get(key) is not None and not _is_number(summary[key]):
            raise CorruptRun(f"{key} is neither a number nor null: {summary[key]!r}")
    for key in ("model", "norm"):
        if not isinstance(summary[key], str) or not summary[key]:
            raise CorruptRun(f"{key} is not a name: {summary[key]!r}")
    if not isinstance(summary.get("placement"), (str, type(None))):
        raise CorruptRun(f"placement is not a string: {summary['placement']!r}")
    if status == "completed" and not _is_number(summary["test_acc"]):
        raise CorruptRun("completed run without a numeric test_acc")
    row = {key: value for key, value in summary.items() if key not in ("config", "norm_label")}
    # A norm with non-default options (gn-groups16) is its own row, labelled like its run folder.
    if isinstance(summary.get("norm_label"), str) and summary["norm_label"]:
        row["norm"] = summary["norm_label"]
    for key, default in OPTIONAL_SUMMARY_DEFAULTS.items():
        row.setdefault(key, default)
    if row["placement"] is None:
        row["placement"] = "before"
    row["path"] = str(run_dir)
    return row


def read_metrics(run_dir: str | os.PathLike) -> pd.DataFrame:
    """The per-epoch metrics.csv of a run (numeric columns); raises CorruptRun if unusable."""
    metrics_path = Path(run_dir) / "metrics.csv"
    try:
        metrics = pd.read_csv(metrics_path)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:  # ParserError, EmptyDataError, UnicodeDecodeError
        raise CorruptRun(f"unreadable metrics.csv ({e})") from None
    missing = [column for column in REQUIRED_METRICS_COLUMNS if column not in metrics.columns]
    if missing:
        raise CorruptRun(f"metrics.csv lacks column(s) {', '.join(missing)}")
    for column in metrics.columns:
        metrics[column] = pd.to_numeric(metrics[column], errors="coerce")
    if metrics["epoch"].isna().any():
        raise CorruptRun("metrics.csv has a non-numeric epoch")
    return metrics


def _check_metrics(run_dir: Path, status: str) -> None:
    """Completed runs need a metrics.csv with at least one epoch; failed ones may lack it."""
    try:
        metrics = read_metrics(run_dir)
    except FileNotFoundError:
        if status == "completed":
            raise CorruptRun("completed run without metrics.csv") from None
        return
    if status == "completed" and metrics.empty:
        raise CorruptRun("completed run with an empty metrics.csv")


def collect_runs(paths: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """One row per finished run under `paths`: the flat summary.json fields (minus `config`)
    plus `path`. Corrupt, partial and still-running run folders are skipped with a warning."""
    rows = []
    seen_runs: dict[tuple, str] = {}
    for run_dir in find_run_dirs(paths):
        try:
            row = read_summary(run_dir)
            _check_metrics(run_dir, row["status"])
        except CorruptRun as e:
            _warn(f"skipping {run_dir}: {e}")
            continue
        identity = tuple(row[key] for key in (*ROW_KEYS, "seed"))
        if identity in seen_runs:
            _warn(f"skipping {run_dir}: same settings and seed as {seen_runs[identity]}")
            continue
        seen_runs[identity] = str(run_dir)
        rows.append(row)
    runs = pd.DataFrame(rows, columns=None if rows else RUN_COLUMNS)
    return _normalize_run_dtypes(runs)


def _normalize_run_dtypes(runs: pd.DataFrame) -> pd.DataFrame:
    runs = runs.copy()
    for column in NUMERIC_COLUMNS:
        runs[column] = pd.to_numeric(runs[column], errors="coerce").astype(float)
    for column in INTEGER_COLUMNS:
        runs[column] = pd.to_numeric(runs[column], errors="coerce").round().astype("Int64")
    for column in ("model", "norm", "placement", "status"):
        runs[column] = runs[column].astype(str)
    leading = [c for c in RUN_COLUMNS if c in runs.columns]
    return runs[leading + [c for c in runs.columns if c not in leading]]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_curves(runs: pd.DataFrame) -> pd.DataFrame:
    """Per-epoch metrics of the completed runs in long form, with the run's keys attached."""
    frames = []
    for run in runs[runs["status"] == "completed"].itertuples(index=False):
        try:
            metrics = read_metrics(run.path)
        except (CorruptRun, FileNotFoundError) as e:
            _warn(f"no curves for {run.path}: {e}")
            continue
        # metrics.csv's `lr` is the scheduled lr of each epoch, not the run's base lr.
        metrics = metrics.rename(columns={"lr": "epoch_lr"})
        metrics = metrics.drop(columns=[c for c in (*ROW_KEYS, "seed") if c in metrics.columns])
        metrics["path"] = run.path
        frames.append(metrics)
    if not frames:
        return pd.DataFrame(columns=["path", *REQUIRED_METRICS_COLUMNS, *ROW_KEYS, "seed"])
    curves = pd.concat(frames, ignore_index=True)
    return curves.merge(runs[["path", *ROW_KEYS, "seed"]], on="path", how="left")


def epochs_to_target(curves: pd.DataFrame, target_acc: float) -> pd.Series:
    """Per run path: the first epoch whose test_acc >= target_acc (NaN if never)."""
    reached = curves[curves["test_acc"] >= target_acc]
    first_epoch = reached.groupby("path")["epoch"].min()
    all_paths = pd.Index(curves["path"].unique(), name="path")
    return first_epoch.reindex(all_paths).astype(float)


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------

def t_quantile_975(dof: int) -> float:
    """Two-sided 95% quantile of Student's t with `dof` degrees of freedom."""
    try:
        from scipy import stats
    except ImportError:
        return _T975[dof - 1] if 1 <= dof <= len(_T975) else 1.96
    return float(stats.t.ppf(0.975, dof))


def ci95_half_width(std: float, n: int) -> float:
    if n < 2 or not np.isfinite(std):
        return float("nan")
    return t_quantile_975(n - 1) * std / math.sqrt(n)


def _validation_acc(runs: pd.DataFrame) -> pd.Series:
    return runs["best_val_acc"].fillna(runs["val_acc"])


def _summarize_row(runs: pd.DataFrame) -> pd.Series:
    """Statistics of one table row (one setting and lr) over its seeds."""
    completed = runs[runs["status"] == "completed"]
    n = len(completed)
    test_acc = completed["test_acc"]
    std = float(test_acc.std(ddof=1)) if n >= 2 else float("nan")
    reached = completed["epochs_to_target"].dropna()
    norm_batches = runs["norm_batch"].dropna()
    return pd.Series({
        "norm_batch": norm_batches.iloc[0] if len(norm_batches) else pd.NA,
        "test_acc_mean": test_acc.mean() if n else float("nan"),
        "test_acc_std": std,
        "test_acc_ci95": ci95_half_width(std, n),
        "best_test_acc_mean": completed["best_test_acc"].mean(),
        "train_loss_mean": completed["train_loss"].mean(),
        "val_acc_mean": completed["val_acc_for_selection"].mean(),
        "epochs_to_target_mean": reached.mean() if len(reached) else float("nan"),
        "epochs_to_target_n": len(reached),
        "seconds_per_epoch_mean": completed["seconds_per_epoch"].mean(),
        "images_per_s_mean": completed["images_per_s"].mean(),
        "lr_effective": completed["lr_effective"].mean(),
        "n_completed": n,
        "n_failed": int((runs["status"] == "failed").sum()),
        "n_diverged": int((runs["status"] == "diverged").sum()),
        "n_runs": len(runs),
    })


def aggregate(
    runs: pd.DataFrame,
    target_acc: float = 80.0,
    select_best: str | None = None,
    curves: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per model x placement x norm x batch_size x virtual_batch x lr with the test
    accuracy (mean, std, 95% CI over completed seeds) and friends. With select_best="lr" only
    the lr with the highest mean validation accuracy of each setting is kept (column
    `lr_selected`, plus `lr_candidates`). Numeric columns; see format_table for display."""
    if select_best not in (None, "lr"):
        raise UserError(f"--select-best supports only 'lr', not {select_best!r}")
    if curves is None:
        curves = load_curves(runs)
    runs = runs.copy()
    runs["epochs_to_target"] = runs["path"].map(epochs_to_target(curves, target_acc))
    runs["val_acc_for_selection"] = _validation_acc(runs)

    value_columns = [column for column in runs.columns if column not in ROW_KEYS]
    table = (
        runs.groupby(ROW_KEYS, dropna=False, sort=False)[value_columns]
        .apply(_summarize_row)
        .reset_index()
    )
    table = _fix_table_dtypes(table)
    if select_best == "lr":
        table = _select_best_lr(table)
    return sort_table(table).reset_index(drop=True)


def _fix_table_dtypes(table: pd.DataFrame) -> pd.DataFrame:
    for column in ("batch_size", "virtual_batch", "norm_batch"):
        table[column] = pd.to_numeric(table[column], errors="coerce").astype("Int64")
    for column in ("epochs_to_target_n", "n_completed", "n_failed", "n_diverged", "n_runs"):
        table[column] = table[column].astype(int)
    return table


def _select_best_lr(table: pd.DataFrame) -> pd.DataFrame:
    """Keep, per setting, the lr with the highest mean validation accuracy."""
    if table["val_acc_mean"].isna().all():
        raise UserError(NO_VAL_HINT)
    kept_rows = []
    for setting, rows in table.groupby(SETTING_KEYS, dropna=False, sort=False):
        candidates = ";".join(f"{lr:g}" for lr in sorted(rows["lr"]))
        with_val = rows.dropna(subset=["val_acc_mean"])
        if with_val.empty and len(rows) > 1:
            _warn(f"dropping {_describe_setting(setting)}: no validation accuracy to pick an lr")
            continue
        if with_val.empty:
            best = rows.iloc[[0]]
        else:
            best = with_val.loc[[with_val["val_acc_mean"].idxmax()]]
        best = best.assign(lr_candidates=candidates)
        kept_rows.append(best)
    selected = pd.concat(kept_rows, ignore_index=True)
    return selected.rename(columns={"lr": "lr_selected"})


def _describe_setting(setting: tuple) -> str:
    model, placement, norm, batch_size, virtual_batch = setting
    text = f"{model}/{norm} ({placement} act.) batch {batch_size}"
    if not pd.isna(virtual_batch):
        text += f" virtual batch {virtual_batch}"
    return text


def _norm_rank(norm: str) -> tuple[int, str]:
    """Canonical order of the base norm; variants (gn-groups16) right after their base."""
    base = norm.split("-")[0]
    if base in CANONICAL_NORM_ORDER:
        return (CANONICAL_NORM_ORDER.index(base), norm)
    return (len(CANONICAL_NORM_ORDER), norm)


def sort_table(table: pd.DataFrame) -> pd.DataFrame:
    """Model, placement, norm (canonical order), batch descending, norm batch descending, lr."""
    lr_column = "lr_selected" if "lr_selected" in table.columns else "lr"
    keys = pd.DataFrame({
        "model": table["model"].astype(str),
        "placement": table["placement"].map(
            lambda p: PLACEMENT_ORDER.index(p) if p in PLACEMENT_ORDER else len(PLACEMENT_ORDER)),
        "norm_rank": table["norm"].map(lambda n: _norm_rank(n)[0]),
        "norm_name": table["norm"].map(lambda n: _norm_rank(n)[1]),
        "batch": -table["batch_size"].astype(float),
        "norm_batch": -table["norm_batch"].astype(float).fillna(-np.inf),
        "lr": table[lr_column].astype(float),
    }, index=table.index)
    order = keys.sort_values(list(keys.columns), kind="stable").index
    return table.loc[order]


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------

def _fmt(value, digits: int = 2) -> str:
    if value is None or pd.isna(value):
        return "-"
    return f"{value:.{digits}f}"


def _fmt_acc(mean, std, n: int) -> str:
    if n == 0 or pd.isna(mean):
        return "-"
    if n == 1 or pd.isna(std):
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {std:.2f}"


def _fmt_epochs(mean, n_reached: int, n_completed: int) -> str:
    if n_reached == 0:
        return "-"
    text = f"{mean:.1f}"
    if n_reached < n_completed:
        text += f" ({n_reached}/{n_completed} seeds)"
    return text


def format_table(table: pd.DataFrame, target_acc: float = 80.0) -> pd.DataFrame:
    """The human-readable table (strings) for table.md and table.tex."""
    selected = "lr_selected" in table.columns
    show_placement = not (table["placement"] == "before").all()
    columns: dict[str, list] = {"model": list(table["model"]), "norm": list(table["norm"])}
    if show_placement:
        columns["placement"] = list(table["placement"])
    columns["batch"] = [str(b) for b in table["batch_size"]]
    columns["norm batch"] = ["-" if pd.isna(b) else str(b) for b in table["norm_batch"]]
    if selected:
        columns["lr (selected)"] = [f"{lr:g}" for lr in table["lr_selected"]]
        columns["val acc"] = [_fmt(v) for v in table["val_acc_mean"]]
    else:
        columns["lr"] = [f"{lr:g}" for lr in table["lr"]]
    rows = list(table.itertuples(index=False))
    columns["test acc"] = [_fmt_acc(r.test_acc_mean, r.test_acc_std, r.n_completed) for r in rows]
    columns["95% CI ±"] = [_fmt(v) for v in table["test_acc_ci95"]]
    columns["best test acc"] = [_fmt(v) for v in table["best_test_acc_mean"]]
    columns["final train loss"] = [_fmt(v, 4) for v in table["train_loss_mean"]]
    columns[f"epochs to {target_acc:g}%"] = [
        _fmt_epochs(r.epochs_to_target_mean, r.epochs_to_target_n, r.n_completed) for r in rows
    ]
    columns["s/epoch"] = [_fmt(v, 1) for v in table["seconds_per_epoch_mean"]]
    columns["images/s"] = [_fmt(v, 0) for v in table["images_per_s_mean"]]
    columns["seeds"] = [str(n) for n in table["n_completed"]]
    columns["failed"] = [str(n) for n in table["n_failed"]]
    columns["diverged"] = [str(n) for n in table["n_diverged"]]
    return pd.DataFrame(columns)


def table_title(table: pd.DataFrame, target_acc: float) -> str:
    n_runs = int(table["n_runs"].sum())
    n_completed = int(table["n_completed"].sum())
    n_failed = int(table["n_failed"].sum())
    n_diverged = int(table["n_diverged"].sum())
    title = (
        f"Test accuracy (%) by model, normalization and batch size: mean ± std over completed "
        f"seeds, from {n_runs} run{'s' if n_runs != 1 else ''} ({n_completed} completed, "
        f"{n_failed} failed, "
        f"{n_diverged} diverged); epochs to {target_acc:g}% = first epoch reaching it"
    )
    if "lr_selected" in table.columns:
        title += "; lr selected per row by mean validation accuracy"
    return title


_NUMERIC_DISPLAY_COLUMNS = {
    "batch", "norm batch", "lr", "lr (selected)", "val acc", "test acc", "95% CI ±",
    "best test acc", "final train loss", "s/epoch", "images/s", "seeds", "failed", "diverged",
}


def to_markdown(display: pd.DataFrame, title: str) -> str:
    header = "| " + " | ".join(display.columns) + " |"
    align = "|" + "|".join(
        "---:" if c in _NUMERIC_DISPLAY_COLUMNS or c.startswith("epochs to") else ":---"
        for c in display.columns
    ) + "|"
    body = [
        "| " + " | ".join(str(value) for value in row) + " |"
        for row in display.itertuples(index=False)
    ]
    return "\n".join([f"## {title}", "", header, align, *body]) + "\n"


def _latex_escape(text: str) -> str:
    replacements = {
        "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
        "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}",
        "±": r"$\pm$",
    }
    return "".join(replacements.get(ch, ch) for ch in str(text))


def to_latex(display: pd.DataFrame, title: str) -> str:
    escaped = display.map(_latex_escape)
    escaped.columns = [_latex_escape(c) for c in display.columns]
    try:
        import jinja2  # noqa: F401  (pandas' to_latex needs it)

        tabular = escaped.to_latex(index=False, escape=False, column_format="l" * display.shape[1])
    except ImportError:
        lines = [
            r"\begin{tabular}{" + "l" * display.shape[1] + "}",
            r"\toprule",
            " & ".join(escaped.columns) + r" \\",
            r"\midrule",
            *(" & ".join(row) + r" \\" for row in escaped.itertuples(index=False)),
            r"\bottomrule",
            r"\end{tabular}",
        ]
        tabular = "\n".join(lines) + "\n"
    return f"% {title}\n" + tabular


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------

def _new_figure(n_panels: int, panel_size=(5.0, 3.8)):
    """A matplotlib Figure on the Agg canvas (no pyplot, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = min(n_panels, 3)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _one_lr_per_setting(table: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Rows to plot: one per setting. Without --select-best, the lr with the best mean test
    accuracy is plotted (and the figure says so) when a setting was run at several lrs."""
    if "lr_selected" in table.columns:
        return table.rename(columns={"lr_selected": "lr"}), "lr chosen by validation accuracy"
    per_setting = table.groupby(SETTING_KEYS, dropna=False, sort=False)
    if per_setting.ngroups == len(table):
        return table, ""
    best_index = per_setting["test_acc_mean"].apply(
        lambda accs: accs.idxmax() if accs.notna().any() else accs.index[0])
    return table.loc[list(best_index)], "best lr per point by test acc"


def _line_label(norm: str, placement: str, show_placement: bool, extra: str = "") -> str:
    label = norm
    if show_placement:
        label += f" ({placement} act.)"
    return label + extra


def plot_error_vs_batch(table: pd.DataFrame) -> object:
    """Test error vs normalization batch, one line per norm, one panel per model."""
    from matplotlib.ticker import NullLocator

    rows, lr_note = _one_lr_per_setting(table)
    rows = rows[rows["n_completed"] > 0].copy()
    rows["x"] = rows["norm_batch"].fillna(rows["batch_size"]).astype(float)
    rows["error"] = 100.0 - rows["test_acc_mean"]
    rows["error_std"] = rows["test_acc_std"].fillna(0.0)
    rows["sgd_batch_if_virtual"] = rows["batch_size"].where(rows["virtual_batch"].notna())
    show_placement = rows["placement"].nunique() > 1
    models = sorted(rows["model"].unique()) or ["(no completed runs)"]
    fig, axes = _new_figure(len(models))
    for ax, model in zip(axes, models):
        model_rows = sort_table(rows[rows["model"] == model])
        line_keys = ["placement", "norm", "sgd_batch_if_virtual"]
        for (placement, norm, sgd_batch), line in model_rows.groupby(
                line_keys, dropna=False, sort=False):
            line = line.sort_values("x")
            batch_independent = line["norm_batch"].isna().all()
            extra = "" if pd.isna(sgd_batch) else f", virtual batch (SGD batch {int(sgd_batch)})"
            if batch_independent:
                extra += " [batch-independent]"
            ax.errorbar(
                line["x"], line["error"], yerr=line["error_std"], marker="o", capsize=3,
                linestyle="--" if batch_independent else "-",
                label=_line_label(norm, placement, show_placement, extra),
            )
        xs = sorted(model_rows["x"].unique())
        ax.set_xscale("log", base=2)
        ax.xaxis.set_minor_locator(NullLocator())
        if xs:
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
            # large batches on the left, small on the right, as in the GN paper's Figure 1
            ax.set_xlim(max(xs) * 1.25, min(xs) / 1.25)
        ax.set_xlabel("normalization batch (images per norm statistics; SGD batch if none)")
        ax.set_ylabel("test error (%)")
        ax.set_title(model)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    title = "Test error vs normalization batch (mean ± std over seeds)"
    fig.suptitle(title + (f"; {lr_note}" if lr_note else ""))
    return fig


def plot_curves(table: pd.DataFrame, curves: pd.DataFrame, metric: str, ylabel: str) -> object:
    """`metric` per epoch (mean over seeds), one panel per SGD batch, one line per norm
    (the same colour for the same norm in every panel)."""
    from matplotlib.ticker import MaxNLocator

    rows, lr_note = _one_lr_per_setting(table)
    plotted = curves.merge(rows[ROW_KEYS], on=ROW_KEYS, how="inner").dropna(subset=[metric])
    several_models = rows["model"].nunique() > 1
    show_placement = rows["placement"].nunique() > 1

    lines = []  # (SGD batch, label, mean curve) in table order
    for setting in sort_table(rows).itertuples(index=False):
        mask = np.logical_and.reduce(
            [_matches(plotted[key], getattr(setting, key)) for key in ROW_KEYS])
        mean_curve = plotted[mask].groupby("epoch")[metric].mean()
        if mean_curve.empty:
            continue
        extra = "" if pd.isna(setting.virtual_batch) else f" (norm batch {setting.virtual_batch})"
        label = _line_label(setting.norm, setting.placement, show_placement, extra)
        if several_models:
            label = f"{setting.model}: {label}"
        lines.append((int(setting.batch_size), label, mean_curve))

    colors = _colors_by_label([label for _, label, _ in lines])
    batches = sorted({batch for batch, _, _ in lines}, reverse=True) or [None]
    fig, axes = _new_figure(len(batches))
    for ax, batch in zip(axes, batches):
        for _, label, mean_curve in (line for line in lines if line[0] == batch):
            ax.plot(mean_curve.index, mean_curve.values, label=label, color=colors[label])
        ax.set_title(f"SGD batch {batch}" if batch is not None else "no completed runs")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    title = (f"{ylabel[0].upper()}{ylabel[1:]} per epoch by normalization (mean over seeds), "
             "one panel per SGD batch")
    fig.suptitle(title + (f"; {lr_note}" if lr_note else ""))
    return fig


def _colors_by_label(labels: list[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    unique_labels = list(dict.fromkeys(labels))
    cmap = colormaps["tab10" if len(unique_labels) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(unique_labels)}


def _matches(column: pd.Series, value) -> np.ndarray:
    if pd.isna(value):
        return column.isna().to_numpy()
    return (column == value).fillna(False).to_numpy(dtype=bool)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def _no_runs_message(paths: list) -> str:
    shown = ", ".join(str(p) for p in paths)
    return f"no runs found under {shown} ({NO_RUNS_HINT})"


def default_out_dir(paths: list) -> Path:
    first = Path(paths[0])
    return (first.parent if first.is_file() else first) / "report"


def write_report(
    paths: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike | None = None,
    target_acc: float = 80.0,
    select_best: str | None = None,
) -> dict[str, Path]:
    """Collect the runs under `paths`, write tables and figures to `out_dir` (default
    `<first path>/report`). Returns {file name: path}. Raises UserError if there is nothing
    to report."""
    paths = list(paths)
    if not paths:
        raise UserError(_no_runs_message(["(no paths given)"]))
    runs = collect_runs(paths)
    if runs.empty:
        raise UserError(_no_runs_message(paths))
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(paths)
    curves = load_curves(runs)
    table = aggregate(runs, target_acc=target_acc, select_best=select_best, curves=curves)
    title = table_title(table, target_acc)
    display = format_table(table, target_acc)

    written: dict[str, Path] = {}

    def save_text(name: str, text: str) -> None:
        written[name] = out_dir / name
        _atomic_write_text(written[name], text)

    def save_figure(name: str, fig) -> None:
        written[name] = out_dir / name
        _atomic_savefig(fig, written[name])

    save_text("table.md", to_markdown(display, title))
    save_text("table.csv", table.to_csv(index=False))
    save_text("table.tex", to_latex(display, title))
    save_figure("error_vs_batch.png", plot_error_vs_batch(table))
    save_figure("curves_test_acc.png", plot_curves(table, curves, "test_acc", "test accuracy (%)"))
    save_figure("curves_train_loss.png", plot_curves(table, curves, "train_loss", "train loss"))
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Turn a normbench sweep (run folders holding summary.json) into comparison "
                    "tables (table.md/.csv/.tex) and figures.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="run folders or sweep roots")
    parser.add_argument("--out", default=None, help="output folder (default: <first PATH>/report)")
    parser.add_argument("--target-acc", type=float, default=80.0,
                        help="test accuracy (%%) for the 'epochs to target' column (default 80)")
    parser.add_argument("--select-best", choices=["lr"], default=None,
                        help="keep, per setting, the lr with the best mean validation accuracy")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse already printed usage or help
        return e.code if isinstance(e.code, int) else 2
    try:
        written = write_report(args.paths, args.out, args.target_acc, args.select_best)
    except UserError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return UserError.exit_code
    except OSError as e:
        print(f"{PROG}: cannot write the report: {e}", file=sys.stderr)
        return 1
    print(written["table.md"].read_text(encoding="utf-8"))
    print("wrote:")
    for path in written.values():
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
