"""How much of BN's small-batch loss each arm recovers (normbench/recovery.py): BN's loss from the largest to the
smallest normalization batch, each arm's gain over BN at the smallest and gap to BN at the largest, with Welch's
CIs, Holm over the file's contrasts, the share recovered and its reading."""

from __future__ import annotations

import pandas as pd
import pytest

from normbench import recovery, report, stats
from tests.test_report import make_run

# Final test accuracy per (norm, virtual batch), three seeds, SGD batch 128.
FINALS = {
    ("bn", 32): [60.0, 60.5, 59.3], ("bn", 2): [40.0, 41.2, 39.1],
    ("brn", 32): [59.0, 59.6, 58.2], ("brn", 2): [50.0, 51.5, 49.1],  # part of it
    ("gn", None): [59.8, 60.9, 60.2],                                 # batch-independent: all of it
    ("ln", None): [40.5, 39.2, 41.6],                                 # none detected
    ("frn", None): [30.0, 31.4, 29.3],                                # less than none
}


@pytest.fixture
def recovery_report(tmp_path):
    for (norm, vb), finals in FINALS.items():
        for seed, final in enumerate(finals):
            make_run(tmp_path / "runs", norm=norm, batch_size=128, virtual_batch=vb, seed=seed,
                     test_accs=[final - 10, final])
    written = report.write_report([tmp_path / "runs"], tmp_path / "report")
    return tmp_path / "report", written


def test_gain_gap_and_share_of_each_arm_against_bns_loss(recovery_report):
    out, written = recovery_report
    assert {"recovery.md", "recovery.csv"} <= set(written)
    rows = pd.read_csv(out / "recovery.csv").set_index("arm")
    assert set(rows.index) == {"brn (norm batch 2)", "gn", "ln", "frn"}  # not BRN at 32, not BN
    brn = rows.loc["brn (norm batch 2)"]
    bn_32, bn_2, brn_2 = (sum(FINALS[k]) / 3 for k in (("bn", 32), ("bn", 2), ("brn", 2)))
    assert brn["bn_loss"] == pytest.approx(bn_2 - bn_32)
    assert brn["gain"] == pytest.approx(brn_2 - bn_2) and brn["gap"] == pytest.approx(brn_2 - bn_32)
    assert brn["share_recovered"] == pytest.approx((brn_2 - bn_2) / (bn_32 - bn_2))
    gain = stats.welch(FINALS[("brn", 2)], FINALS[("bn", 2)])
    assert (brn["gain_ci_low"], brn["gain_ci_high"], brn["gain_p"]) == pytest.approx((gain.low, gain.high, gain.p))
    gap = stats.welch(FINALS[("gn", None)], FINALS[("bn", 32)])
    assert rows.loc["gn", "gap_p"] == pytest.approx(gap.p)
    # Holm over the 8 gains and gaps: the adjusted p of each is what stats.holm makes of the family.
    family = [*rows["gain_p"], *rows["gap_p"]]
    assert [*rows["gain_p_holm"], *rows["gap_p_holm"]] == pytest.approx(stats.holm(family))


def test_the_reading_follows_the_adjusted_tests(recovery_report):
    out, _ = recovery_report
    readings = pd.read_csv(out / "recovery.csv").set_index("arm")["reading"]
    assert readings.to_dict() == {"brn (norm batch 2)": recovery.PART, "gn": recovery.ALL, "ln": recovery.NONE,
                                  "frn": recovery.LESS}
    text = (out / "recovery.md").read_text()
    assert "BN's loss: bn (norm batch 2) 40.10% against bn (norm batch 32) 59.93%, -19.83 points" in text
    assert "| brn (norm batch 2) | 50.20 | +10.10 |" in text and "| 51% | part of it |" in text


def test_no_recovery_file_without_bn_at_two_normalization_batches(tmp_path):
    for norm, vb in (("bn", 32), ("gn", None), ("brn", 2)):
        for seed in range(2):
            make_run(tmp_path / "runs", norm=norm, batch_size=128, virtual_batch=vb, seed=seed, test_accs=[50.0 + seed])
    written = report.write_report([tmp_path / "runs"], tmp_path / "report")
    assert "recovery.md" not in written and not (tmp_path / "report" / "recovery.md").exists()
