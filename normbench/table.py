"""The comparison table: runs aggregated over seeds, one row per setting, and its text forms.

    table = aggregate(runs)                  # numeric, one row per setting and base lr
    display = format_table(table)            # strings, empty columns dropped
    to_markdown(display, table_title(table, DEFAULT_TARGET_ACC), table_notes(table))
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import pandas as pd

from normbench import identity, summary
from normbench.collect import UNKNOWN, keyed_runs, load_curves, setting_columns, to_target, warn
from normbench.compose import config_default
from normbench.errors import UserError

# The "epochs to target" column's accuracy (%) unless a report asks for another: the config's.
DEFAULT_TARGET_ACC: float = config_default("target_acc")

# One row per setting: the table's axes, plus every setting that differs between the runs
# (setting_columns, stored in table.attrs[SETTING_COLUMNS]) right after the model.
AXES_BEFORE_SETTINGS = ["model"]
AXES_AFTER_SETTINGS = ["placement", "norm", "batch_size", "devices", "virtual_batch"]
SETTING_COLUMNS = "setting_columns"

# CIFAR-10 has 10 classes: an arm whose best test accuracy stays this close to 10% never learned.
CHANCE_ACC, CHANCE_MARGIN = 10.0, 2.0
CHANCE_MARK = "†"
# An lr chosen at the end of its candidates: the best rate may lie beyond the ones tried.
EDGE_MARK = "‡"
# An lr pick whose validation margin over the runner-up is within the noise of the validation set.
NOISE_MARK = "≈"
# Which candidate a tie of mean validation accuracy goes to.
LR_TIE_RULE = "a tie goes to the lower lr"

NO_VAL_HINT = (
    "--select-best lr picks the lr by validation accuracy, but no completed run has one; "
    "rerun the sweep with a validation split, e.g. data.val_split=5000"
)


def setting_keys(settings: list[str]) -> list[str]:
    """What a row is, except its lr: the table's axes and the differing settings."""
    return [*AXES_BEFORE_SETTINGS, *settings, *AXES_AFTER_SETTINGS]


def row_keys(settings: list[str]) -> list[str]:
    """One table row (before --select-best): a setting at one base lr."""
    return [*setting_keys(settings), "lr"]


def table_setting_columns(table: pd.DataFrame) -> list[str]:
    """The settings that differ between the runs of `table` (columns of their own)."""
    return [c for c in table.attrs.get(SETTING_COLUMNS, []) if c in table.columns]


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------

def t_quantile_975(dof: int) -> float:
    """Two-sided 95% quantile of Student's t with `dof` degrees of freedom (scipy's, exact)."""
    from scipy import stats

    return float(stats.t.ppf(0.975, dof))


def ci95_half_width(std: float, n: int) -> float:
    if n < 2 or not np.isfinite(std):
        return float("nan")
    return t_quantile_975(n - 1) * std / math.sqrt(n)


def _at_chance(completed: pd.DataFrame) -> bool:
    """Every completed seed's best test accuracy within CHANCE_MARGIN of chance."""
    if completed.empty:
        return False
    best = completed["best_test_acc"].fillna(completed["test_acc"])
    return bool(((best - CHANCE_ACC).abs() <= CHANCE_MARGIN).all())


def _mean_and_ci(values: pd.Series) -> dict[str, float]:
    n = len(values)
    std = float(values.std(ddof=1)) if n >= 2 else float("nan")
    return {"mean": float(values.mean()) if n else float("nan"), "ci95": ci95_half_width(std, n)}


