"""Smoke test on the real CIFAR-10 (skipped where NORMBENCH_DATA is not set)."""

import csv
import json
import os

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import run_cli

REAL = os.environ.get("NORMBENCH_DATA")
pytestmark = pytest.mark.skipif(not REAL, reason="NORMBENCH_DATA not set: the real CIFAR-10 is not available here")


@pytest.mark.slow  # 67 s; make run trains the real CIFAR-10 end to end, test_data loads it in full
def test_resnet20_bn_batch2_on_real_cifar10(tmp_path):
    out = tmp_path / "runs"
    # One thread: at batch 2 two threads beside any other busy process stall each other (50x slower measured).
    result = run_cli(["model=resnet20", "norm=bn", "batch_size=2", "epochs=1", "data.subset=2000",
                      "data.test_subset=1000", "gap_train_images=1000", f"data.root={REAL}", f"out_dir={out}"],
                     env_extra={"NORMBENCH_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr
    run_dir = out / "resnet20/bn/bs2/lr0.1/ep1/seed0"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["train_size"] == 2000 and summary["test_size"] == 1000
    assert summary["steps_done"] == 1000
    # one epoch of ResNet-20 at batch 2 on 2,000 images learns something: better than chance (10%)
    assert summary["test_acc"] > 12.0
    with open(run_dir / "metrics.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["test_acc"]) == summary["test_acc"]
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert events.Scalars("test/acc")[-1].value == pytest.approx(summary["test_acc"], rel=1e-6)
    assert events.Scalars("train/loss")[-1].step <= 2000  # x axis: training images seen
    assert events.Scalars("test/acc")[-1].step == 2000
