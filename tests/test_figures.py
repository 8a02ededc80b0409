"""Tests for the report's figures (issue 27 item 4, figures that read at a glance): every panel has a
title of its own, no two lines of a panel look alike, a batch-independent norm in an emulated
per-device sweep is a band labelled with its seed count, compared panels share their y-axis, a line
joins only batches its arm was measured at, "three errors" only where three are drawn, and the bars
and bands span the seeds (min-max, or the CI of the mean where the seeds' values are missing), as
the titles say. Checked on the matplotlib Figures that FIGURES draws from made-up run folders."""

from __future__ import annotations

import math

import numpy as np
import pytest

from normbench import summary
from normbench.figures import BAND_GID, FIGURES
from normbench.table import ci95_half_width
from tests.test_report import draw, make_run

GAP_KEYS = ("gap_train_batchstats_acc", "gap_test_batchstats_acc", "gap_test_popstats_acc")


def panels(fig) -> list:
    return [ax for ax in fig.axes if ax.get_visible()]


def drawn_lines(ax) -> list:
    """The lines a panel draws with a legend label (not error-bar caps)."""
    return [line for line in ax.get_lines() if not line.get_label().startswith("_")]


def look(line) -> tuple:
    """A line's colour and its drawn dash pattern (get_linestyle() says "--" for every dash pattern)."""
    return line.get_color(), line._unscaled_dash_pattern


def bands(ax) -> list:
    return [artist for artist in ax.collections if artist.get_gid() == BAND_GID]


def y_extent(collection) -> tuple[float, float]:
    ys = np.concatenate([path.vertices[:, 1] for path in collection.get_paths()])
    return float(ys.min()), float(ys.max())


def title_of(fig) -> str:
    return " ".join(fig.get_suptitle().split())


def record_gaps_per_epoch(run_dir) -> None:
    """Add the summary's three errors to the last epoch of metrics.csv, as the trainer's metrics do
    (the figures' bars take each seed's value from there)."""
    record = summary.read(run_dir)
    lines = (run_dir / "metrics.csv").read_text().splitlines()
    lines[0] += "," + ",".join(GAP_KEYS)
    for i in range(1, len(lines)):
        last = i == len(lines) - 1
        lines[i] += "," + ",".join(f"{record[key]}" if last and record.get(key) is not None else "" for key in GAP_KEYS)
    (run_dir / "metrics.csv").write_text("\n".join(lines) + "\n")


def forget(run_dir, key: str) -> None:
    """The run's summary without `key` (a run that did not record that error)."""
    record = summary.read(run_dir)
    record[key] = None
    summary.write(run_dir, record)


def placement_sweep(root) -> None:
    """bn at three normalization batches (virtual batches at SGD batch 32) and gn, before and after
    the ReLU, two seeds; the norm after the ReLU far worse, so that panels scaled on their own differ."""
    for placement, base in (("before", 70.0), ("after", 30.0)):
        for seed in range(2):
            for vb, drop in ((32, 0.0), (8, 3.0), (2, 12.0)):
                make_run(root, norm="bn", placement=placement, batch_size=32, virtual_batch=vb, seed=seed,
                         test_accs=[base - 20 - drop, base - drop + seed])
            make_run(root, norm="gn", placement=placement, batch_size=32, seed=seed,
                     test_accs=[base - 25, base - 5 + seed])