def _summarize_row(runs: pd.DataFrame) -> pd.Series:
    """Statistics of one table row (one setting and lr) over its seeds."""
    completed = runs[runs["status"] == summary.COMPLETED]
    n = len(completed)
    test_acc = completed["test_acc"]
    std = float(test_acc.std(ddof=1)) if n >= 2 else float("nan")
    reached = completed["epochs_to_target"].dropna()
    norm_batches = runs["norm_batch"].dropna()
    return pd.Series({
        # The rate the optimizer used: the same for every seed of a row (same base lr, batch,
        # devices and lr rule); old summaries without it fall back to the base lr.
        "lr_effective": runs["lr_effective"].iloc[0],
        "norm_batch": norm_batches.iloc[0] if len(norm_batches) else pd.NA,
        "test_acc_mean": test_acc.mean() if n else float("nan"),
        "test_acc_std": std,
        "test_acc_ci95": ci95_half_width(std, n),
        "best_test_acc_mean": completed["best_test_acc"].mean(),
        "at_chance": _at_chance(completed),
        "train_loss_mean": completed["train_loss"].mean(),
        "val_acc_mean": completed["val_acc_for_selection"].mean(),
        # The seeds whose validation accuracy voted for the lr (those every candidate lr has) and the size of
        # their validation set: what an lr pick's margin is weighed against.
        "tuning_seeds": " ".join(str(s) for s in sorted(completed.loc[completed["val_acc_for_selection"].notna(),
                                                                      "seed"].astype(int))),
        "val_size": completed["val_size"].max(),
        "epochs_to_target_mean": reached.mean() if len(reached) else float("nan"),
        "epochs_to_target_n": len(reached),
        # The length axis (normbench.length): images each completed seed trained on, and the images and training
        # seconds to the target accuracy over the seeds that reached it.
        "budget": runs["budget"].dropna().iloc[0] if runs["budget"].notna().any() else pd.NA,  # ep4, steps3000
        "train_images": completed["train_images"].max() if n else float("nan"),
        **{f"{key}_{stat}": value for key in ("images_to_target", "seconds_to_target")
           for stat, value in _mean_and_ci(completed[key].dropna()).items()},
        "seconds_per_epoch_mean": completed["seconds_per_epoch"].mean(),
        "images_per_s_mean": completed["images_per_s"].mean(),
        **{f"{key}_mean": completed[key].mean() for key in summary.GAP_FIELDS},
        **{f"{key}_std": float(completed[key].std(ddof=1)) if n >= 2 else float("nan") for key in summary.GAP_FIELDS},
        "n_completed": n,
        # Each completed seed's test accuracy, "seed:acc;...": what the comparisons' tests are computed from.
        "seed_test_acc": ";".join(f"{seed}:{acc!r}" for seed, acc in
                                  sorted(zip(completed["seed"].astype(int), completed["test_acc"].astype(float)))),
        "n_failed": int((runs["status"] == summary.FAILED).sum()),
        "n_diverged": int((runs["status"] == summary.DIVERGED).sum()),
        "n_runs": len(runs),
    })


