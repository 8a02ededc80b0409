"""The training length as an axis of a report: what a sweep over lengths (``epochs=4,8,16,32``, or
``budget.length=...`` with a steps or images budget) says about each arm.

An *arm* is a table row without its length: its model, norm, batches and every other setting; the lr
may differ between an arm's lengths (picked at each one, or set per arm by the preset). For each arm at
each length the report gives the test accuracy (mean and 95% CI over seeds), the training images and
training seconds to reach the target accuracy (from the per-epoch curves, over the seeds that reached it);
and for chosen pairs of norms (BN against GN by default) the gap in test accuracy at each length with
Welch's 95% CI, and how much that gap changes from the shortest length to the longest (the length x norm
interaction between the end lengths, ``stats.welch_of_differences``). ``length.md`` / ``length.csv`` hold
the numbers, ``length_error.png`` and ``length_gap.png`` draw them (``normbench.figures``); the
comparisons (``normbench.comparisons``) contrast each length with the shortest as they do any other
setting. A report whose runs share one length has no length section.
"""

from __future__ import annotations

import pandas as pd

from normbench import budget, stats
from normbench.comparisons import fmt_ci, fmt_p, fmt_points
from normbench.table import (EMPTY, lr_column, row_groups, seed_values, setting_keys, table_setting_columns,
                             to_markdown)

# The norms whose gap the report draws against the length unless told otherwise: the published question.
DEFAULT_GAP = ("bn", "gn")


def length_settings(table: pd.DataFrame) -> list[str]:
    """The length settings that differ between the table's runs (empty: one length)."""
    return [key for key in table_setting_columns(table) if key in budget.SETTINGS]


def varies(table: pd.DataFrame) -> bool:
    return bool(length_settings(table)) and table["train_images"].nunique() > 1


def arm_keys(table: pd.DataFrame) -> list[str]:
    """What makes an arm: the table's row keys without the length and the lr."""
    return setting_keys([key for key in table_setting_columns(table) if key not in budget.SETTINGS])


def length_text(row) -> str:
    """A row's length as its budget says it: 4 epochs, 3000 steps, 384000 training images."""
    return budget.describe(row["budget"]) if isinstance(row["budget"], str) else EMPTY


def arm_label(row, show_batch: bool = True) -> str:
    """bn (norm batch 2) at SGD batch 128, the way figure legends name an arm."""
    label = str(row["norm"])
    if not pd.isna(row["norm_batch"]) and row["norm_batch"] != row["batch_size"] * row["devices"]:
        label += f" (norm batch {int(row['norm_batch'])})"
    if show_batch:
        label += f", batch {int(row['batch_size'])}"
    return label


def _groups(table: pd.DataFrame, keys: list[str]) -> list[pd.DataFrame]:
    return [table.iloc[rows] for rows in row_groups(table, keys)]


def length_rows(table: pd.DataFrame) -> pd.DataFrame:
    """One row per arm and length, shortest first within an arm (numeric, plus the arm's label)."""
    if not varies(table):
        return pd.DataFrame()
    rows = []
    show_batch = table["batch_size"].nunique() > 1
    for group in _groups(table, arm_keys(table)):
        for _, row in group.sort_values("train_images").iterrows():
            rows.append({**{key: row[key] for key in arm_keys(table)}, "arm": arm_label(row, show_batch),
                         "length": length_text(row), "lr": row[lr_column(table)], "norm_batch": row["norm_batch"],
                         "train_images": row["train_images"], "test_acc_mean": row["test_acc_mean"],
                         "test_acc_ci95": row["test_acc_ci95"], "n_completed": row["n_completed"],
                         "n_reached": row["epochs_to_target_n"],
                         **{f"{key}_{stat}": row[f"{key}_{stat}"] for key in ("images_to_target", "seconds_to_target")
                            for stat in ("mean", "ci95")}})
    return pd.DataFrame(rows)


def _gap_arms(table: pd.DataFrame, pair: tuple[str, str]):
    """For every arm of norm pair[0] (each of its normalization batches, in each context of the other settings):
    (context settings, [(its row, the row of pair[1] with the same settings) at each length both ran, shortest
    first])."""
    context = [key for key in arm_keys(table) if key not in ("norm", "virtual_batch")]
    for group in _groups(table, context):
        first, second = (group[group["norm"] == norm] for norm in pair)
        for arm in _groups(first, ["virtual_batch"]):
            pairs = []
            for _, a in arm.sort_values("train_images").iterrows():
                match = second[second["train_images"] == a["train_images"]]
                if not match.empty:
                    pairs.append((a, match.iloc[0]))
            if pairs:
                yield {key: pairs[0][0][key] for key in context}, pairs


def _seed_accs(row) -> list[float]:
    return list(seed_values(row["seed_test_acc"]).values())


def gap_rows(table: pd.DataFrame, pair: tuple[str, str] = DEFAULT_GAP) -> pd.DataFrame:
    """Test accuracy of norm pair[0] minus norm pair[1] at each length, for every arm of pair[0] (each of its
    normalization batches) against the arm of pair[1] with the same other settings: Welch's difference and
    95% CI over their seeds."""
    if not varies(table):
        return pd.DataFrame()
    rows = []
    show_batch = table["batch_size"].nunique() > 1
    for context, pairs in _gap_arms(table, pair):
        for a, b in pairs:
            diff = stats.welch(_seed_accs(a), _seed_accs(b))
            rows.append({**context, "arm": arm_label(a, show_batch), "reference": arm_label(b, show_batch),
                         "length": length_text(a), "train_images": a["train_images"],
                         "diff": a["test_acc_mean"] - b["test_acc_mean"], "ci_low": diff.low, "ci_high": diff.high,
                         "p": diff.p, "n_arm": diff.n_a, "n_reference": diff.n_b})
    return pd.DataFrame(rows)


