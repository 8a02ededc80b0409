"""Tests for normbench-report: what it writes (tables, figures, warnings) for run folders in
tmp_path, written with normbench.summary the way the trainer writes them, plus one real sweep."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from normbench import report, summary
from normbench.figures import FIGURES, MARKERS, PALETTE, norm_style, norm_styles
from normbench.norms import NORMS
from tests.conftest import TINY_OVERRIDES, run_cli

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BATCH_DEPENDENT_NORMS = {"bn", "brn"}
FIGURE_FILES = tuple(spec.file_name for spec in FIGURES.values() if spec.always)  # the length ones: test_length.py
GENERATED_TEXT = ("comparisons.md", "comparisons.csv", "comparisons.tex", "findings.md")
OPTIONAL_TEXT = ("length.md", "length.csv", "recovery.md", "recovery.csv")  # a length sweep's; a small-batch sweep's


def run_config(*, model, placement, norm, batch_size, lr, seed, epochs, virtual_batch, subset, variant,
               lr_scaling, devices, run_name, root) -> dict:
    """A resolved run config shaped like the one the trainer records (identity.run_config)."""
    return {
        "model": {"name": model, "placement": placement},
        "norm": {"name": norm, "eps": 1e-5, "affine": True, "virtual_batch": virtual_batch},
        "data": {"name": "cifar10", "root": "/data/cifar10", "cache_dir": None, "subset": subset,
                 "test_subset": None, "val_split": None, "crop_padding": 4, "flip": True,
                 "eval_batch_size": 1000},
        "optim": {"name": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4, "ref_batch": 128,
                  "lr_scaling": lr_scaling},
        "sched": {"name": "cosine", "warmup_epochs": 1.0, "warmup_start_factor": 0.1},
        "batch_size": batch_size, "epochs": epochs, "lr": lr, "seed": seed, "device": "cpu", "threads": None,
        "amp": "auto", "out_dir": str(root), "variant": variant, "run_name": run_name, "log_every": 50,
        "stat_gap_every": 200, "ckpt_every": 0, "on_bad_checkpoint": "restart", "target_acc": 80.0,
        "progress": "auto", "debug": False, "report_at_end": False, "devices": devices,
    }


def gap_fields(norm: str, test_acc: float) -> dict:
    """The three errors as the trainer records them (batch-independent norms: (2) = (3))."""
    if norm not in BATCH_DEPENDENT_NORMS:
        return {"gap_train_batchstats_acc": min(test_acc + 10.0, 100.0), "gap_test_batchstats_acc": test_acc,
                "gap_test_popstats_acc": test_acc}
    return {"gap_train_batchstats_acc": min(test_acc + 10.0, 100.0), "gap_test_batchstats_acc": test_acc - 5.0,
            "gap_test_popstats_acc": test_acc, "gap_test_ema_acc": test_acc}


def make_run(
    root: Path,
    *,
    norm: str = "bn",
    norm_label: str | None = None,
    batch_size: int = 32,
    lr: float = 0.1,
    seed: int = 0,
    status: str = "completed",
    test_accs: list[float] | None = None,
    val_accs: list[float] | None = None,
    virtual_batch: int | None = None,
    model: str = "resnet20",
    placement: str = "before",
    epochs: int = 3,
    subset: int | None = None,
    variant: str | None = None,
    lr_scaling: str = "linear",
    devices: int = 1,
    with_config: bool = True,
) -> Path:
    """Write a run folder (summary.json + metrics.csv) the way the trainer does. `with_config=False`
    writes a summary without the config, like the command line's record of a failed run."""
    test_accs = [40.0, 60.0, 70.0] if test_accs is None else test_accs
    norm_label = norm_label or norm
    model_dir = model if placement == "before" else f"{model}-normafter"
    batch_dir = f"bs{batch_size}" if virtual_batch is None else f"bs{batch_size}-vb{virtual_batch}"
    run_name = f"{model_dir}/{norm_label}/{batch_dir}/lr{lr:g}" + (f"/{variant}" if variant else "") + f"/seed{seed}"
    run_dir = root / run_name
    run_dir.mkdir(parents=True)
    n_epochs = len(test_accs)
    train_losses = [2.0 / (epoch + 1) for epoch in range(n_epochs)]
    finished = status == "completed"
    has_val = val_accs is not None
    scale = {"linear": batch_size * devices / 128, "sqrt": math.sqrt(batch_size * devices / 128), "none": 1.0}
    identity = {
        "run_name": run_name, "model": model, "norm": norm, "norm_label": norm_label, "placement": placement,
        "batch_size": batch_size, "devices": devices, "virtual_batch": virtual_batch,
        "norm_batch": (virtual_batch or batch_size) if norm in BATCH_DEPENDENT_NORMS else None,
        "lr": lr, "lr_effective": lr * scale[lr_scaling], "seed": seed, "epochs": epochs,
    }
    config = run_config(model=model, placement=placement, norm=norm, batch_size=batch_size, lr=lr, seed=seed,
                        epochs=epochs, virtual_batch=virtual_batch, subset=subset, variant=variant,
                        lr_scaling=lr_scaling, devices=devices, run_name=run_name, root=root)
    record = summary.new(
        identity, status if status in summary.STATUSES else "completed",
        reason=None if finished else f"{status} at epoch {n_epochs}",
        epochs_done=n_epochs,
        test_acc=test_accs[-1] if finished else None,
        best_test_acc=max(test_accs) if finished else None,
        test_loss=0.9 if finished else None,
        train_loss=train_losses[-1] if finished else None,
        train_acc=75.0 if finished else None,
        val_acc=val_accs[-1] if finished and has_val else None,
        best_val_acc=max(val_accs) if finished and has_val else None,
        wall_time_s=30.0 * n_epochs, seconds_per_epoch=30.0, images_per_s=1500.0,
        diverged_step=1234 if status == "diverged" else None,
        train_size=subset or 50000, test_size=10000, val_size=5000 if has_val else None,
        config=config if with_config else None,
        **(gap_fields(norm, test_accs[-1]) if finished else {}),
    )
    record["status"] = status  # also statuses the trainer never writes last ("running")
    summary.write(run_dir, record)
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


