"""Tests for normbench-report: fake run folders in tmp_path, no training."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from normbench import report

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BATCH_DEPENDENT_NORMS = {"bn", "brn"}
FIGURES = ("error_vs_batch.png", "curves_test_acc.png", "curves_train_loss.png")


def make_run(
    root: Path,
    *,
    norm: str = "bn",
    batch_size: int = 32,
    lr: float = 0.1,
    seed: int = 0,
    status: str = "completed",
    test_accs: list[float] | None = None,
    val_accs: list[float] | None = None,
    virtual_batch: int | None = None,
    model: str = "resnet20",
    placement: str = "before",
) -> Path:
    """Write a realistic run folder (summary.json + metrics.csv) the way the trainer does."""
    test_accs = [40.0, 60.0, 70.0] if test_accs is None else test_accs
    norm_dir = norm if placement == "before" else f"{norm}_after"
    batch_dir = f"bs{batch_size}" if virtual_batch is None else f"bs{batch_size}_vb{virtual_batch}"
    run_name = f"{model}/{norm_dir}/{batch_dir}/lr{lr:g}/seed{seed}"
    run_dir = root / run_name
    run_dir.mkdir(parents=True)
    n_epochs = len(test_accs)
    train_losses = [2.0 / (epoch + 1) for epoch in range(n_epochs)]
    norm_batch = (virtual_batch or batch_size) if norm in BATCH_DEPENDENT_NORMS else None
    finished = status == "completed"
    has_val = val_accs is not None
    summary = {
        "run_name": run_name,
        "status": status,
        "reason": None if finished else f"{status} at epoch {n_epochs}",
        "model": model,
        "norm": norm,
        "placement": placement,
        "batch_size": batch_size,
        "virtual_batch": virtual_batch,
        "norm_batch": norm_batch,
        "lr": lr,
        "lr_effective": lr * batch_size / 128,
        "seed": seed,
        "epochs": 3 if finished else 10,
        "epochs_done": n_epochs,
        "test_acc": test_accs[-1] if finished else None,
        "best_test_acc": max(test_accs) if finished else None,
        "test_loss": 0.9 if finished else None,
        "train_loss": train_losses[-1] if finished else None,
        "train_acc": 75.0 if finished else None,
        "val_acc": val_accs[-1] if finished and has_val else None,
        "best_val_acc": max(val_accs) if finished and has_val else None,
        "wall_time_s": 30.0 * n_epochs,
        "seconds_per_epoch": 30.0,
        "images_per_s": 1500.0,
        "diverged_step": 1234 if status == "diverged" else None,
        "finished_at": "2025-01-01T12:00:00",
        "config": {"model": {"name": model}, "norm": {"name": norm}, "optim": {"lr": lr}},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = ["epoch,step,train_loss,train_acc,test_loss,test_acc,val_loss,val_acc,lr,seconds"]
    for epoch, test_acc in enumerate(test_accs, start=1):
        val_acc = f"{val_accs[epoch - 1]}" if has_val else ""
        val_loss = "1.0" if has_val else ""
        lines.append(
            f"{epoch},{epoch * 100},{train_losses[epoch - 1]},{test_acc - 5},1.0,{test_acc},"
            f"{val_loss},{val_acc},{lr},30.0"
        )
    (run_dir / "metrics.csv").write_text("\n".join(lines) + "\n")
    return run_dir


def make_grid(root: Path) -> dict:
    """bn and gn at batch 32 and 2, two seeds each; returns the final test accs by setting."""
    final_accs = {
        ("bn", 32): [90.0, 92.0],
        ("bn", 2): [60.0, 64.0],
        ("gn", 32): [89.0, 89.5],
        ("gn", 2): [88.0, 88.4],
    }
    for (norm, batch_size), accs in final_accs.items():
        for seed, acc in enumerate(accs):
            make_run(root, norm=norm, batch_size=batch_size, seed=seed,
                     test_accs=[acc - 30, acc - 10, acc])
    return final_accs


def read_table(out_dir: Path) -> pd.DataFrame:
    return pd.read_csv(out_dir / "table.csv")


def assert_valid_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000, path
    assert data.startswith(PNG_MAGIC), path


def row(table: pd.DataFrame, **keys) -> pd.Series:
    mask = pd.Series(True, index=table.index)
    for key, value in keys.items():
        mask &= table[key] == value
    matches = table[mask]
    assert len(matches) == 1, (keys, matches)
    return matches.iloc[0]


def test_grid_table_stats_and_figures(tmp_path, capsys):
    runs_root = tmp_path / "runs"
    final_accs = make_grid(runs_root)

    assert report.main([str(runs_root)]) == 0

    out_dir = runs_root / "report"
    table = read_table(out_dir)
    assert len(table) == 4
    # canonical order: bn before gn, batch descending
    expected_order = [("bn", 32), ("bn", 2), ("gn", 32), ("gn", 2)]
    assert list(zip(table["norm"], table["batch_size"])) == expected_order
    for (norm, batch_size), accs in final_accs.items():
        r = row(table, norm=norm, batch_size=batch_size)
        mean = sum(accs) / 2
        std = math.sqrt(sum((a - mean) ** 2 for a in accs))  # ddof=1 with n=2
        assert r["test_acc_mean"] == pytest.approx(mean)
        assert r["test_acc_std"] == pytest.approx(std)
        assert r["test_acc_ci95"] == pytest.approx(12.706 * std / math.sqrt(2), rel=1e-3)
        assert r["n_completed"] == 2
        assert r["n_failed"] == 0 and r["n_diverged"] == 0
    assert pd.isna(row(table, norm="gn", batch_size=2)["norm_batch"])
    assert row(table, norm="bn", batch_size=2)["norm_batch"] == 2

    markdown = (out_dir / "table.md").read_text()
    assert markdown.startswith("## ") and "8 runs" in markdown.splitlines()[0]
    assert "91.00 ± 1.41" in markdown
    assert "95% CI" in markdown
    assert "placement" not in markdown.splitlines()[2]  # all "before": column omitted
    assert "| gn | 2 | - |" in markdown  # batch-independent norm: no norm batch
    assert "tabular" in (out_dir / "table.tex").read_text()
    for figure in FIGURES:
        assert_valid_png(out_dir / figure)

    stdout = capsys.readouterr().out
    assert "91.00 ± 1.41" in stdout
    assert str(out_dir / "error_vs_batch.png") in stdout


def test_corrupt_run_is_skipped_with_warning(tmp_path, capsys):
    runs_root = tmp_path / "runs"
    make_grid(runs_root)
    bad_dir = runs_root / "resnet20" / "ln" / "bs8" / "lr0.1" / "seed0"
    bad_dir.mkdir(parents=True)
    (bad_dir / "summary.json").write_text('{"status": "completed", "norm": ')
    missing_keys_dir = make_run(runs_root, norm="in", batch_size=8)
    (missing_keys_dir / "summary.json").write_text(json.dumps({"status": "completed"}))
    bad_metrics_dir = make_run(runs_root, norm="frn", batch_size=8)
    (bad_metrics_dir / "metrics.csv").write_text("epoch,step\nnot,a,valid,csv\n")
    out_dir = tmp_path / "out"

    assert report.main([str(runs_root), "--out", str(out_dir)]) == 0

    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 3
    for skipped_dir in (bad_dir, missing_keys_dir, bad_metrics_dir):
        assert any(str(skipped_dir) in line for line in warnings), (skipped_dir, warnings)
    assert len(read_table(out_dir)) == 4
    for figure in FIGURES:
        assert_valid_png(out_dir / figure)


def test_no_runs_exits_2_with_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()

    assert report.main([str(empty)]) == 2

    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1
    assert "no runs found" in captured.err and str(empty) in captured.err
    assert "Traceback" not in captured.err
    assert not (empty / "report").exists()


def test_no_runs_exit_code_via_subprocess(tmp_path):
    missing = tmp_path / "does-not-exist"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "normbench.report", str(missing)],
        capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "no runs found" in result.stderr and "summary.json" in result.stderr


def test_failed_and_diverged_are_counted_not_averaged(tmp_path, capsys):
    runs_root = tmp_path / "runs"
    make_run(runs_root, norm="bn", batch_size=2, seed=0, test_accs=[50.0, 70.0])
    make_run(runs_root, norm="bn", batch_size=2, seed=1, test_accs=[50.0, 74.0])
    make_run(runs_root, norm="bn", batch_size=2, seed=2, status="failed", test_accs=[10.0])
    make_run(runs_root, norm="bn", batch_size=2, seed=3, status="diverged", test_accs=[10.0, 10.0])
    running = make_run(runs_root, norm="bn", batch_size=2, seed=4, status="running",
                       test_accs=[99.0])
    failed_before_epoch_one = make_run(runs_root, norm="bn", batch_size=2, seed=5, status="failed")
    (failed_before_epoch_one / "metrics.csv").unlink()

    assert report.main([str(runs_root)]) == 0

    err = capsys.readouterr().err
    assert str(running) in err and "running" in err
    table = read_table(runs_root / "report")
    assert len(table) == 1
    r = table.iloc[0]
    assert r["n_completed"] == 2
    assert r["n_failed"] == 2
    assert r["n_diverged"] == 1
    assert r["test_acc_mean"] == pytest.approx(72.0)
    markdown = (runs_root / "report" / "table.md").read_text()
    assert "| 2 | 2 | 1 |" in markdown  # seeds | failed | diverged


def test_all_seeds_failed_row_still_reported(tmp_path):
    runs_root = tmp_path / "runs"
    make_grid(runs_root)
    make_run(runs_root, norm="bn", batch_size=1, status="diverged", test_accs=[10.0])

    files = report.write_report([runs_root], tmp_path / "out")

    table = read_table(tmp_path / "out")
    r = row(table, norm="bn", batch_size=1)
    assert r["n_diverged"] == 1 and r["n_completed"] == 0
    assert pd.isna(r["test_acc_mean"])
    assert set(files) == {"table.md", "table.csv", "table.tex", *FIGURES}


def test_select_best_lr_uses_validation_not_test(tmp_path, capsys):
    runs_root = tmp_path / "runs"
    # lr 0.1: best test but worse validation; lr 0.4: best validation, worse test.
    for seed in (0, 1):
        make_run(runs_root, norm="gn", batch_size=8, lr=0.1, seed=seed,
                 test_accs=[70.0, 90.0 + seed], val_accs=[70.0, 80.0 + seed])
        make_run(runs_root, norm="gn", batch_size=8, lr=0.4, seed=seed,
                 test_accs=[70.0, 85.0 + seed], val_accs=[70.0, 84.0 + seed])
    out_dir = tmp_path / "out"

    assert report.main([str(runs_root), "--out", str(out_dir), "--select-best", "lr"]) == 0

    table = read_table(out_dir)
    assert len(table) == 1
    r = table.iloc[0]
    assert r["lr_selected"] == pytest.approx(0.4)
    assert r["test_acc_mean"] == pytest.approx(85.5)
    assert r["val_acc_mean"] == pytest.approx(84.5)
    markdown = (out_dir / "table.md").read_text()
    assert "lr (selected)" in markdown and "85.50 ± 0.71" in markdown

    # Without selection both lrs are reported.
    assert len(report.aggregate(report.collect_runs([runs_root]))) == 2


def test_select_best_without_validation_exits_2(tmp_path, capsys):
    runs_root = tmp_path / "runs"
    make_grid(runs_root)

    assert report.main([str(runs_root), "--select-best", "lr"]) == 2

    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "data.val_split" in err and "Traceback" not in err


def test_epochs_to_target_from_metrics(tmp_path):
    runs_root = tmp_path / "runs"
    make_run(runs_root, norm="bn", seed=0, test_accs=[50.0, 79.9, 80.0, 85.0])  # epoch 3
    make_run(runs_root, norm="bn", seed=1, test_accs=[50.0, 81.0, 79.0, 83.0])  # epoch 2
    make_run(runs_root, norm="gn", seed=0, test_accs=[50.0, 60.0, 70.0, 79.0])  # never
    make_run(runs_root, norm="ln", seed=0, test_accs=[50.0, 90.0, 90.0, 90.0])  # epoch 2
    make_run(runs_root, norm="ln", seed=1, test_accs=[50.0, 60.0, 70.0, 75.0])  # never

    table = report.aggregate(report.collect_runs([runs_root]), target_acc=80)

    assert row(table, norm="bn")["epochs_to_target_mean"] == pytest.approx(2.5)
    assert row(table, norm="bn")["epochs_to_target_n"] == 2
    assert pd.isna(row(table, norm="gn")["epochs_to_target_mean"])
    assert row(table, norm="ln")["epochs_to_target_n"] == 1
    display = report.format_table(table, target_acc=80)
    epochs_column = display.set_index("norm")["epochs to 80%"]
    assert epochs_column["bn"] == "2.5"
    assert epochs_column["gn"] == "-"
    assert epochs_column["ln"] == "2.0 (1/2 seeds)"

    lower_target = report.aggregate(report.collect_runs([runs_root]), target_acc=70)
    assert row(lower_target, norm="gn")["epochs_to_target_mean"] == pytest.approx(3.0)


def test_virtual_batch_and_placement_columns(tmp_path):
    runs_root = tmp_path / "runs"
    make_run(runs_root, norm="bn", batch_size=128, virtual_batch=4)
    make_run(runs_root, norm="bn", batch_size=128)
    make_run(runs_root, norm="bn", batch_size=128, placement="after", model="resnet32")

    report.write_report([runs_root], tmp_path / "out")

    table = read_table(tmp_path / "out")
    assert list(table["norm_batch"]) == [128, 4, 128]  # norm batch descending, resnet32 last
    header = (tmp_path / "out" / "table.md").read_text().splitlines()[2]
    assert "placement" in header and "norm batch" in header
    assert_valid_png(tmp_path / "out" / "error_vs_batch.png")


def test_collect_runs_columns(tmp_path):
    runs_root = tmp_path / "runs"
    make_run(runs_root, norm="gn", batch_size=4, seed=3)

    runs = report.collect_runs([runs_root])

    assert len(runs) == 1
    assert "config" not in runs.columns
    run = runs.iloc[0]
    assert run["norm"] == "gn" and run["batch_size"] == 4 and run["seed"] == 3
    assert pd.isna(run["norm_batch"])
    assert Path(run["path"]).name == "seed3"


def test_latex_without_jinja2_falls_back_to_plain_tabular(monkeypatch):
    monkeypatch.setitem(sys.modules, "jinja2", None)  # makes `import jinja2` raise ImportError
    display = pd.DataFrame({"norm": ["gn_ws"], "test acc": ["91.00 ± 0.50"]})

    latex = report.to_latex(display, "title with 95%")

    assert r"\begin{tabular}{ll}" in latex and r"\end{tabular}" in latex
    assert r"gn\_ws & 91.00 $\pm$ 0.50 \\" in latex
    assert latex.startswith("% title with 95%")
