"""The comparisons and findings of a report (normbench.comparisons) and the honest lr pick (table.py):
which rows are contrasted, the tests' numbers against scipy's, Holm's adjustment, the verdict rule, the
paired test only on shared seeds, and the pick's tie rule, margin, noise flag, held-out seeds and grid
failures."""

from __future__ import annotations

import math

import pytest
from scipy import stats as scipy_stats

from normbench import comparisons, report, stats
from tests.test_report import make_run


def _table(root, select_best=None):
    return report.aggregate(report.collect_runs([root]), select_best=select_best)


def _arms(root, arms):
    """arms: (norm, virtual_batch, [test accuracy per seed], lr)."""
    for norm, vb, accs, lr in arms:
        for seed, acc in enumerate(accs):
            make_run(root, norm=norm, batch_size=32, virtual_batch=vb, seed=seed, lr=lr, test_accs=[acc - 5, acc])


def test_holm_matches_its_definition():
    p = [0.01, 0.04, 0.03, math.nan, 0.2]
    # sorted 0.01, 0.03, 0.04, 0.2 (m = 4): 0.04, max(0.04, 0.09), max(0.09, 0.08), max(0.09, 0.2)
    assert stats.holm(p)[:3] == pytest.approx([0.04, 0.09, 0.09]) and math.isnan(stats.holm(p)[3])
    assert stats.holm(p)[4] == pytest.approx(0.2)
    assert stats.holm([0.5, 0.6]) == [1.0, 1.0]


def test_the_contrasts_a_virtual_batch_sweep_implies(tmp_path):
    """BN at norm batch 2 against 32 (batch family); every norm against BN at each normalization batch, a
    batch-independent one against both (norm family); the numbers are Welch's and Holm's over all of them."""
    bn32, bn2, brn2, gn = [60.0, 61.0, 62.5], [40.0, 43.0, 41.0], [50.0, 52.0, 47.0], [55.0, 56.0, 54.5]
    _arms(tmp_path, [("bn", 32, bn32, 0.1), ("bn", 2, bn2, 0.1), ("brn", 2, brn2, 0.1), ("gn", None, gn, 0.1)])
    c = comparisons.compare(_table(tmp_path))
    pairs = {(r.family, r.arm, r.reference) for r in c.itertuples()}
    assert pairs == {
        ("batch", "batch 32, norm batch 2", "batch 32"),
        ("norm", "gn", "bn"), ("norm", "gn", "bn (norm batch 2)"), ("norm", "brn (norm batch 2)", "bn (norm batch 2)"),
    }
    row = c[c["family"] == "batch"].iloc[0]
    expected = scipy_stats.ttest_ind(bn2, bn32, equal_var=False)
    assert row["diff"] == pytest.approx(sum(bn2) / 3 - sum(bn32) / 3)
    assert row["p"] == pytest.approx(expected.pvalue)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(tuple(expected.confidence_interval(0.95)))
    assert list(c["p_holm"]) == pytest.approx(stats.holm(list(c["p"])))
    assert row["paired_p"] == pytest.approx(scipy_stats.ttest_rel(bn2, bn32).pvalue)  # seeds 0, 1, 2 on both sides
    assert row["verdict"] == "lower"
    gn_vs_bn2 = c[(c["arm"] == "gn") & (c["reference"] == "bn (norm batch 2)")].iloc[0]
    assert gn_vs_bn2["verdict"] == "higher"


def test_a_difference_significant_only_before_the_correction_is_no_detectable_difference(tmp_path):
    """brn vs bn at norm batch 2 has p < 0.05 alone but not after Holm over the report's contrasts."""
    _arms(tmp_path, [("bn", 32, [60.0, 61.0, 62.0], 0.1), ("bn", 2, [40.0, 42.0, 41.0], 0.1),
                     ("brn", 2, [43.0, 45.5, 44.0], 0.1), ("gn", None, [41.0, 41.5, 40.5], 0.1)])
    c = comparisons.compare(_table(tmp_path))
    row = c[c["arm"] == "brn (norm batch 2)"].iloc[0]
    assert row["p"] < 0.05 <= row["p_holm"]
    assert row["verdict"] == comparisons.NO_DIFFERENCE
    findings = comparisons.findings_markdown(c, _table(tmp_path), report.collect_runs([tmp_path]))
    sentence = next(line for line in findings.splitlines() if "brn (norm batch 2)" in line)
    assert "no detectable difference" in sentence and f"p = {row['p']:.3f}" in sentence