def make_grid(root: Path, **run_options) -> dict:
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
                     test_accs=[acc - 30, acc - 10, acc], **run_options)
    return final_accs


def read_table(out_dir: Path) -> pd.DataFrame:
    return pd.read_csv(out_dir / "table.csv")


def markdown_table(out_dir: Path) -> pd.DataFrame:
    """table.md's table as strings (header row -> columns)."""
    lines = [line for line in (out_dir / "table.md").read_text().splitlines() if line.startswith("|")]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return pd.DataFrame(cells[2:], columns=cells[0])


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if "warning" in line]


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


def draw(name: str, paths) -> object:
    """The matplotlib Figure the report writes as FIGURES[name], for the runs under `paths`."""
    loaded = report.load_report(paths)
    return FIGURES[name].draw(loaded.table, loaded.curves, loaded.protocol)


def line_styles(fig) -> dict[str, tuple]:
    """Plotted line label -> (colour, marker), over every panel."""
    return {line.get_label(): (line.get_color(), line.get_marker())
            for ax in fig.axes for line in ax.get_lines() if not line.get_label().startswith("_")}


# --------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------

def test_grid_table_stats_and_figures(tmp_path, capsys):
    runs_root = tmp_path / "runs"
    final_accs = make_grid(runs_root)

    assert report.main([str(runs_root)]) == 0

    out_dir = runs_root / "report"
    table = read_table(out_dir)
    assert len(table) == 4
    # registry order: bn before gn, batch descending
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
    assert "devices" not in markdown.splitlines()[2]  # all on one device: column omitted
    assert "| gn | 2 | - |" in markdown  # batch-independent norm: no norm batch
    assert "Protocol: resnet20; 3 epochs; 50000 training images; 10000 test images; lr = base × batch/128" in markdown
    assert "tabular" in (out_dir / "table.tex").read_text()
    for figure in FIGURE_FILES:
        assert_valid_png(out_dir / figure)

    captured = capsys.readouterr()
    assert "91.00 ± 1.41" in captured.out
    assert str(out_dir / "error_vs_batch.png") in captured.out
    assert warnings_in(captured.err) == []


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

    warnings = warnings_in(capsys.readouterr().err)
    assert len(warnings) == 3
    for skipped_dir in (bad_dir, missing_keys_dir, bad_metrics_dir):
        assert any(f"skipping {skipped_dir}: " in line for line in warnings), (skipped_dir, warnings)
    assert any("lacks" in line for line in warnings)  # summary.load's one-line reason
    assert len(read_table(out_dir)) == 4
    for figure in FIGURE_FILES:
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
    # The command line records a failure without the config: it still counts in its row.
    make_run(runs_root, norm="bn", batch_size=2, seed=2, status="failed", test_accs=[10.0], with_config=False)
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
    assert set(files) == {"table.md", "table.csv", "table.tex", *GENERATED_TEXT, *FIGURE_FILES}


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
    assert r["lr_selected"] == pytest.approx(0.4)  # a base lr
    assert r["lr_effective"] == pytest.approx(0.4 * 8 / 128)  # the rate it trained with
    assert r["test_acc_mean"] == pytest.approx(85.5)
    assert r["val_acc_mean"] == pytest.approx(84.5)
    markdown = (out_dir / "table.md").read_text()
    assert "lr (selected)" in markdown and "85.50 ± 0.71" in markdown
    shown = row(markdown_table(out_dir), norm="gn")
    assert shown["lr (selected)"] == "0.025 ‡" and shown["base lr"] == "0.4"  # the higher of two: an edge

    # Without selection both lrs are reported.
    assert len(report.aggregate(report.collect_runs([runs_root]))) == 2


