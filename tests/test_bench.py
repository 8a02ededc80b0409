"""scripts/bench.py runs and writes its tables (no timing is asserted: speed is the bench's to report)."""

import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow  # 19 s of make test's 10 minutes; make bench runs the whole script
def test_bench_writes_per_norm_and_virtual_tables(tmp_path):
    out = tmp_path / "bench.md"
    result = subprocess.run(
        [sys.executable, "scripts/bench.py", "--sections", "norms,virtual", "--norms", "gn,lrn", "--models", "cnn",
         "--batch-sizes", "2", "--windows", "1", "--threads", "1", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert {"bn", "gn", "lrn", "cnn"} <= set(rows), text  # a row per norm, and the virtual-batch row
    assert "x" in rows["gn"] and "x" in rows["cnn"]  # ratios to BN, ghost vs true batch 2
    assert "## Targets" in text and "of 3 met" in text  # gn and lrn vs bn, ghost vs true