def test_paired_test_only_where_both_arms_ran_the_same_seeds(tmp_path):
    _arms(tmp_path, [("bn", 32, [60.0, 61.0, 62.0], 0.1), ("gn", None, [50.0, 52.0], 0.1)])
    make_run(tmp_path, norm="gn", batch_size=32, seed=5, test_accs=[40.0, 51.0])
    row = comparisons.compare(_table(tmp_path)).iloc[0]
    assert (row["n_arm"], row["n_reference"]) == (3, 3) and row["seeds_arm"] == "0 1 5"
    assert math.isnan(row["paired_p"])


def test_a_placement_sweep_contrasts_after_against_before(tmp_path):
    for placement, accs in (("before", [50.0, 51.0, 52.0]), ("after", [55.0, 56.0, 57.5])):
        for seed, acc in enumerate(accs):
            make_run(tmp_path, norm="gn", placement=placement, seed=seed, test_accs=[acc])
    c = comparisons.compare(_table(tmp_path))
    assert list(zip(c["family"], c["arm"], c["reference"])) == [("placement", "placement=after", "placement=before")]


def test_findings_name_the_runs_that_did_not_complete_in_the_whole_grid(tmp_path):
    """A diverged run at an lr that was not picked still counts, in the findings and the table's columns."""
    for lr, val in ((0.1, 50.0), (0.4, 40.0)):
        for seed in range(2):
            make_run(tmp_path, norm="bn", lr=lr, seed=seed, test_accs=[45.0 + seed], val_accs=[val + seed])
    make_run(tmp_path, norm="bn", lr=0.4, seed=2, status="diverged", test_accs=[10.0])
    runs = report.collect_runs([tmp_path])
    table = report.aggregate(runs, select_best="lr")
    assert (float(table["lr_selected"].iloc[0]), int(table["n_diverged"].iloc[0])) == (0.1, 1)
    findings = comparisons.findings_markdown(comparisons.compare(table), table, runs)
    assert "Runs: 5, of which 4 completed:" in findings and "diverged: resnet20/bn/bs32/lr0.4/seed2" in findings


def test_an_lr_tie_goes_to_the_lower_rate_and_is_flagged(tmp_path):
    for lr in (0.05, 0.1, 0.2):
        make_run(tmp_path, norm="bn", lr=lr, seed=0, test_accs=[50.0], val_accs=[52.2 if lr != 0.2 else 30.0])
    table = report.aggregate(report.collect_runs([tmp_path]), select_best="lr")
    row = table.iloc[0]
    assert float(row["lr_selected"]) == 0.05 and row["lr_margin"] == 0.0 and bool(row["lr_within_noise"])
    display = report.format_table(table)
    assert display["lr margin"].iloc[0] == "+0.00 ≈"


def test_a_clear_lr_margin_is_not_flagged_and_held_out_seeds_are_reported(tmp_path):
    """Seed 0 runs at every candidate and picks the lr; seeds 1, 2 run at the pick only: the held-out mean
    is theirs. With 5,000 validation images a 10-point margin is far outside the noise (about 1 point)."""
    for lr, val in ((0.1, 60.0), (0.4, 50.0)):
        make_run(tmp_path, norm="bn", lr=lr, seed=0, test_accs=[58.0], val_accs=[val])
    for seed, acc in ((1, 56.0), (2, 57.0)):
        make_run(tmp_path, norm="bn", lr=0.1, seed=seed, test_accs=[acc], val_accs=[61.0])
    table = report.aggregate(report.collect_runs([tmp_path]), select_best="lr")
    row = table.iloc[0]
    assert row["lr_margin"] == pytest.approx(10.0) and not bool(row["lr_within_noise"])
    assert row["heldout_seeds"] == "1 2" and row["test_acc_heldout_mean"] == pytest.approx(56.5)
    assert row["test_acc_mean"] == pytest.approx(57.0)