def test_select_best_lr_compares_candidates_on_their_common_seeds(tmp_path):
    """The reference protocol tunes at seed 0, then adds seeds at the pick: the pick must not move
    when those seeds' validation accuracy comes in lower than seed 0's."""
    runs_root = tmp_path / "runs"
    make_run(runs_root, norm="gn", lr=0.1, seed=0, test_accs=[60.0, 70.0], val_accs=[60.0, 80.0])
    make_run(runs_root, norm="gn", lr=0.2, seed=0, test_accs=[60.0, 69.0], val_accs=[60.0, 78.0])
    for seed in (1, 2):
        make_run(runs_root, norm="gn", lr=0.1, seed=seed, test_accs=[60.0, 66.0], val_accs=[60.0, 70.0])

    table = report.aggregate(report.collect_runs([runs_root]), select_best="lr")

    r = table.iloc[0]
    assert r["lr_selected"] == pytest.approx(0.1) and r["n_completed"] == 3  # (80 + 70 + 70) / 3 < 78 on all seeds
    assert r["val_acc_mean"] == pytest.approx(80.0)  # what the pick compared: seed 0
    assert r["test_acc_mean"] == pytest.approx((70.0 + 66.0 + 66.0) / 3)  # the test accuracy of every seed


def test_select_best_lr_marks_a_pick_at_the_edge_of_its_candidates(tmp_path):
    """A pick at the highest or lowest lr tried is marked (its best rate may lie beyond the grid);
    one inside the grid is not."""
    runs_root = tmp_path / "runs"
    for lr, val in ((0.1, 70.0), (0.2, 75.0), (0.4, 72.0)):  # gn: best inside the grid
        make_run(runs_root, norm="gn", batch_size=128, lr=lr, test_accs=[60.0, val], val_accs=[60.0, val])
    for lr, val in ((0.1, 70.0), (0.2, 72.0), (0.4, 75.0)):  # ln: best at its top
        make_run(runs_root, norm="ln", batch_size=128, lr=lr, test_accs=[60.0, val], val_accs=[60.0, val])
    out_dir = tmp_path / "out"

    assert report.main([str(runs_root), "--out", str(out_dir), "--select-best", "lr"]) == 0

    assert row(markdown_table(out_dir), norm="gn")["lr (selected)"] == "0.2"
    assert row(markdown_table(out_dir), norm="ln")["lr (selected)"] == "0.4 ‡"
    assert "‡ the selected lr is the highest or lowest" in (out_dir / "table.md").read_text()
    assert r"0.4 $\ddagger$" in (out_dir / "table.tex").read_text()
    assert list(read_table(out_dir)["lr_candidates"]) == ["0.1;0.2;0.4"] * 2


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
    assert set(summary.FIELDS) - {"config"} <= set(runs.columns)
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