@pytest.fixture(scope="module")
def placement_figures(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("placement")
    placement_sweep(root)
    return {name: draw(name, [root]) for name, spec in FIGURES.items() if spec.always}  # length ones: test_length.py


def test_every_panel_has_a_title_of_its_own_that_says_what_differs(placement_figures):
    """The placement figures once had two panels titled "bn, cnn" (train_eval_gap), and one panel
    for both placements elsewhere."""
    for name, fig in placement_figures.items():
        titles = [ax.get_title() for ax in panels(fig)]
        assert all(titles) and len(set(titles)) == len(titles), (name, titles)
        assert any("before the ReLU" in t for t in titles) and any("after the ReLU" in t for t in titles), titles
        assert not any("before the ReLU" in t and "after the ReLU" in t for t in titles), titles


def test_panels_that_are_compared_share_the_y_axis(placement_figures):
    for name, fig in placement_figures.items():
        limits = {ax.get_ylim() for ax in panels(fig)}
        assert len(panels(fig)) > 1 and len(limits) == 1, (name, limits)


def test_lines_of_one_panel_never_share_colour_and_line_style(tmp_path):
    """Line styles once came from a cycle of four: bn at its fifth normalization batch looked like
    bn at its first, and two option variants of gn shared colour and style."""
    for vb in (64, 32, 16, 8, 4, 2):
        make_run(tmp_path, norm="bn", batch_size=64, virtual_batch=vb, test_accs=[50.0 + vb / 8])
    for label in ("gn", "gn-groups16", "gn-groups4"):
        make_run(tmp_path, norm="gn", norm_label=label, batch_size=64, test_accs=[45.0])

    for name in [name for name, spec in FIGURES.items() if spec.always]:
        fig = draw(name, [tmp_path])
        for ax in panels(fig):
            looks = [look(line) for line in drawn_lines(ax)]
            assert looks and len(set(looks)) == len(looks), (name, ax.get_title(), looks)
        if name.startswith("curves"):  # the six bn lines are in one panel, each in a style of its own
            assert max(sum(line.get_label().startswith("bn") for line in drawn_lines(ax)) for ax in panels(fig)) == 6


def _gn_with_a_virtual_batch_sweep(root, *, gap_curves: bool) -> None:
    """bn at normalization batches 32 and 2 (virtual batches at SGD batch 128) and gn, three seeds;
    gn's final test accuracies 50, 52 and 56."""
    for seed, gn_acc in enumerate((50.0, 52.0, 56.0)):
        runs = [make_run(root, norm="bn", batch_size=128, virtual_batch=vb, seed=seed, test_accs=[30.0, acc + seed])
                for vb, acc in ((32, 60.0), (2, 40.0))]
        runs.append(make_run(root, norm="gn", batch_size=128, seed=seed, test_accs=[30.0, gn_acc]))
        for run in runs if gap_curves else []:
            record_gaps_per_epoch(run)


def test_a_batch_independent_norm_is_a_band_over_its_seeds_labelled_one_setting(tmp_path):
    """gn's one setting once was a flat line with markers at each batch, "[batch-independent: one
    run]", with mean ± std bars (here 44.3-50.4, below its best seed's 44)."""
    _gn_with_a_virtual_batch_sweep(tmp_path, gap_curves=True)

    fig = draw("error_vs_batch", [tmp_path])
    ax = fig.axes[0]
    (band,) = bands(ax)
    assert band.get_label() == "gn [batch-independent: one setting, 3 seeds]"
    assert y_extent(band) == pytest.approx((44.0, 50.0))  # its seeds' test errors, lowest to highest
    (gn,) = [line for line in drawn_lines(ax) if line.get_label().startswith("gn")]
    assert gn.get_gid() == BAND_GID and gn.get_markevery() == []  # no marker: no batch of it was a run
    assert list(gn.get_xdata()) == [32.0, 2.0] and list(gn.get_ydata()) == pytest.approx([100 - 158 / 3] * 2)
    assert not any("one run" in line.get_label() for line in ax.get_lines())
    assert "bars and bands: min–max over the seeds" in title_of(fig)

    fig = draw("train_eval_gap", [tmp_path])
    (gn_panel,) = [ax for ax in panels(fig) if ax.get_title().startswith("gn")]
    assert "one setting, 3 seeds" in " ".join(gn_panel.get_title().split())
    assert [y_extent(b) for b in bands(gn_panel)] == [pytest.approx((34.0, 40.0)),  # (1): accuracy + 10
                                                      pytest.approx((44.0, 50.0)), pytest.approx((44.0, 50.0))]
    assert "min–max over the seeds" in title_of(fig)


def test_without_the_seeds_values_the_bars_are_the_ci_of_the_mean_and_say_so(tmp_path):
    """The runs' metrics.csv without the three errors: the train_eval_gap bars and bands are the 95%
    CI of the mean (from the table's std), stated in the title, not min-max."""
    _gn_with_a_virtual_batch_sweep(tmp_path, gap_curves=False)

    fig = draw("train_eval_gap", [tmp_path])
    (gn_panel,) = [ax for ax in panels(fig) if ax.get_title().startswith("gn")]
    errors = [50.0, 48.0, 44.0]
    mean, half = np.mean(errors), ci95_half_width(float(np.std(errors, ddof=1)), 3)
    assert y_extent(bands(gn_panel)[1]) == pytest.approx((mean - half, mean + half))
    assert "95% CI of the mean" in title_of(fig) and "min–max" not in title_of(fig)


def _measured_batch(x: float, measured: set) -> float:
    """The measured batch a (sideways-nudged) point stands for; fails for a point at none."""
    nearest = min(measured, key=lambda b: abs(math.log2(x) - math.log2(b)))
    assert abs(math.log2(x) - math.log2(nearest)) < 0.35, (x, measured)
    return nearest


def test_a_line_joins_only_batches_its_arm_was_measured_at(tmp_path):
    """brn was run at batches 32 and 2 only: its line once went straight from 32 to 2 across 8,
    where bn and gn were measured and brn was not."""
    measured = {"bn": {32, 8, 2}, "brn": {32, 2}, "gn": {32, 8, 2}}
    for norm, batches in measured.items():
        for batch in batches:
            make_run(tmp_path, norm=norm, batch_size=batch, test_accs=[40.0 + batch / 4])

    for name in ("error_vs_batch", "train_eval_gap"):
        fig = draw(name, [tmp_path])
        for ax in panels(fig):
            axis_batches = set(ax.get_xticks())
            assert axis_batches == {32, 8, 2}
            for line in drawn_lines(ax):
                norm = (line.get_label() if name == "error_vs_batch" else ax.get_title()).split(" ")[0]
                points = [_measured_batch(x, measured[norm]) if np.isfinite(x) else None for x in line.get_xdata()]
                assert {p for p in points if p is not None} == measured[norm], (name, norm, points)
                for a, b in zip(points, points[1:]):  # each drawn segment joins neighbouring batches
                    if a is not None and b is not None:
                        assert not any(min(a, b) < batch < max(a, b) for batch in axis_batches), (name, norm, points)


def test_three_errors_only_where_three_are_drawn(tmp_path):
    for norm in ("bn", "gn"):
        make_run(tmp_path / "three", norm=norm, batch_size=8)
        forget(make_run(tmp_path / "two", norm=norm, batch_size=8), "gap_train_batchstats_acc")

    three, two = draw("train_eval_gap", [tmp_path / "three"]), draw("train_eval_gap", [tmp_path / "two"])
    assert "three errors" in title_of(three) and "not recorded" not in title_of(three)
    assert all(len(drawn_lines(ax)) == 3 for ax in panels(three))
    assert "three errors" not in title_of(two) and "two errors" in title_of(two)
    assert "not recorded: (1) train error, mini-batch statistics" in title_of(two)
    assert all(len(drawn_lines(ax)) == 2 for ax in panels(two))
    assert [text.get_text()[:3] for text in two.legends[0].get_texts()] == ["(2)", "(3)"]


def test_titles_say_how_many_seeds_what_the_spread_is_and_the_protocol(tmp_path):
    """(Moved from test_report.py; the spread was mean ± std, it is the seeds' min-max now.)"""
    make_run(tmp_path / "one", norm="bn", epochs=2, subset=2000, test_accs=[30.0, 50.0])
    for seed in range(3):
        make_run(tmp_path / "three", norm="bn", seed=seed, epochs=2, subset=2000, test_accs=[30.0, 50.0 + seed])

    for name in [name for name, spec in FIGURES.items() if spec.always]:
        one, three = draw(name, [tmp_path / "one"]), draw(name, [tmp_path / "three"])
        assert "one seed" in title_of(one) and "±" not in title_of(one)
        assert "mean over 3 seeds" in title_of(three) and "±" not in title_of(three)
        assert ("min–max over the seeds" if name != "train_eval_gap" else "95% CI of the mean") in title_of(three)
        protocol = title_of(three)
        for part in ("resnet20", "2 epochs", "2000 training images", "lr = base × batch/128", "3 seeds"):
            assert part in protocol, (part, protocol)
        spread = sum(len(ax.collections) for ax in three.axes)  # error bars or bands
        assert spread > 0 and sum(len(ax.collections) for ax in one.axes) == 0
