"""The contrasts a sweep implies, each with its difference of means, 95% CI and test, and the findings
written from them: a report's comparisons.md / .csv / .tex and findings.md.

A contrast compares two rows of the table (two arms) that differ in one factor, every other setting equal:

* ``batch``: within a norm, every batch / normalization batch against the largest one;
* ``batch at equal steps`` / ``batch at equal images``: the same, between runs of different lengths that took
  the same optimizer steps / saw the same training images (``batch`` compares equal budgets: equal images for
  an epochs or images budget, equal steps for a steps budget; these compare the other way where a sweep ran it);
* ``norm``: within an SGD batch, every norm against BN (a batch-independent norm against BN at each of
  BN's normalization batches there);
* any other setting that differs between rows (placement, a differing config key): every value against
  the first one in the table's order (placement: before).

Without ``--select-best``, two rows at different base lrs are compared
only where one of the settings was run at one lr; with it, each row's picked lr.

Tests: Welch's t over each arm's completed seeds (``normbench.stats``), and the p-value Holm-adjusted
over every contrast of the report (the family); where both arms ran the same seeds (the same data
draws), also the paired test. The verdict is "higher" or "lower" where the Holm-adjusted p is below
``ALPHA``, and "no detectable difference" otherwise, whatever the uncorrected p.
"""

from __future__ import annotations

import math

import pandas as pd

from normbench import budget, identity, stats, summary
from normbench.table import (CHANCE_ACC, EMPTY, is_missing, lr_at_edge, lr_column, row_groups, same_value,
                             seed_values, table_setting_columns, to_latex, to_markdown)

ALPHA = 0.05
REFERENCE_NORM = "bn"
BATCH_COLUMNS = ["batch_size", "devices", "virtual_batch", "norm_batch"]
EQUAL_STEPS, EQUAL_IMAGES = "batch at equal steps", "batch at equal images"
ACROSS_LENGTHS = (EQUAL_STEPS, EQUAL_IMAGES)  # the batch families between runs of different lengths
BATCH_FAMILIES = ("batch", *ACROSS_LENGTHS)
HIGHER, LOWER, NO_DIFFERENCE = "higher", "lower", "no detectable difference"

COLUMNS = ["family", "context", "arm", "reference", "arm_mean", "reference_mean", "diff", "ci_low", "ci_high", "p",
           "p_holm", "paired_ci_low", "paired_ci_high", "paired_p", "n_arm", "n_reference", "seeds_arm",
           "seeds_reference", "arm_lr", "reference_lr", "verdict"]


def _own_norm_batch(row) -> bool:
    """Whether the row normalizes over a batch other than its (global) SGD batch (ghost / per-device batches)."""
    return not pd.isna(row["norm_batch"]) and row["norm_batch"] != row["batch_size"] * row["devices"]


def _batch_text(row) -> str:
    text = f"batch {row['batch_size']}"
    if row["devices"] > 1:
        text += f" x {row['devices']} devices"
    return text + (f", norm batch {row['norm_batch']}" if _own_norm_batch(row) else "")


def _batch_size(row) -> tuple:
    """What orders batches: the normalization batch (the SGD batch where it is the same), then the global batch."""
    global_batch = row["batch_size"] * row["devices"]
    return (global_batch if pd.isna(row["norm_batch"]) else row["norm_batch"], global_batch)


def _steps(row) -> float:
    return row["train_images"] / (row["batch_size"] * row["devices"])


def _length_text(row) -> str:
    return f"{_steps(row):g} steps, {row['train_images']:g} images"


def _norm_text(row) -> str:
    return f"{row['norm']} (norm batch {row['norm_batch']})" if _own_norm_batch(row) else str(row["norm"])


def _value_text(row, column: str) -> str:
    if column == "batch":
        return _batch_text(row)
    if column in ACROSS_LENGTHS:
        return f"{_batch_text(row)} ({_length_text(row)})"
    if column == "norm":
        return _norm_text(row)
    value = row[column]
    return f"{column}={EMPTY if is_missing(value) else value}"