# --------------------------------------------------------------------------------------------
# Never mix experiments (issue 10.1)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("column, first, second", [
    ("epochs", {"epochs": 1}, {"epochs": 2}),
    ("data.subset", {"subset": 1000}, {"subset": 2000}),
    ("variant", {}, {"variant": "wd0"}),
])
def test_sweeps_that_differ_in_a_setting_are_separate_rows(tmp_path, capsys, column, first, second):
    for sweep, options in (("a", first), ("b", second)):  # the same runs (same names) but for `column`
        for norm in ("bn", "gn"):
            for seed in (0, 1):
                make_run(tmp_path / sweep, norm=norm, seed=seed, **options)
    out_dir = tmp_path / "out"

    assert report.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out_dir)]) == 0

    assert warnings_in(capsys.readouterr().err) == []  # nothing skipped
    table = read_table(out_dir)
    assert len(table) == 4 and table["n_runs"].sum() == 8
    assert (table["n_completed"] == 2).all()  # each row: the two seeds of one sweep
    shown = markdown_table(out_dir)
    assert column in shown.columns
    assert shown.columns.get_loc(column) < shown.columns.get_loc("norm")  # the experiment first
    assert len(shown.drop_duplicates(subset=[column, "norm"])) == 4
    assert f"differ in {column}" in (out_dir / "table.md").read_text()


