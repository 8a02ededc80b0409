"""The training length as a report axis (normbench/length.py): the arms by length, images and seconds to the
target, the BN - GN gap with Welch CIs, the two length figures, and the length contrasts of the comparisons."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from normbench import report, stats, summary
from tests.conftest import TINY_OVERRIDES, run_cli
from tests.test_report import make_grid, make_run

# Final test accuracy per norm, length (epochs) and seed; each run's curve climbs to it linearly.
FINALS = {("bn", 2): [50.0, 52.0, 51.0], ("bn", 4): [60.0, 62.0, 61.5], ("bn", 8): [70.0, 71.0, 69.0],
          ("gn", 2): [30.0, 33.0, 31.0], ("gn", 4): [45.0, 47.0, 44.0], ("gn", 8): [66.0, 68.0, 67.0]}


def _curve(final: float, epochs: int) -> list[float]:
    return [final * (epoch + 1) / epochs for epoch in range(epochs)]


def make_length_sweep(root):
    for (norm, epochs), finals in FINALS.items():
        for seed, final in enumerate(finals):
            run_dir = make_run(root / f"ep{epochs}", norm=norm, epochs=epochs, seed=seed,
                               test_accs=_curve(final, epochs))
            record = json.loads((run_dir / "summary.json").read_text())
            record["steps_done"] = epochs * 100  # metrics.csv: 100 steps an epoch
            summary.write(run_dir, record)


@pytest.fixture
def length_report(tmp_path):
    make_length_sweep(tmp_path / "runs")
    written = report.write_report([tmp_path / "runs"], tmp_path / "report", target_acc=40.0)
    return tmp_path / "report", written


def test_length_table_gives_accuracy_and_images_and_seconds_to_target(length_report):
    out, written = length_report
    rows = pd.read_csv(out / "length.csv")
    bn = rows[rows["norm"] == "bn"].set_index("train_images")
    assert list(bn.index) == [2 * 100 * 32, 4 * 100 * 32, 8 * 100 * 32]  # steps x batch 32
    assert bn.loc[6400, "test_acc_mean"] == pytest.approx(sum(FINALS[("bn", 2)]) / 3)
    # bn at 8 epochs: 40% is first reached at epoch ceil(40 / final * 8) of each seed's curve
    firsts = [next(e + 1 for e, acc in enumerate(_curve(f, 8)) if acc >= 40.0) for f in FINALS[("bn", 8)]]
    images = [e * 100 * 32 for e in firsts]
    assert bn.loc[25600, "images_to_target_mean"] == pytest.approx(sum(images) / 3)
    assert bn.loc[25600, "seconds_to_target_mean"] == pytest.approx(sum(30.0 * e for e in firsts) / 3)
    gn = rows[rows["norm"] == "gn"].set_index("train_images")
    assert gn.loc[6400, "n_reached"] == 0 and pd.isna(gn.loc[6400, "images_to_target_mean"])  # never at 40%
    text = (out / "length.md").read_text()
    assert "images to 40%" in text and "seconds to 40%" in text and "0/3" in text


def test_the_gap_is_bn_minus_gn_with_welchs_ci_at_each_length(length_report):
    out, written = length_report
    text = (out / "length.md").read_text()
    assert "Test accuracy of bn minus gn" in text
    for epochs in (2, 4, 8):
        diff = stats.welch(FINALS[("bn", epochs)], FINALS[("gn", epochs)])
        assert f"{diff.diff:+.2f}" in text and f"[{diff.low:+.2f}, {diff.high:+.2f}]" in text
    assert {"length_error.png", "length_gap.png"} <= set(written)


def test_the_change_of_the_gap_from_shortest_to_longest_is_tested_as_an_interaction(length_report):
    """The gap at 8 epochs minus the gap at 2 (bn - gn), with the CI and p of that difference of differences."""
    out, _ = length_report
    change = stats.welch_of_differences(FINALS[("bn", 8)], FINALS[("gn", 8)], FINALS[("bn", 2)], FINALS[("gn", 2)])
    gap = lambda e: sum(FINALS[("bn", e)]) / 3 - sum(FINALS[("gn", e)]) / 3  # noqa: E731
    assert change.diff == pytest.approx(gap(8) - gap(2)) and change.high < 0  # it narrows, beyond the noise
    text = (out / "length.md").read_text().split("Change of the bn minus gn gap")[1]
    assert f"| 2 epochs | 8 epochs | {gap(2):+.2f} | {gap(8):+.2f} | {change.diff:+.2f} |" in text
    assert f"[{change.low:+.2f}, {change.high:+.2f}]" in text


def test_a_difference_of_differences_with_two_constant_samples_is_welchs_test_of_the_other_two():
    """With c and d without spread the interaction's CI and p are Welch's for a and b, shifted by mean(c) - mean(d)
    (scipy's ttest_ind: an independent check of the standard error and the degrees of freedom)."""
    a, b = [50.0, 52.0, 51.0, 55.0], [30.0, 33.0, 31.0]
    welch = stats.welch(a, b)
    both = stats.welch_of_differences(a, b, [4.0, 4.0, 4.0], [1.0, 1.0])
    assert both.diff == pytest.approx(welch.diff - 3.0)
    assert (both.low, both.high) == pytest.approx((welch.low - 3.0, welch.high - 3.0))
    assert both.p == pytest.approx(stats.welch([x - 3.0 for x in a], b).p)
    swapped = stats.welch_of_differences([4.0, 4.0, 4.0], [1.0, 1.0], a, b)
    assert swapped.diff == pytest.approx(-both.diff) and swapped.p == pytest.approx(both.p)
    assert math.isnan(stats.welch_of_differences(a, b, [4.0], [1.0, 1.0]).p)  # a sample of one run


def test_another_pair_for_the_gap(tmp_path):
    make_length_sweep(tmp_path / "runs")
    written = report.write_report([tmp_path / "runs"], tmp_path / "report", gap=("gn", "bn"))
    assert "Test accuracy of gn minus bn" in written["length.md"].read_text()
    assert report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "r2"), "--gap", "bn"]) == 2