class _Plan:
    """Which rows of a table are contrasted with which: (family, arm row, reference row) triples."""

    def __init__(self, table: pd.DataFrame):
        self.table = table
        self.settings = table_setting_columns(table)
        self.lr = lr_column(table)
        self.pairs: list[tuple[str, int, int]] = []

    def keys_without(self, *varying: str) -> list[str]:
        keys = ["model", *self.settings, "placement", "norm", *BATCH_COLUMNS]
        return [k for k in keys if k not in varying]

    def lr_compatible(self, i: int, j: int) -> bool:
        """Different base lrs are compared only where a setting ran at one lr (or each row is a pick)."""
        if self.lr == "lr_selected":
            return True
        a, b = self.table.iloc[i], self.table.iloc[j]
        if a[self.lr] == b[self.lr]:
            return True
        return self._lr_count(i) == 1 or self._lr_count(j) == 1

    def _lr_count(self, i: int) -> int:
        keys = self.keys_without()
        row = self.table.iloc[i]
        return sum(all(same_value(row[k], other[k]) for k in keys) for _, other in self.table.iterrows())

    def add(self, family: str, arm: int, reference: int) -> None:
        if arm != reference and self.lr_compatible(arm, reference):
            self.pairs.append((family, arm, reference))

    def batches(self) -> None:
        t = self.table
        for group in row_groups(t, self.keys_without(*BATCH_COLUMNS, self.lr)):
            distinct = {tuple(str(t.iloc[i][c]) for c in BATCH_COLUMNS) for i in group}
            if len(distinct) < 2:
                continue
            largest = max(_batch_size(t.iloc[i]) for i in group)
            for ref in (i for i in group if _batch_size(t.iloc[i]) == largest):
                for i in group:
                    if _batch_size(t.iloc[i]) != largest:
                        self.add("batch", i, ref)

    def batches_across_lengths(self) -> None:
        """A smaller batch against the largest one where the two ran different lengths (the batch family has the
        equal budgets) but took the same optimizer steps or saw the same training images."""
        t, lengths = self.table, [k for k in self.settings if k in budget.SETTINGS]
        if not lengths:
            return
        for group in row_groups(t, self.keys_without(*BATCH_COLUMNS, *lengths, self.lr)):
            largest = max(_batch_size(t.iloc[i]) for i in group)
            for ref in (i for i in group if _batch_size(t.iloc[i]) == largest):
                for i in group:
                    a, b = t.iloc[i], t.iloc[ref]
                    if _batch_size(a) == largest or all(same_value(a[k], b[k]) for k in lengths):
                        continue
                    if _steps(a) == _steps(b):
                        self.add(EQUAL_STEPS, i, ref)
                    elif a["train_images"] == b["train_images"]:
                        self.add(EQUAL_IMAGES, i, ref)

    def norm_groups(self) -> list[list[int]]:
        """The rows that differ only in the norm, its normalization batch and the lr."""
        return row_groups(self.table, self.keys_without("norm", "virtual_batch", "norm_batch", self.lr))

    def norms(self) -> None:
        t = self.table
        for group in self.norm_groups():
            refs = [i for i in group if t.iloc[i]["norm"] == REFERENCE_NORM]
            for ref in refs:
                for i in group:
                    row = t.iloc[i]
                    if row["norm"] != REFERENCE_NORM and (pd.isna(row["norm_batch"])
                                                          or row["norm_batch"] == t.iloc[ref]["norm_batch"]):
                        self.add("norm", i, ref)

    def other_settings(self) -> None:
        t = self.table
        for column in [*self.settings, "placement"]:
            values = list(dict.fromkeys(t[column].astype(str)))
            if len(values) < 2:
                continue
            first = identity.PLACEMENTS[0] if column == "placement" and identity.PLACEMENTS[0] in values \
                else values[0]
            for group in row_groups(t, self.keys_without(column, self.lr)):
                refs = [i for i in group if str(t.iloc[i][column]) == first]
                for ref in refs:
                    for i in group:
                        if str(t.iloc[i][column]) != first:
                            self.add(column, i, ref)