def test_the_same_sweep_in_two_folders_is_kept_once_with_a_warning(tmp_path, capsys):
    make_grid(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    out_dir = tmp_path / "out"

    assert report.main([str(tmp_path / "a"), str(tmp_path / "copy"), "--out", str(out_dir)]) == 0

    warnings = warnings_in(capsys.readouterr().err)
    assert len(warnings) == 8
    for run_summary in (tmp_path / "copy").rglob("summary.json"):
        copy_dir = run_summary.parent
        original_dir = tmp_path / "a" / copy_dir.relative_to(tmp_path / "copy")
        assert any(str(copy_dir) in line and str(original_dir) in line for line in warnings)
    table = read_table(out_dir)
    assert len(table) == 4 and table["n_runs"].sum() == 8


def test_config_less_failure_of_an_ambiguous_setting_is_not_merged(tmp_path, capsys):
    """A failed run without a config that could belong to either sweep gets its own row."""
    make_run(tmp_path / "a", norm="gn", subset=1000, seed=0)
    make_run(tmp_path / "b", norm="gn", subset=2000, seed=0)
    make_run(tmp_path / "b", norm="gn", seed=1, status="failed", with_config=False)
    out_dir = tmp_path / "out"

    assert report.main([str(tmp_path), "--out", str(out_dir)]) == 0

    shown = markdown_table(out_dir)
    assert list(shown["data.subset"]) == ["1000", "2000", "?"]
    assert list(shown["failed"]) == ["0", "0", "1"]
    assert "?: not recorded" in (out_dir / "table.md").read_text()


# --------------------------------------------------------------------------------------------
# Learning rate, devices, empty columns, chance level (issues 10.6, 10.7)
# --------------------------------------------------------------------------------------------

def test_lr_column_is_the_effective_rate(tmp_path):
    runs_root = tmp_path / "runs"
    make_run(runs_root, norm="bn", batch_size=32, lr=0.1)
    make_run(runs_root, norm="bn", batch_size=2, lr=0.1)
    out_dir = tmp_path / "out"

    report.write_report([runs_root], out_dir)

    table = read_table(out_dir)
    assert list(table["lr_effective"]) == pytest.approx([0.1 * 32 / 128, 0.1 * 2 / 128])
    shown = markdown_table(out_dir)
    assert list(shown["lr"]) == ["0.025", "0.0015625"]
    assert list(shown["base lr"]) == ["0.1", "0.1"]


def test_base_lr_column_only_where_it_differs(tmp_path):
    runs_root = tmp_path / "runs"
    make_run(runs_root, norm="bn", batch_size=32, lr=0.1, lr_scaling="none")
    out_dir = tmp_path / "out"

    report.write_report([runs_root], out_dir)

    shown = markdown_table(out_dir)
    assert list(shown["lr"]) == ["0.1"] and "base lr" not in shown.columns


def test_devices_and_global_batch_only_with_several_devices(tmp_path):
    make_run(tmp_path / "ddp", norm="gn", batch_size=32, devices=4)  # run names omit the devices
    make_run(tmp_path / "single", norm="gn", batch_size=32, devices=1)
    out_dir = tmp_path / "out"

    report.write_report([tmp_path / "ddp", tmp_path / "single"], out_dir)

    shown = markdown_table(out_dir)
    assert list(shown["devices"]) == ["1", "4"]
    assert list(shown["global batch"]) == ["32", "128"]
    assert list(shown["lr"]) == ["0.025", "0.1"]  # linear scaling with the global batch


def test_empty_columns_dropped_and_chance_level_marked(tmp_path):
    runs_root = tmp_path / "runs"
    # One seed each, nobody reaches 80%: no CI, no "epochs to 80%". bn and brn at batch 1 never
    # leave chance: their identical rows are marked and explained.
    make_run(runs_root, norm="bn", batch_size=32, test_accs=[40.0, 55.0])
    make_run(runs_root, norm="bn", batch_size=1, test_accs=[10.0, 10.0])
    make_run(runs_root, norm="brn", batch_size=1, test_accs=[9.5, 10.0])
    out_dir = tmp_path / "out"

    report.write_report([runs_root], out_dir)

    shown = markdown_table(out_dir)
    assert "95% CI ±" not in shown.columns
    assert not any(column.startswith("epochs to") for column in shown.columns)
    marked = dict(zip(zip(shown["norm"], shown["batch"]), shown["test acc"]))
    assert marked == {("bn", "32"): "55.00", ("bn", "1"): "10.00 †", ("brn", "1"): "10.00 †"}
    notes = (out_dir / "table.md").read_text().split("| brn |")[1]
    assert "† at chance level" in notes
    assert r"$\dagger$" in (out_dir / "table.tex").read_text()


def test_norms_in_registry_order_with_options_and_unknown_norms(tmp_path):
    runs_root = tmp_path / "runs"
    for norm, label in [("mynorm", None), ("wn", None), ("gn", "gn-groups16"), ("gn", None), ("none", None),
                        ("bn", None), ("ln", None)]:
        make_run(runs_root, norm=norm, norm_label=label)

    report.write_report([runs_root], tmp_path / "out")

    registry = [norm for norm in NORMS if norm in {"wn", "gn", "none", "bn", "ln"}]
    expected = [label for norm in registry for label in ([norm, "gn-groups16"] if norm == "gn" else [norm])]
    assert list(read_table(tmp_path / "out")["norm"]) == [*expected, "mynorm"]


# --------------------------------------------------------------------------------------------
# Figures (issue 10.7)
# --------------------------------------------------------------------------------------------

def test_a_norm_has_one_colour_and_marker_in_every_figure_and_report(tmp_path):
    for norm in ("bn", "gn", "mynorm"):
        make_run(tmp_path / "a", norm=norm, batch_size=8)
    for norm in ("none", "wn", "ln", "gn", "mynorm"):
        make_run(tmp_path / "b", norm=norm, batch_size=8)

    seen: dict[str, set] = {}
    for name in [name for name, spec in FIGURES.items() if spec.always]:
        for root in ("a", "b"):
            fig = draw(name, [tmp_path / root])
            styles = line_styles(fig)
            assert len(set(styles.values())) == len(styles)  # norms of one figure look different
            for label, style in styles.items():
                seen.setdefault(label.split(" ")[0], set()).add(style)
            assert fig.legends and all(ax.get_legend() is None for ax in fig.axes)  # legend outside
    assert all(len(styles) == 1 for styles in seen.values()), seen
    assert seen["gn"] == {tuple(vars(norm_style("gn")).values())}
    assert seen["mynorm"] != seen["gn"]


def test_any_number_of_norms_get_distinct_colours_and_markers(tmp_path):
    """The palette once had 12 colours (and 13 markers): a 13th norm of the registry was drawn in
    none's colour, and unknown norms shared 10 light colours by a hash of their name."""
    names = [f"fakenorm{i}" for i in range(30)]
    in_registry = [norm_style(name, order=names) for name in names]
    assert len({style.color for style in in_registry}) == 30
    assert len({style.marker for style in in_registry}) == 30
    unknown = norm_styles([*names, "fakenorm3-groups4"], order=[])  # none of them in the registry, one figure
    assert len({style.color for style in unknown.values()}) == 30
    assert unknown["fakenorm3-groups4"] == unknown["fakenorm3"]  # options keep their norm's look
    both = norm_styles([*names, *NORMS])
    assert len({style.color for style in both.values()}) == 30 + len(NORMS)
    # Today's norms keep today's look (the committed figures stay as they are).
    # (the palette's first colours; a norm past its end gets a generated one, distinct as checked above)
    assert [norm_style(norm).color for norm in list(NORMS)[:len(PALETTE)]] == PALETTE[:len(NORMS)]
    assert [norm_style(norm).marker for norm in list(NORMS)[:len(MARKERS)]] == MARKERS[:len(NORMS)]

    for name in names[:15]:  # a figure with 15 norms the registry does not know
        make_run(tmp_path, norm=name, batch_size=8)
    colours = {label: style[0] for label, style in line_styles(draw("error_vs_batch", [tmp_path])).items()}
    assert len(colours) == 15 and len(set(colours.values())) == 15


def test_coinciding_lines_stay_visible_on_a_log2_batch_axis(tmp_path):
    runs_root = tmp_path / "runs"
    for batch_size in (2, 8, 32):  # none and wn: identical results
        make_run(runs_root, norm="none", batch_size=batch_size, test_accs=[50.0])
        make_run(runs_root, norm="wn", batch_size=batch_size, test_accs=[50.0])

    fig = draw("error_vs_batch", [runs_root])

    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2
    lines = {line.get_label().split(" ")[0]: line for line in ax.get_lines()}
    assert list(lines["none"].get_ydata()) == list(lines["wn"].get_ydata())
    assert all(a != b for a, b in zip(lines["none"].get_xdata(), lines["wn"].get_xdata()))
    assert lines["none"].get_marker() != lines["wn"].get_marker()


# --------------------------------------------------------------------------------------------
# Real runs through the real entry point
# --------------------------------------------------------------------------------------------

@pytest.mark.slow  # 25 s: two real sweeps; the grouping itself is tested on made-up runs above
def test_report_of_two_real_sweeps_that_differ_in_data_subset(tiny_data, tmp_path, capsys):
    env = {"NORMBENCH_CACHE": str(tmp_path / "cache")}
    common = ["-m", *TINY_OVERRIDES, f"data.root={tiny_data}"]
    for out, norms, subset in (("a", "bn,gn", 100), ("b", "gn", 160)):
        result = run_cli([*common, f"norm={norms}", f"data.subset={subset}", f"out_dir={tmp_path / out}"],
                         env_extra=env)
        assert result.returncode == 0, result.stderr[-2000:]
    out_dir = tmp_path / "report"

    assert report.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out_dir)]) == 0

    assert warnings_in(capsys.readouterr().err) == []
    shown = markdown_table(out_dir)
    assert list(zip(shown["data.subset"], shown["norm"])) == [("100", "bn"), ("100", "gn"), ("160", "gn")]
    assert list(shown.columns[:3]) == ["model", "data.subset", "norm"]  # nothing else differs
    assert list(shown["lr"]) == ["0.00625"] * 3 and list(shown["base lr"]) == ["0.1"] * 3  # 0.1 x 8/128
    markdown = (out_dir / "table.md").read_text()
    assert "Protocol: cnn; 1 epoch; 100 or 160 training images; lr = base × batch/128" in markdown
    for figure in FIGURE_FILES:
        assert_valid_png(out_dir / figure)


