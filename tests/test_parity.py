"""bf16 against fp32 (scripts/parity.py) and the t-tests behind it (normbench/stats.py)."""

from __future__ import annotations

import math
import sys

import pytest

from normbench import stats
from tests.conftest import REPO, TINY_OVERRIDES, run_cli, slow_without_bf16_units


def test_welch_matches_its_formula():
    a, b = [71.0, 73.5, 72.0, 74.0], [70.0, 70.5, 72.5]
    d = stats.welch(a, b)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    var = lambda xs: sum((x - mean(xs)) ** 2 for x in xs) / (len(xs) - 1)  # noqa: E731
    se2 = var(a) / len(a) + var(b) / len(b)
    df = se2 ** 2 / ((var(a) / len(a)) ** 2 / (len(a) - 1) + (var(b) / len(b)) ** 2 / (len(b) - 1))
    from scipy.stats import t

    half = t.ppf(0.975, df) * math.sqrt(se2)
    assert d.diff == pytest.approx(mean(a) - mean(b))
    assert (d.low, d.high) == pytest.approx((d.diff - half, d.diff + half))
    assert d.p == pytest.approx(2 * t.sf(abs(d.diff) / math.sqrt(se2), df))
    assert math.isnan(stats.welch([1.0], [2.0, 3.0]).diff)  # one run has no spread


def test_paired_uses_the_pairs():
    """The paired test sees a constant shift as certain where Welch's does not."""
    a, b = [60.0, 70.0, 80.0], [61.0, 71.2, 80.9]
    assert stats.paired(a, b).high < 0 < stats.welch(a, b).high
    with pytest.raises(ValueError):
        stats.paired([1.0, 2.0], [1.0])


@slow_without_bf16_units  # a bf16 arm beside each fp32 one
def test_parity_table_from_a_real_sweep(tiny_data, tmp_path):
    """Runs in both precisions over two seeds: one row per arm, its difference and verdict."""
    out = tmp_path / "runs"
    result = run_cli(["-m", *TINY_OVERRIDES, f"data.root={tiny_data}", f"out_dir={out}", "norm=bn,gn",
                      "amp=false,true", "seed=0,1", "gap_train_images=0"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "cnn/bn/bs8-bf16-cl/lr0.1/ep1/seed1/summary.json").is_file()  # bf16 in BN's preferred layout
    assert (out / "cnn/gn/bs8-bf16/lr0.1/ep1/seed1/summary.json").is_file()  # GN's is contiguous
    sys.path.insert(0, str(REPO / "scripts"))
    import parity

    rows = {row["norm"]: row for row in parity.parity_rows(str(out))}
    assert set(rows) == {"bn", "gn"}
    for row in rows.values():
        assert len(row["fp32"]) == len(row["bf16"]) == 2
        assert row["welch"].diff == pytest.approx(sum(row["bf16"]) / 2 - sum(row["fp32"]) / 2)
        assert row["passes"] == (abs(row["welch"].diff) <= parity.MAX_POINTS or row["welch"].contains_zero())
    table = parity.markdown(list(rows.values()), "python scripts/parity.py x")
    assert table.count("\n| cnn |") == 2 and "Every arm passes" in table