def norm_contexts(table: pd.DataFrame) -> list[list[int]]:
    """The positions of the rows that the norm family compares with each other (``normbench.recovery``)."""
    return _Plan(table).norm_groups()


def _context(row, family: str, settings: list[str], show_placement: bool) -> str:
    parts = [str(row["model"])]
    across_lengths = family in ACROSS_LENGTHS  # the arms' own texts say their lengths
    parts += [f"{k}={EMPTY if is_missing(row[k]) else row[k]}" for k in settings
              if k != family and not (across_lengths and k in budget.SETTINGS)]
    if show_placement and family != "placement":
        parts.append(f"norm {row['placement']} the ReLU")
    if family != "norm":
        parts.append(str(row["norm"]))
    if family not in BATCH_FAMILIES:
        parts.append(_batch_text(row) if family != "norm" else f"batch {row['batch_size']}")
    return ", ".join(parts)


def compare(table: pd.DataFrame) -> pd.DataFrame:
    """Every contrast of `table` (an aggregate, with or without --select-best) with its tests, one row each
    (COLUMNS), in the order batch, norm, other settings."""
    plan = _Plan(table)
    plan.batches()
    plan.batches_across_lengths()
    plan.norms()
    plan.other_settings()
    show_placement = table["placement"].nunique() > 1
    rows = []
    for family, i, j in plan.pairs:
        arm, ref = table.iloc[i], table.iloc[j]
        a, b = seed_values(arm["seed_test_acc"]), seed_values(ref["seed_test_acc"])
        welch = stats.welch(list(a.values()), list(b.values()))
        shared = sorted(a) == sorted(b) and len(a) >= 2
        paired = stats.paired([a[s] for s in sorted(a)], [b[s] for s in sorted(a)]) if shared else None
        rows.append({
            "family": family,
            "context": _context(arm, family, plan.settings, show_placement),
            "arm": _value_text(arm, family),
            "reference": _value_text(ref, family),
            "arm_mean": arm["test_acc_mean"],
            "reference_mean": ref["test_acc_mean"],
            "diff": welch.diff if len(a) >= 2 and len(b) >= 2 else arm["test_acc_mean"] - ref["test_acc_mean"],
            "ci_low": welch.low, "ci_high": welch.high, "p": welch.p,
            "paired_ci_low": paired.low if paired else math.nan,
            "paired_ci_high": paired.high if paired else math.nan,
            "paired_p": paired.p if paired else math.nan,
            "n_arm": len(a), "n_reference": len(b),
            "seeds_arm": " ".join(map(str, sorted(a))), "seeds_reference": " ".join(map(str, sorted(b))),
            "arm_lr": arm[plan.lr], "reference_lr": ref[plan.lr],
        })
    out = pd.DataFrame(rows, columns=[c for c in COLUMNS if c not in ("p_holm", "verdict")])
    out["p_holm"] = stats.holm(list(out["p"].astype(float))) if len(out) else []
    out["verdict"] = [verdict(d, p) for d, p in zip(out["diff"], out["p_holm"])]
    return out[COLUMNS]


def verdict(diff: float, p_holm: float) -> str:
    if math.isnan(p_holm) or p_holm >= ALPHA:
        return NO_DIFFERENCE
    return HIGHER if diff > 0 else LOWER


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------

def fmt_p(p: float) -> str:
    if math.isnan(p):
        return EMPTY
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def fmt_points(value: float) -> str:
    return EMPTY if math.isnan(value) else f"{value:+.2f}"


def fmt_ci(low: float, high: float) -> str:
    return EMPTY if math.isnan(low) else f"[{low:+.2f}, {high:+.2f}]"


