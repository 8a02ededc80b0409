"""How much of BN's small-batch loss each other arm recovers: a report's recovery.md / recovery.csv.

The question of a small-batch sweep (the Group Norm paper's Figure 1 protocol, ``remedies_cpu``): where BN
ran at two or more normalization batches (virtual batches of one SGD batch) beside other norms, in one context
(the same model, SGD batch and every other setting), BN's *loss* is its test accuracy at the smallest
normalization batch minus at the largest. Each other norm at that smallest normalization batch (a
batch-independent norm: its one row) has

* a *gain*: its accuracy minus BN's at the smallest normalization batch, and
* a *gap*: its accuracy minus BN's at the largest,

each with Welch's 95% CI over seeds and its p-value Holm-adjusted over this file's contrasts (a family of its
own: comparisons.md holds the gains and the batch-independent gaps too, in its family, but not the gap of a
batch-dependent arm at one normalization batch to BN at another). The share recovered is gain / -loss, a
point estimate (the CIs say how sure it is); the reading, from the adjusted tests:

* all of it: the gain detected and the gap not (or a detected positive gap: beyond BN at the largest);
* part of it: both detected, the gain positive, the gap negative;
* none detected: the gain not detected;
* less than none: a detected negative gain (below BN at the smallest).

A report without such a context (BN at one normalization batch, or alone) has no recovery file.
"""

from __future__ import annotations

import pandas as pd

from normbench import stats
from normbench.comparisons import ALPHA, REFERENCE_NORM, fmt_ci, fmt_p, fmt_points, norm_contexts
from normbench.length import arm_label
from normbench.table import seed_values, to_markdown

ALL, PART, NONE, LESS = "all of it", "part of it", "none detected", "less than none"


def _accs(row) -> list[float]:
    return list(seed_values(row["seed_test_acc"]).values())


def _contexts(table: pd.DataFrame):
    """(BN's row at the largest normalization batch, BN's at the smallest, [each other arm's row at the
    smallest, or its batch-independent row]) for every context where BN ran at two normalization batches."""
    for group in norm_contexts(table):
        rows = table.iloc[group]
        bn = rows[(rows["norm"] == REFERENCE_NORM) & rows["norm_batch"].notna()].sort_values("norm_batch")
        if bn["norm_batch"].nunique() < 2:
            continue
        small, large = bn.iloc[0], bn.iloc[-1]
        others = rows[(rows["norm"] != REFERENCE_NORM)
                      & (rows["norm_batch"].isna() | (rows["norm_batch"] == small["norm_batch"]))]
        if not others.empty:
            yield large, small, [row for _, row in others.iterrows()]


def reading(gain: float, gain_p: float, gap: float, gap_p: float) -> str:
    """The reading of an arm's gain and gap (points) from their Holm-adjusted p-values."""
    if gain_p >= ALPHA or pd.isna(gain_p):
        return NONE
    if gain < 0:
        return LESS
    return PART if gap_p < ALPHA and gap < 0 else ALL


def recovery_rows(table: pd.DataFrame) -> pd.DataFrame:
    """One row per arm and context: BN's loss, the arm's gain and gap (Welch, Holm over the gains and gaps
    of every row), the share recovered and its reading."""
    rows = []
    show_batch = table["batch_size"].nunique() > 1
    for large, small, arms in _contexts(table):
        loss = stats.welch(_accs(small), _accs(large))
        bn_loss = small["test_acc_mean"] - large["test_acc_mean"]
        for arm in arms:
            gain, gap = stats.welch(_accs(arm), _accs(small)), stats.welch(_accs(arm), _accs(large))
            gain_points = arm["test_acc_mean"] - small["test_acc_mean"]
            rows.append({
                "model": arm["model"], "arm": arm_label(arm, show_batch), "arm_mean": arm["test_acc_mean"],
                "bn_small": arm_label(small, show_batch), "bn_small_mean": small["test_acc_mean"],
                "bn_large": arm_label(large, show_batch), "bn_large_mean": large["test_acc_mean"],
                "bn_loss": bn_loss, "bn_loss_ci_low": loss.low, "bn_loss_ci_high": loss.high,
                "gain": gain_points, "gain_ci_low": gain.low,
                "gain_ci_high": gain.high, "gain_p": gain.p,
                "gap": arm["test_acc_mean"] - large["test_acc_mean"], "gap_ci_low": gap.low,
                "gap_ci_high": gap.high, "gap_p": gap.p,
                "share_recovered": gain_points / -bn_loss if bn_loss else float("nan"),
                "n_arm": gain.n_a,
            })
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    adjusted = stats.holm([*out["gain_p"].astype(float), *out["gap_p"].astype(float)])
    out["gain_p_holm"], out["gap_p_holm"] = adjusted[:len(out)], adjusted[len(out):]
    out["reading"] = [reading(r["gain"], r["gain_p_holm"], r["gap"], r["gap_p_holm"]) for _, r in out.iterrows()]
    return out


def recovery_markdown(table: pd.DataFrame) -> str | None:
    """recovery.md: per context BN's loss, then one line per arm; None where no context has one."""
    rows = recovery_rows(table)
    if rows.empty:
        return None
    models = rows["model"].nunique() > 1
    display = pd.DataFrame({
        **({"model": rows["model"]} if models else {}),
        "arm": rows["arm"], "acc": [f"{v:.2f}" for v in rows["arm_mean"]],
        "gain over BN small (points)": [fmt_points(v) for v in rows["gain"]],
        "gain 95% CI": [fmt_ci(lo, hi) for lo, hi in zip(rows["gain_ci_low"], rows["gain_ci_high"])],
        "gain Holm p": [fmt_p(p) for p in rows["gain_p_holm"]],
        "gap to BN large (points)": [fmt_points(v) for v in rows["gap"]],
        "gap 95% CI": [fmt_ci(lo, hi) for lo, hi in zip(rows["gap_ci_low"], rows["gap_ci_high"])],
        "gap Holm p": [fmt_p(p) for p in rows["gap_p_holm"]],
        "share recovered": [f"{v:.0%}" if pd.notna(v) else "-" for v in rows["share_recovered"]],
        "reading": rows["reading"],
    })
    losses = rows.drop_duplicates(["model", "bn_small", "bn_large"])
    notes = [f"BN's loss{f' ({r.model})' if models else ''}: {r.bn_small} {r.bn_small_mean:.2f}% against "
             f"{r.bn_large} {r.bn_large_mean:.2f}%, {fmt_points(r.bn_loss)} points "
             f"(95% CI {fmt_ci(r.bn_loss_ci_low, r.bn_loss_ci_high)})." for r in losses.itertuples()]
    notes += [
        "gain: the arm minus BN at the smallest normalization batch; gap: the arm minus BN at the largest; share "
        "recovered: gain / -loss (a point estimate). Welch's 95% CI over seeds; p Holm-adjusted over the "
        f"{int(rows['gain_p'].notna().sum() + rows['gap_p'].notna().sum())} gains and gaps of this table that have "
        "2 seeds or more on each side (fewer: no CI, no test).",
        f"reading (Holm p < {ALPHA:g} as detected): {ALL} = gain detected, gap not (or positive); {PART} = both "
        f"detected; {NONE} = gain not detected; {LESS} = a detected negative gain.",
    ]
    return to_markdown(display, "How much of BN's small-batch loss each arm recovers", notes)


def recovery_csv(table: pd.DataFrame) -> str | None:
    rows = recovery_rows(table)
    return None if rows.empty else rows.to_csv(index=False)