def test_batch_independent_norms_are_flat_lines_in_an_emulated_per_device_sweep(tmp_path):
    """GN ignores the virtual batch: in a virtual-batch sweep its one run is drawn at every per-device
    batch (a flat line, as in the Group Norm paper's Figure 1), not as one point at the SGD batch."""
    root = tmp_path / "runs"
    for norm, vb, acc in (("bn", 32, 60.0), ("bn", 2, 40.0), ("gn", None, 50.0)):
        make_run(root, norm=norm, batch_size=128, virtual_batch=vb, test_accs=[acc])
    fig = draw("error_vs_batch", [root])
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    gn = next(line for label, line in lines.items() if label.startswith("gn"))
    assert len(gn.get_xdata()) == 2 and set(gn.get_ydata()) == {50.0}
    bn = next(line for label, line in lines.items() if label.startswith("bn"))
    assert sorted(bn.get_ydata()) == [40.0, 60.0]


COMMITTED_TABLES = sorted(p.parent for p in (REPO_ROOT / "results").glob("*/table.csv") if (p.parent / "runs").is_dir())


@pytest.mark.parametrize("folder", COMMITTED_TABLES, ids=lambda p: p.name)
def test_committed_tables_regenerate_exactly_from_the_committed_run_files(folder, tmp_path, capsys):
    """results/<x>/table.* is what normbench-report makes of results/<x>/runs (summary.json and
    metrics.csv, all that is committed of a run); a reference table is the --select-best lr report."""
    select = ["--select-best", "lr"] if "lr_selected" in (folder / "table.csv").read_text().splitlines()[0] else []
    assert report.main([str(folder / "runs"), "--out", str(tmp_path), *select]) == 0
    for name in ("table.csv", "table.md", "table.tex", *GENERATED_TEXT):
        assert (tmp_path / name).read_text() == (folder / name).read_text(), f"{folder.name}/{name}"
    for name in OPTIONAL_TEXT:  # each where the runs call for it, and then the same
        assert (tmp_path / name).exists() == (folder / name).exists(), f"{folder.name}/{name}"
        if (folder / name).exists():
            assert (tmp_path / name).read_text() == (folder / name).read_text(), f"{folder.name}/{name}"


def test_every_committed_table_has_its_run_files():
    tables = {p.parent.name for p in (REPO_ROOT / "results").glob("*/table.csv")}
    assert tables and tables == {p.name for p in COMMITTED_TABLES}