def comparisons_title(comparisons: pd.DataFrame) -> str:
    return (f"Comparisons: {len(comparisons)} contrasts, test accuracy (%) of an arm minus its reference's; "
            f"95% CI and p from Welch's t-test over completed seeds, Holm-adjusted over the {len(comparisons)}")


def comparisons_notes(comparisons: pd.DataFrame) -> list[str]:
    families = set(comparisons["family"])
    across = (" Where a smaller batch ran a different length from the largest: against it at equal optimizer steps "
              "(batch at equal steps) or equal training images (batch at equal images)."
              if families & set(ACROSS_LENGTHS) else "")
    return [
        "Contrasts: within a norm every batch against the largest (batch); within a batch every norm against "
        "BN, a batch-independent norm against BN at each of its normalization batches (norm); any other "
        f"setting that differs against its first value (its own name).{across}",
        f"Verdict: higher / lower where the Holm-adjusted p < {ALPHA:g}, otherwise no detectable difference. "
        "Paired: the paired t-test's p where both arms ran the same seeds (the same data draws).",
    ]


def format_comparisons(comparisons: pd.DataFrame) -> pd.DataFrame:
    c = comparisons
    return pd.DataFrame({
        "family": c["family"],
        "context": c["context"],
        "arm": c["arm"],
        "vs": c["reference"],
        "arm acc": [f"{v:.2f}" for v in c["arm_mean"]],
        "vs acc": [f"{v:.2f}" for v in c["reference_mean"]],
        "difference": [fmt_points(v) for v in c["diff"]],
        "95% CI": [fmt_ci(lo, hi) for lo, hi in zip(c["ci_low"], c["ci_high"])],
        "p": [fmt_p(p) for p in c["p"]],
        "Holm p": [fmt_p(p) for p in c["p_holm"]],
        "paired p": [fmt_p(p) for p in c["paired_p"]],
        "seeds": [f"{a} vs {b}" for a, b in zip(c["n_arm"], c["n_reference"])],
        "verdict": c["verdict"],
    })


def comparisons_markdown(comparisons: pd.DataFrame) -> str:
    return to_markdown(format_comparisons(comparisons), comparisons_title(comparisons), comparisons_notes(comparisons))


def comparisons_latex(comparisons: pd.DataFrame) -> str:
    return to_latex(format_comparisons(comparisons), comparisons_title(comparisons), comparisons_notes(comparisons))


def _p_clause(name: str, p: float) -> str:
    text = fmt_p(p)
    return f"{name} {text}" if text.startswith("<") else f"{name} = {text}"


def finding(row) -> str:
    """One sentence for one contrast, every number from the comparison."""
    tests = (f"95% CI of the difference {fmt_ci(row['ci_low'], row['ci_high'])}, {_p_clause('p', row['p'])}, "
             f"{_p_clause('Holm-adjusted p', row['p_holm'])}")
    if not math.isnan(row["paired_p"]):
        tests += f", {_p_clause('paired p', row['paired_p'])}"
    means = f"{row['arm_mean']:.2f}% against {row['reference_mean']:.2f}%, {row['n_arm']} and {row['n_reference']} seeds"
    at = "at " if row["family"] in BATCH_FAMILIES else ""
    if row["verdict"] == NO_DIFFERENCE:
        return (f"{row['context']}: {row['arm']} against {row['reference']}: no detectable difference "
                f"({fmt_points(row['diff'])} points; {means}; {tests}).")
    return (f"{row['context']}: {at}{row['arm']}, {abs(row['diff']):.2f} points {row['verdict']} than "
            f"{at}{row['reference']} ({means}; {tests}).")


FAMILY_TITLES = {"batch": "Batch size within each norm",
                 EQUAL_STEPS: "Batch size within each norm at equal optimizer steps (different training images)",
                 EQUAL_IMAGES: "Batch size within each norm at equal training images (different optimizer steps)",
                 "norm": "Each norm against BN",
                 "placement": "Placement: the norm after the ReLU against before it"}