def _sized_run(root, norm, batch_size, epochs, steps, acc, seed, **budget_config):
    """A run at `epochs` that took `steps` optimizer steps (its training images: steps x batch), its config
    holding `budget_config` (budget.unit / budget.length) where given."""
    import json

    from normbench import summary

    run_dir = make_run(root / f"ep{epochs}-{budget_config.get('length', '')}", norm=norm, batch_size=batch_size,
                       epochs=epochs, seed=seed, test_accs=[acc - 5, acc])
    record = json.loads((run_dir / "summary.json").read_text())
    record["steps_done"] = steps
    if budget_config:
        record["config"]["budget"] = budget_config
    summary.write(run_dir, record)


def test_batches_of_different_lengths_are_contrasted_at_equal_steps(tmp_path):
    """Batch 2 for 1 epoch of 64 images takes 32 steps, as batch 32 does in 16 epochs: the batch family compares
    it with batch 32 at 1 epoch (equal images), the equal-steps family with batch 32 at 16 epochs; batch 32's two
    lengths are the epochs family's, and nothing else crosses lengths."""
    accs = {("bn", 32, 1): [50.0, 51.0, 52.0], ("bn", 32, 16): [70.0, 71.0, 69.0], ("bn", 2, 1): [40.0, 42.0, 41.0],
            ("gn", 32, 1): [45.0, 44.0, 46.0], ("gn", 32, 16): [66.0, 65.0, 67.5], ("gn", 2, 1): [44.0, 43.5, 45.0]}
    for (norm, batch, epochs), values in accs.items():
        for seed, acc in enumerate(values):
            _sized_run(tmp_path, norm, batch, epochs, epochs * 64 // batch, acc, seed)
    c = comparisons.compare(_table(tmp_path))
    pairs = {(r.family, r.context, r.arm, r.reference) for r in c.itertuples()}
    steps = comparisons.EQUAL_STEPS
    assert {p for p in pairs if p[0] in comparisons.BATCH_FAMILIES} == {
        *(("batch", f"resnet20, epochs=1, {norm}", "batch 2", "batch 32") for norm in ("bn", "gn")),
        *((steps, f"resnet20, {norm}", "batch 2 (32 steps, 64 images)", "batch 32 (32 steps, 1024 images)")
          for norm in ("bn", "gn"))}
    row = c[(c["family"] == steps) & (c["context"] == "resnet20, bn")].iloc[0]
    expected = scipy_stats.ttest_ind(accs[("bn", 2, 1)], accs[("bn", 32, 16)], equal_var=False)
    assert row["diff"] == pytest.approx(41.0 - 70.0) and row["p"] == pytest.approx(expected.pvalue)
    assert len(c) == 4 + 2 + 3  # the batch families, epochs 16 vs 1 per norm at batch 32, gn vs bn at each row
    assert "(batch at equal steps)" in comparisons.comparisons_markdown(c)
    findings = comparisons.findings_markdown(c, _table(tmp_path), report.collect_runs([tmp_path]))
    assert "## Batch size within each norm at equal optimizer steps" in findings
    assert "resnet20, bn: at batch 2 (32 steps, 64 images), 29.00 points lower than at batch 32 (32 steps" in findings


def test_batches_of_step_budgets_are_contrasted_at_equal_images(tmp_path):
    """A steps budget: batch 2 for 32 steps (64 images) against batch 32 for 2 steps (64 images), the lengths
    differing in budget.length: the equal-images family (the batch family has equal steps)."""
    for seed, (small, large) in enumerate([(40.0, 50.0), (41.0, 52.0), (42.0, 51.0)]):
        _sized_run(tmp_path, "bn", 2, None, 32, small, seed, unit="steps", length=32)
        _sized_run(tmp_path, "bn", 32, None, 2, large, seed, unit="steps", length=2)
    c = comparisons.compare(_table(tmp_path))
    assert [(r.family, r.arm, r.reference) for r in c.itertuples()] == [
        (comparisons.EQUAL_IMAGES, "batch 2 (32 steps, 64 images)", "batch 32 (2 steps, 64 images)")]