def test_comparisons_contrast_each_length_with_the_shortest(length_report):
    out, _ = length_report
    contrasts = pd.read_csv(out / "comparisons.csv")
    by_length = contrasts[contrasts["family"] == "epochs"]
    assert sorted(zip(by_length["context"], by_length["arm"], by_length["reference"])) == [
        (f"resnet20, {norm}, batch 32", f"epochs={e}", "epochs=2") for norm in ("bn", "gn") for e in (4, 8)]


def test_a_report_of_one_length_has_no_length_section(tmp_path):
    make_grid(tmp_path / "runs")
    written = report.write_report([tmp_path / "runs"], tmp_path / "report")
    assert not {"length.md", "length.csv", "length_error.png", "length_gap.png"} & set(written)
    assert not (tmp_path / "report" / "length.md").exists()


def test_a_real_sweep_over_step_budgets_reports_its_lengths(tiny_data, tmp_path):
    """normbench -m budget.length=10,20 with budget.unit=steps: two lengths per norm, one folder each, and the
    report's length section from their summaries and curves."""
    out = tmp_path / "sweep"
    result = run_cli(["-m", *TINY_OVERRIDES, f"data.root={tiny_data}", f"out_dir={out}", "norm=bn,gn",
                      "budget.unit=steps", "budget.length=10,20", "stat_gap_every=0", "report_at_end=true"])
    assert result.returncode == 0, result.stderr
    assert sorted(p.parent.parent.name for p in out.glob("cnn/*/bs8/lr0.1/*/seed0/summary.json")) == \
        ["steps10", "steps10", "steps20", "steps20"]
    rows = pd.read_csv(out / "report" / "length.csv")
    assert sorted(rows["train_images"]) == [80, 80, 160, 160] and set(rows["length"]) == {"10 steps", "20 steps"}
    assert (out / "report" / "length_error.png").is_file() and (out / "report" / "length_gap.png").is_file()


def test_the_length_figures_draw_each_arm_against_training_images(tmp_path):
    """length_error: one line per arm over the lengths' training images (log2 axis), in the norm's own colour,
    CI bars, a title that says so and the protocol; length_gap: bn - gn at each length, with a zero line."""
    from normbench.figures import FIGURES, norm_style

    make_length_sweep(tmp_path / "runs")
    loaded = report.load_report([tmp_path / "runs"], target_acc=40.0)
    error = FIGURES["length_error"].draw(loaded.table, loaded.curves, loaded.protocol)
    ax = error.axes[0]
    assert ax.get_xscale() == "log"
    lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert set(lines) == {"bn", "gn"}
    assert list(lines["bn"].get_xdata()) == [6400, 12800, 25600]
    assert list(lines["gn"].get_ydata()) == pytest.approx([100 - sum(FINALS[("gn", e)]) / 3 for e in (2, 4, 8)])
    assert lines["gn"].get_color() == norm_style("gn").color
    title = error.get_suptitle()
    assert "95% CI" in title and "3 seeds" in title and "Protocol:" in title
    gap = FIGURES["length_gap"].draw(loaded.table, loaded.curves, loaded.protocol)
    diffs = [line for line in gap.axes[0].get_lines() if line.get_label() == "bn − gn"]
    assert len(diffs) == 1 and list(diffs[0].get_ydata()) == pytest.approx(
        [sum(FINALS[("bn", e)]) / 3 - sum(FINALS[("gn", e)]) / 3 for e in (2, 4, 8)])


def test_the_report_takes_its_target_from_the_runs_configs(tmp_path):
    """Without --target-acc the "to X%" columns use the target_acc the runs were configured with (a preset's), so
    `normbench-report runs/` rebuilds what the sweep wrote; where the runs disagree, the config default."""
    make_length_sweep(tmp_path / "runs")
    paths = sorted((tmp_path / "runs").glob("**/summary.json"))
    for path in paths:
        record = json.loads(path.read_text())
        record["config"]["target_acc"] = 40.0
        summary.write(path.parent, record)
    assert report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0
    assert "images to 40%" in (tmp_path / "report" / "length.md").read_text()
    record = json.loads(paths[0].read_text())
    record["config"]["target_acc"] = 70.0
    summary.write(paths[0].parent, record)
    assert report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "mixed")]) == 0
    assert f"images to {report.DEFAULT_TARGET_ACC:g}%" in (tmp_path / "mixed" / "length.md").read_text()