def findings_markdown(comparisons: pd.DataFrame, table: pd.DataFrame, runs: pd.DataFrame) -> str:
    """findings.md: the report's claims, generated: one sentence per contrast (grouped by family, the
    detected differences first), then the arms at chance and the runs that did not complete."""
    lines = ["# Findings (generated from comparisons.csv and table.csv; every number is in one of them)", ""]
    for family in dict.fromkeys(comparisons["family"]):
        rows = comparisons[comparisons["family"] == family]
        detected = rows[rows["verdict"] != NO_DIFFERENCE]
        lines += [f"## {FAMILY_TITLES.get(family, f'{family} against its first value')}", "",
                  f"{len(detected)} of {len(rows)} contrasts differ after Holm's correction over all "
                  f"{len(comparisons)} of the report.", ""]
        lines += [f"- {finding(r)}" for _, r in pd.concat([detected, rows[rows['verdict'] == NO_DIFFERENCE]]).iterrows()]
        lines.append("")
    lines += _status_findings(table, runs)
    return "\n".join(lines).rstrip() + "\n"


def _row_text(row, lr_column: str) -> str:
    placement = f", norm {row['placement']} the ReLU" if row["placement"] != identity.PLACEMENTS[0] else ""
    return f"{row['model']}{placement}, {row['norm']}, {_batch_text(row)}, base lr {row[lr_column]:g}"


def _pick_findings(table: pd.DataFrame) -> list[str]:
    """The lr picks that say little: within the validation noise of the runner-up, or at the grid's edge."""
    lines = []
    noisy = table[table["lr_within_noise"].astype(bool)]
    lines.append(f"- lr picks within the validation noise of the runner-up (the two rates are a coin toss): "
                 f"{len(noisy)} of {len(table)}" + (":" if len(noisy) else "."))
    for _, row in noisy.iterrows():
        lines.append(f"  - {_row_text(row, 'lr_selected')}: margin {row['lr_margin']:+.2f} validation points")
    edge = table[lr_at_edge(table)]
    lines.append(f"- lr picks at the edge of the rates tried (the best rate may lie beyond): {len(edge)} of {len(table)}"
                 + (":" if len(edge) else "."))
    for _, row in edge.iterrows():
        lines.append(f"  - {_row_text(row, 'lr_selected')} (tried {row['lr_candidates'].replace(';', ', ')})")
    heldout = table["heldout_seeds"].fillna("").astype(str)
    if (heldout != "").any():
        seeds = " / ".join(sorted(set(heldout[heldout != ""])))
        lines.append(f"- Held-out test accuracy: table.md's \"test acc (held-out seeds)\" is the mean over seeds {seeds}, "
                     "which took no part in the pick; \"test acc\" also counts the tuning seed.")
    return lines


def _status_findings(table: pd.DataFrame, runs: pd.DataFrame) -> list[str]:
    lines = ["## Arms and runs", ""]
    chance = table[table["at_chance"]]
    for _, row in chance.iterrows():
        lines.append(f"- At chance ({CHANCE_ACC:g}%): {_row_text(row, lr_column(table))}, {row['test_acc_mean']:.2f}% over "
                     f"{row['n_completed']} seeds; it never learned.")
    if "lr_margin" in table.columns:
        lines += _pick_findings(table)
    minutes = runs["wall_time_s"].dropna() / 60.0
    if len(minutes):
        lines.append(f"- Run time: {minutes.sum() / 60.0:.1f} h over {len(minutes)} runs, {minutes.min():.1f} to "
                     f"{minutes.max():.1f} min a run (each run's wall_time_s, on its machine and thread count).")
    not_completed = runs[runs["status"] != summary.COMPLETED]
    lines.append(f"- Runs: {len(runs)}, of which {len(runs) - len(not_completed)} completed"
                 + (":" if len(not_completed) else "; none failed or diverged."))
    for _, run in not_completed.sort_values("path").iterrows():
        lines.append(f"  - {run['status']}: {run['run_name'] if isinstance(run.get('run_name'), str) else run['path']}")
    return lines + [""]