def gap_change_rows(table: pd.DataFrame, pair: tuple[str, str] = DEFAULT_GAP) -> pd.DataFrame:
    """How much each gap of ``gap_rows`` changes from the shortest to the longest length both arms ran: the gap
    at the longest minus the gap at the shortest, with the 95% CI and p of that difference of differences
    (``stats.welch_of_differences``: the length x norm interaction, from the four samples' spreads)."""
    if not varies(table):
        return pd.DataFrame()
    rows = []
    show_batch = table["batch_size"].nunique() > 1
    for context, pairs in _gap_arms(table, pair):
        if len(pairs) < 2:
            continue
        (short_a, short_b), (long_a, long_b) = pairs[0], pairs[-1]
        change = stats.welch_of_differences(_seed_accs(long_a), _seed_accs(long_b), _seed_accs(short_a),
                                            _seed_accs(short_b))
        rows.append({**context, "arm": arm_label(long_a, show_batch), "reference": arm_label(long_b, show_batch),
                     "from": length_text(short_a), "to": length_text(long_a),
                     "gap_from": short_a["test_acc_mean"] - short_b["test_acc_mean"],
                     "gap_to": long_a["test_acc_mean"] - long_b["test_acc_mean"],
                     "change": change.diff, "ci_low": change.low, "ci_high": change.high, "p": change.p})
    return pd.DataFrame(rows)


def _pm(mean, half, digits: int = 0) -> str:
    if pd.isna(mean):
        return EMPTY
    text = f"{mean:,.{digits}f}"
    return text if pd.isna(half) else f"{text} ± {half:,.{digits}f}"


def length_markdown(table: pd.DataFrame, target_acc: float, protocol: str,
                    pair: tuple[str, str] = DEFAULT_GAP) -> str | None:
    """length.md: the arms by length, then the gap of the pair; None where the runs share one length."""
    rows = length_rows(table)
    if rows.empty:
        return None
    models = rows["model"].nunique() > 1
    display = pd.DataFrame({
        **({"model": rows["model"]} if models else {}),
        "arm": rows["arm"], "length": rows["length"], "lr": [f"{lr:g}" for lr in rows["lr"]],
        "training images": [f"{int(v):,}" for v in rows["train_images"]],
        "test acc (95% CI)": [_pm(m, h, 2) for m, h in zip(rows["test_acc_mean"], rows["test_acc_ci95"])],
        "seeds": [str(int(n)) for n in rows["n_completed"]],
        f"images to {target_acc:g}%": [_pm(m, h) for m, h in zip(rows["images_to_target_mean"],
                                                                  rows["images_to_target_ci95"])],
        f"seconds to {target_acc:g}%": [_pm(m, h) for m, h in zip(rows["seconds_to_target_mean"],
                                                                   rows["seconds_to_target_ci95"])],
        "seeds reaching it": [f"{int(r)}/{int(n)}" for r, n in zip(rows["n_reached"], rows["n_completed"])],
    })
    text = to_markdown(display, f"Test accuracy (%) and the length to reach {target_acc:g}%, by training length",
                       [f"Protocol: {protocol}.",
                        f"images / seconds to {target_acc:g}%: at the first evaluation (each epoch's end, and the "
                        "budget's) reaching it, steps x global batch and training seconds (evaluation not counted), "
                        "mean ± 95% CI over the seeds that reached it."])
    gaps = gap_rows(table, pair)
    if not gaps.empty:
        gap_display = pd.DataFrame({
            **({"model": gaps["model"]} if models else {}),
            "arm": gaps["arm"], "reference": gaps["reference"], "length": gaps["length"],
            "training images": [f"{int(v):,}" for v in gaps["train_images"]],
            "difference (points)": [fmt_points(d) for d in gaps["diff"]],
            "95% CI": [fmt_ci(lo, hi) for lo, hi in zip(gaps["ci_low"], gaps["ci_high"])],
            "p (Welch)": [fmt_p(p) for p in gaps["p"]],
            "seeds": [f"{a} vs {b}" for a, b in zip(gaps["n_arm"], gaps["n_reference"])],
        })
        text += "\n" + to_markdown(gap_display, f"Test accuracy of {pair[0]} minus {pair[1]} (points) by training "
                                   "length", ["Welch's t-test per length, not adjusted for the several lengths."])
    changes = gap_change_rows(table, pair)
    if not changes.empty:
        change_display = pd.DataFrame({
            **({"model": changes["model"]} if models else {}),
            "arm": changes["arm"], "reference": changes["reference"], "from": changes["from"], "to": changes["to"],
            "gap from (points)": [fmt_points(d) for d in changes["gap_from"]],
            "gap to (points)": [fmt_points(d) for d in changes["gap_to"]],
            "change (points)": [fmt_points(d) for d in changes["change"]],
            "95% CI": [fmt_ci(lo, hi) for lo, hi in zip(changes["ci_low"], changes["ci_high"])],
            "p": [fmt_p(p) for p in changes["p"]],
        })
        text += "\n" + to_markdown(
            change_display, f"Change of the {pair[0]} minus {pair[1]} gap from the shortest to the longest length",
            ["The gap at the longest length minus the gap at the shortest (negative: the gap narrows with length), "
             "a difference of differences of four independent samples: its 95% CI and two-sided p from Welch's "
             "standard error and Welch-Satterthwaite degrees of freedom (the length x norm interaction, tested "
             "between the two end lengths)."])
    return text


def length_csv(table: pd.DataFrame) -> str | None:
    rows = length_rows(table)
    return None if rows.empty else rows.to_csv(index=False)