def aggregate(
    runs: pd.DataFrame,
    target_acc: float = DEFAULT_TARGET_ACC,
    select_best: str | None = None,
    curves: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per setting (model, the settings that differ between runs, placement, norm label,
    batch, devices, virtual batch) and base lr, with the test accuracy (mean, std, 95% CI over
    completed seeds) and friends; `lr` is the base rate, `lr_effective` the rate used. With
    select_best="lr" only the base lr with the highest mean validation accuracy of each setting
    is kept (column `lr_selected`, plus `lr_candidates`). Numeric columns; see format_table."""
    if select_best not in (None, *identity.SELECTABLE_KEYS):
        raise UserError(f"--select-best supports only {', '.join(map(repr, identity.SELECTABLE_KEYS))}, not {select_best!r}")
    settings = setting_columns(runs)
    keys = row_keys(settings)
    if curves is None:
        curves = load_curves(runs, keys)
    keyed = keyed_runs(runs)
    reached = to_target(curves, target_acc)
    keyed["epochs_to_target"] = keyed["path"].map(reached["epoch"])
    # Training length to the target in images (steps x global batch) and training seconds: the length axis.
    keyed["images_to_target"] = keyed["path"].map(reached["step"]) * keyed["batch_size"] * keyed["devices"]
    keyed["seconds_to_target"] = keyed["path"].map(reached["seconds"])
    keyed["train_images"] = keyed["steps_done"] * keyed["batch_size"] * keyed["devices"]
    keyed["val_acc_for_selection"] = _tuning_val_acc(keyed, settings)

    value_columns = [column for column in keyed.columns if column not in keys]
    table = (
        keyed.groupby(keys, dropna=False, sort=False)[value_columns]
        .apply(_summarize_row)
        .reset_index()
    )
    table = _fix_table_dtypes(table)
    for key in settings:
        table[key] = _tidy_setting_column(table[key])
    table["global_batch"] = table["batch_size"] * table["devices"]
    if select_best == "lr":
        table = _select_best_lr(table, settings)
    table = sort_table(table, settings).reset_index(drop=True)
    table.attrs[SETTING_COLUMNS] = settings
    return table


def _tuning_val_acc(keyed: pd.DataFrame, settings: list[str]) -> pd.Series:
    """Each run's validation accuracy (its best epoch) as a vote for its lr, counted only for the
    seeds run at every lr of its setting: when seeds are added at the chosen lr after tuning
    (scripts/reference.py), every candidate is still compared on the same seeds, so the pick stays."""
    val = keyed["best_val_acc"].fillna(keyed["val_acc"])
    by_setting = keyed.groupby(setting_keys(settings), dropna=False)["lr"]
    by_seed = keyed.groupby([*setting_keys(settings), "seed"], dropna=False)["lr"]
    return val.where(by_seed.transform("nunique") == by_setting.transform("nunique"))


def _fix_table_dtypes(table: pd.DataFrame) -> pd.DataFrame:
    for column in ("batch_size", "devices", "virtual_batch", "norm_batch"):
        table[column] = pd.to_numeric(table[column], errors="coerce").astype("Int64")
    for column in ("lr_effective",):
        table[column] = pd.to_numeric(table[column], errors="coerce").astype(float)
    for column in ("epochs_to_target_n", "n_completed", "n_failed", "n_diverged", "n_runs"):
        table[column] = table[column].astype(int)
    table["at_chance"] = table["at_chance"].astype(bool)
    return table


def _tidy_setting_column(column: pd.Series) -> pd.Series:
    """Whole numbers stay whole (grouping turns 5000 next to a null into 5000.0)."""
    numbers = pd.to_numeric(column, errors="coerce")
    known = column.map(lambda v: not is_missing(v))
    if known.any() and numbers[known].notna().all() and (numbers[known] % 1 == 0).all() \
            and not column[known].map(lambda v: isinstance(v, bool)).any():
        return numbers.astype("Int64")
    return column


def is_missing(value) -> bool:
    """None, NaN or pd.NA: a setting or statistic without a value."""
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def same_value(a, b) -> bool:
    """Equal settings, two missing values equal."""
    return (is_missing(a) and is_missing(b)) or (not is_missing(a) and not is_missing(b) and a == b)


def row_groups(table: pd.DataFrame, keys: list[str]) -> list[list[int]]:
    """The positions of the table's rows grouped on `keys` (missing values equal), in table order."""
    groups: list[list[int]] = []
    for i in range(len(table)):
        for group in groups:
            if all(same_value(table.iloc[group[0]][k], table.iloc[i][k]) for k in keys):
                group.append(i)
                break
        else:
            groups.append([i])
    return groups


def _select_best_lr(table: pd.DataFrame, settings: list[str]) -> pd.DataFrame:
    """Keep, per setting, the base lr with the highest mean validation accuracy (over the seeds that every
    candidate lr has: _tuning_val_acc); a tie goes to the lower lr (LR_TIE_RULE). The kept row records the
    pick's margin over the runner-up (lr_margin, in validation points), whether that margin is within the
    binomial standard error of a difference of two such accuracies (lr_within_noise), its test accuracy
    over the seeds that took no part in the pick (test_acc_heldout_mean, seeds in heldout_seeds), and the
    failed and diverged runs of every candidate lr (the grid), not of the pick alone."""
    if table["val_acc_mean"].isna().all():
        raise UserError(NO_VAL_HINT)
    kept_rows = []
    for _, rows in table.groupby(setting_keys(settings), dropna=False, sort=False):
        rows = rows.sort_values("lr", kind="stable")
        candidates = ";".join(f"{lr:g}" for lr in rows["lr"])
        with_val = rows.dropna(subset=["val_acc_mean"])
        if with_val.empty and len(rows) > 1:
            warn(f"dropping {_describe_setting(rows.iloc[0], settings)}: no validation accuracy to pick an lr")
            continue
        best = rows.iloc[[0]] if with_val.empty else with_val.loc[[with_val["val_acc_mean"].idxmax()]]  # first = lowest lr
        kept_rows.append(best.assign(lr_candidates=candidates, **_pick_margin(best.iloc[0], with_val),
                                     **_heldout(best.iloc[0]), n_failed=int(rows["n_failed"].sum()),
                                     n_diverged=int(rows["n_diverged"].sum()), n_runs=int(rows["n_runs"].sum())))
    selected = pd.concat(kept_rows, ignore_index=True)
    return selected.rename(columns={"lr": "lr_selected"})


def _pick_margin(best: pd.Series, candidates: pd.DataFrame) -> dict:
    """The pick's validation margin over the runner-up and whether it is within noise: below the standard
    error of the difference of two accuracies, each a mean over the tuning seeds' validation sets,
    sqrt(2 p (1 - p) / (val_size x seeds)) at the pick's accuracy p."""
    others = candidates[candidates["lr"] != best["lr"]]["val_acc_mean"]
    if others.empty:
        return {"lr_margin": float("nan"), "lr_within_noise": False}
    margin = float(best["val_acc_mean"] - others.max())
    if is_missing(best["val_size"]) or not best["val_size"]:  # an old summary: the noise is unknown
        return {"lr_margin": margin, "lr_within_noise": False}
    n = float(best["val_size"]) * max(len(str(best["tuning_seeds"]).split()), 1)
    p = float(best["val_acc_mean"]) / 100.0
    return {"lr_margin": margin, "lr_within_noise": bool(margin < 100.0 * math.sqrt(2 * p * (1 - p) / n))}


def _heldout(best: pd.Series) -> dict:
    """Test accuracy at the pick over the seeds that did not vote for it (empty where every seed voted)."""
    tuning = {int(seed) for seed in str(best["tuning_seeds"]).split()}
    heldout = {seed: acc for seed, acc in seed_values(best["seed_test_acc"]).items() if seed not in tuning}
    return {"test_acc_heldout_mean": float(np.mean(list(heldout.values()))) if heldout else float("nan"),
            "heldout_seeds": " ".join(map(str, sorted(heldout)))}


def seed_values(text) -> dict[int, float]:
    """A row's seed_test_acc ("seed:acc;...") as {seed: test accuracy}."""
    if is_missing(text) or not str(text):
        return {}
    pairs = (item.split(":") for item in str(text).split(";"))
    return {int(seed): float(acc) for seed, acc in pairs}


def _describe_setting(row: pd.Series, settings: list[str]) -> str:
    text = f"{row['model']}/{row['norm']} ({row['placement']} act.) batch {row['batch_size']}"
    if not pd.isna(row["virtual_batch"]):
        text += f" virtual batch {row['virtual_batch']}"
    return text + "".join(f" {key}={row[key]}" for key in settings)


# --------------------------------------------------------------------------------------------
# Order
# --------------------------------------------------------------------------------------------

def norm_order() -> list[str]:
    """The registry's order of the norms: the order in which reports list them."""
    from normbench.norms import NORMS  # imports torch; only needed once a report is due

    return list(NORMS)


def base_norm(label: str) -> str:
    """The norm of a norm label: gn of gn-groups16 (identity.norm_label: the name, then its options)."""
    return label.split("-")[0]


def norm_rank(label: str, order: list[str] | None = None) -> tuple[int, str]:
    """Sort key of a norm label: registry order of its base norm (gn-groups16 sorts with gn,
    right after it); unknown norms after every known one, alphabetically."""
    order = norm_order() if order is None else order
    base = base_norm(label)
    return (order.index(base), label) if base in order else (len(order), label)


def _value_rank(column: pd.Series) -> pd.Series:
    """Ranks for a column of mixed setting values: numbers ascending, then text, then nulls."""
    def key(value):
        if is_missing(value):
            return (2, 0.0, "")
        if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
            return (0, float(value), "")
        return (1, 0.0, str(value))

    keys = [key(value) for value in column]
    ordered = sorted(set(keys))
    return pd.Series([ordered.index(k) for k in keys], index=column.index)


def sort_table(table: pd.DataFrame, settings: list[str] | None = None) -> pd.DataFrame:
    """Model, differing settings, placement, norm (registry order), batch descending, devices,
    norm batch descending, lr."""
    settings = table_setting_columns(table) if settings is None else settings
    order = norm_order()
    keys = {"model": table["model"].astype(str)}
    keys.update({f"setting {key}": _value_rank(table[key]) for key in settings})
    keys.update({
        "placement": table["placement"].map(
            lambda p: identity.PLACEMENTS.index(p) if p in identity.PLACEMENTS else len(identity.PLACEMENTS)),
        "norm_rank": table["norm"].map(lambda n: norm_rank(n, order)[0]),
        "norm_name": table["norm"].map(lambda n: norm_rank(n, order)[1]),
        "batch": -table["batch_size"].astype(float),
        "devices": table["devices"].astype(float),
        "norm_batch": -table["norm_batch"].astype(float).fillna(-np.inf),
        "lr": _base_lr(table).astype(float),
    })
    sort_keys = pd.DataFrame(keys, index=table.index)
    return table.loc[sort_keys.sort_values(list(sort_keys.columns), kind="stable").index]


# --------------------------------------------------------------------------------------------
# Display
# --------------------------------------------------------------------------------------------

EMPTY = "-"


def _fmt(value, digits: int = 2) -> str:
    if value is None or pd.isna(value):
        return EMPTY
    return f"{value:.{digits}f}"


def _fmt_lr(value) -> str:
    return EMPTY if value is None or pd.isna(value) else f"{value:g}"


def format_setting(value) -> str:
    """A setting's value as the table and the figures show it: 5000, 0.5, ema, - (none)."""
    if is_missing(value):
        return EMPTY
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _fmt_acc(mean, std, n: int, at_chance: bool) -> str:
    if n == 0 or pd.isna(mean):
        return EMPTY
    text = f"{mean:.2f}" if n == 1 or pd.isna(std) else f"{mean:.2f} ± {std:.2f}"
    return f"{text} {CHANCE_MARK}" if at_chance else text


def _fmt_margin(margin, within_noise: bool) -> str:
    if margin is None or pd.isna(margin):
        return EMPTY
    return f"{margin:+.2f}" + (f" {NOISE_MARK}" if within_noise else "")


def _fmt_epochs(mean, n_reached: int, n_completed: int) -> str:
    if n_reached == 0:
        return EMPTY
    text = f"{mean:.1f}"
    if n_reached < n_completed:
        text += f" ({n_reached}/{n_completed} seeds)"
    return text


def lr_column(table: pd.DataFrame) -> str:
    """The column that holds each row's base lr: the pick of a --select-best lr table, else the lr."""
    return "lr_selected" if "lr_selected" in table.columns else "lr"


def _base_lr(table: pd.DataFrame) -> pd.Series:
    return table[lr_column(table)]


def lr_at_edge(table: pd.DataFrame) -> pd.Series:
    """Per row of a --select-best lr table: whether the chosen lr is the highest or lowest of its
    several candidates (all False for a table without selection)."""
    if "lr_candidates" not in table.columns:
        return pd.Series(False, index=table.index)

    def at_edge(chosen: float, candidates: str) -> bool:
        tried = sorted(str(candidates).split(";"), key=float)  # written with :g, as compared here
        return len(tried) > 1 and f"{chosen:g}" in (tried[0], tried[-1])

    return pd.Series([at_edge(float(lr), c) for lr, c in zip(table["lr_selected"], table["lr_candidates"])],
                     index=table.index, dtype=bool)


def _base_lr_differs(table: pd.DataFrame) -> bool:
    """Whether any row trained with a rate other than its base lr (scaled with the batch)."""
    return not np.allclose(table["lr_effective"].astype(float), _base_lr(table).astype(float), rtol=1e-9, atol=0.0)


def format_table(table: pd.DataFrame, target_acc: float = DEFAULT_TARGET_ACC) -> pd.DataFrame:
    """The human-readable table (strings) for table.md and table.tex. Columns that are empty in
    every row are left out; so are placement, devices and the base lr when they say nothing
    (all "before", all 1 device, base lr equal to the lr used)."""
    selected = "lr_selected" in table.columns
    rows = list(table.itertuples(index=False))
    columns: dict[str, list] = {"model": list(table["model"])}
    for key in table_setting_columns(table):
        columns[key] = [format_setting(value) for value in table[key]]
    if not (table["placement"] == identity.PLACEMENTS[0]).all():
        columns["placement"] = list(table["placement"])
    columns["norm"] = list(table["norm"])
    columns["batch"] = [str(b) for b in table["batch_size"]]
    if (table["devices"] > 1).any():
        columns["devices"] = [str(d) for d in table["devices"]]
        columns["global batch"] = [str(b) for b in table["global_batch"]]
    columns["norm batch"] = [EMPTY if pd.isna(b) else str(b) for b in table["norm_batch"]]
    columns["lr (selected)" if selected else "lr"] = [
        _fmt_lr(lr) + (f" {EDGE_MARK}" if edge else "") for lr, edge in zip(table["lr_effective"], lr_at_edge(table))]
    if _base_lr_differs(table):
        columns["base lr"] = [_fmt_lr(lr) for lr in _base_lr(table)]
    if selected:
        columns["val acc"] = [_fmt(v) for v in table["val_acc_mean"]]
        columns["lr margin"] = [_fmt_margin(m, noise) for m, noise in zip(table["lr_margin"], table["lr_within_noise"])]
    columns["test acc"] = [
        _fmt_acc(r.test_acc_mean, r.test_acc_std, r.n_completed, r.at_chance) for r in rows]
    columns["95% CI ±"] = [_fmt(v) for v in table["test_acc_ci95"]]
    if selected:
        columns["test acc (held-out seeds)"] = [
            EMPTY if not seeds else f"{_fmt(v)} ({seeds})"
            for v, seeds in zip(table["test_acc_heldout_mean"], table["heldout_seeds"].fillna(""))]
    columns["best test acc"] = [_fmt(v) for v in table["best_test_acc_mean"]]
    columns["final train loss"] = [_fmt(v, 4) for v in table["train_loss_mean"]]
    columns[f"epochs to {target_acc:g}%"] = [
        _fmt_epochs(r.epochs_to_target_mean, r.epochs_to_target_n, r.n_completed) for r in rows
    ]
    for key, name in GAP_COLUMNS.items():  # training vs inference statistics (issue 12), as errors
        if f"{key}_mean" in table.columns:
            columns[name] = [_fmt(100.0 - v) for v in table[f"{key}_mean"]]
    columns["s/epoch"] = [_fmt(v, 1) for v in table["seconds_per_epoch_mean"]]
    columns["images/s"] = [_fmt(v, 0) for v in table["images_per_s_mean"]]
    columns["seeds"] = [str(n) for n in table["n_completed"]]
    columns["failed"] = [str(n) for n in table["n_failed"]]
    columns["diverged"] = [str(n) for n in table["n_diverged"]]
    # A column with nothing in it (no CI with one seed, no run reaching the target) is noise.
    kept = {name: values for name, values in columns.items()
            if name in ("model", "norm", "batch") or any(v != EMPTY for v in values)}
    return pd.DataFrame(kept)


def table_title(table: pd.DataFrame, target_acc: float) -> str:
    n_runs = int(table["n_runs"].sum())
    n_completed = int(table["n_completed"].sum())
    n_failed = int(table["n_failed"].sum())
    n_diverged = int(table["n_diverged"].sum())
    completed = "completed at the picked rates" if "lr_selected" in table.columns else "completed"
    title = (
        f"Test accuracy (%) by model, normalization and batch size: mean ± std over completed "
        f"seeds, from {n_runs} run{'s' if n_runs != 1 else ''} ({n_completed} {completed}, "
        f"{n_failed} failed, "
        f"{n_diverged} diverged); epochs to {target_acc:g}% = first epoch reaching it"
    )
    if "lr_selected" in table.columns:
        title += ("; lr selected per row by mean validation accuracy over the seeds every candidate lr has"
                  f" (val acc; {LR_TIE_RULE}), test accuracy over all seeds at that lr and over the seeds that took"
                  " no part in the pick; runs, failed and diverged count every candidate lr's runs")
    return title


def table_notes(table: pd.DataFrame, protocol: str | None = None) -> list[str]:
    """Lines under the table: the protocol, what the lr column is, and the chance marker."""
    notes = []
    if protocol:
        notes.append(f"Protocol: {protocol}.")
    if _base_lr_differs(table):
        notes.append("lr: the rate the optimizer used, the base lr scaled with the batch by the lr rule.")
    settings = table_setting_columns(table)
    if settings:
        notes.append(f"The runs differ in {', '.join(settings)}: rows with different values there "
                     "are different experiments, not seeds of one.")
        if any((table[key].astype(str) == UNKNOWN).any() for key in settings):
            notes.append(f"{UNKNOWN}: not recorded (a summary without the run's config, e.g. a failed "
                         "run's, that matches no single experiment).")
    if "lr_margin" in table.columns:
        notes.append(f"lr margin: the pick's mean validation accuracy minus the runner-up's; {NOISE_MARK} where that is "
                     "below the binomial standard error of a difference of two such accuracies (the pick is then a "
                     "coin toss between them).")
    if lr_at_edge(table).any():
        notes.append(f"{EDGE_MARK} the selected lr is the highest or lowest of the rates tried for that row "
                     "(csv column lr_candidates): its best rate may lie beyond them.")
    if table["at_chance"].any():
        notes.append(
            f"{CHANCE_MARK} at chance level: the best test accuracy of every seed stayed within "
            f"{CHANCE_MARGIN:g} points of {CHANCE_ACC:g}% (10 classes), so the arm never learned; "
            "rows of such arms can be identical.")
    return notes


# The three errors of the last evaluation (100 - accuracy), and the test error with each kind of
# population statistics where a run measured it.
GAP_COLUMNS = {
    "gap_train_batchstats_acc": "train err (batch stats)",
    "gap_test_batchstats_acc": "test err (batch stats)",
    "gap_test_popstats_acc": "test err (pop. stats)",
    "gap_test_ema_acc": "test err (ema)",
    "gap_test_precise_acc": "test err (precise)",
}

_NUMERIC_DISPLAY_COLUMNS = {
    *GAP_COLUMNS.values(),
    "batch", "devices", "global batch", "norm batch", "lr", "lr (selected)", "base lr", "val acc", "lr margin",
    "test acc (held-out seeds)",
    "test acc", "95% CI ±", "best test acc", "final train loss", "s/epoch", "images/s", "seeds",
    "failed", "diverged",
}


def to_markdown(display: pd.DataFrame, title: str, notes: list[str] = ()) -> str:
    header = "| " + " | ".join(display.columns) + " |"
    align = "|" + "|".join(
        "---:" if c in _NUMERIC_DISPLAY_COLUMNS or c.startswith("epochs to") else ":---"
        for c in display.columns
    ) + "|"
    body = [
        "| " + " | ".join(str(value) for value in row) + " |"
        for row in display.itertuples(index=False)
    ]
    footer = ["", *notes] if notes else []
    return "\n".join([f"## {title}", "", header, align, *body, *footer]) + "\n"


def _latex_escape(text: str) -> str:
    replacements = {
        "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
        "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}",
        "±": r"$\pm$", CHANCE_MARK: r"$\dagger$", EDGE_MARK: r"$\ddagger$", "×": r"$\times$", "√": r"$\surd$",
    }
    return "".join(replacements.get(ch, ch) for ch in str(text))


def to_latex(display: pd.DataFrame, title: str, notes: list[str] = ()) -> str:
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
    # Notes as LaTeX text under the tabular, so the chance marker is explained where it appears.
    footer = "".join(f"\n\\par\\noindent{{\\footnotesize {_latex_escape(note)}}}" for note in notes)
    return f"% {title}\n" + tabular + (footer + "\n" if footer else "")
