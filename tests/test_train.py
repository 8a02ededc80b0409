"""The real entry point on tiny data: outputs agree with each other, resume is exact, failures are recorded."""

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from normbench import checkpoint, collect, summary as run_summary, tracking
from normbench.cli import run_job
from tests.conftest import REPO, TINY_OVERRIDES, make_image_folder, run_cli


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def scalars(run_dir: Path) -> dict[str, list]:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_run_outputs_agree(make_cfg, tmp_path):
    cfg = make_cfg("epochs=2", "norm=bn")
    summary = run_job(cfg)
    run_dir = tmp_path / "runs" / "cnn/bn/bs8/lr0.1/ep2/seed0"
    assert summary["status"] == "completed" and summary["epochs_done"] == 2
    assert json.loads((run_dir / "summary.json").read_text()) == json.loads(json.dumps(summary))
    rows = read_metrics(run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert float(rows[-1]["test_acc"]) == pytest.approx(summary["test_acc"])
    assert float(rows[-1]["train_loss"]) == pytest.approx(summary["train_loss"])
    assert summary["best_test_acc"] == pytest.approx(max(float(r["test_acc"]) for r in rows))
    assert summary["train_size"] == 160 and summary["test_size"] == 80

    tb = scalars(run_dir)
    for tag in ("train/loss", "train/acc", "test/loss", "test/acc", "zz_diagnostics/lr"):
        assert tag in tb, tag
    steps_per_epoch = 160 // 8
    assert [s for s, _ in tb["test/acc"]] == [160, 320]  # x axis: training images seen
    assert tb["test/acc"][-1][1] == pytest.approx(summary["test_acc"], rel=1e-5)
    assert tb["train/acc"][-1][1] == pytest.approx(summary["train_acc"], rel=1e-5)
    assert tb["test/loss"][0][1] == pytest.approx(float(rows[0]["test_loss"]), rel=1e-5)
    assert len(tb["train/loss"]) == 2 * steps_per_epoch // 2  # log_every=2
    assert any(tag.startswith("zz_diagnostics/bn_gap/") for tag in tb)  # the train/eval statistics gap of BN layers
    # hparams live in the run's own event file: no sub-run folders
    assert not [p for p in run_dir.iterdir() if p.is_dir() and p.name != ".hydra"]
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(content)
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} >= {"test/acc", "train/loss", "summary/best_test_acc"}
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["norm"].string_value == "bn" and start.hparams["batch_size"].string_value == "8"
    assert start.hparams["virtual_batch"].string_value == "None"
    assert "summary/best_test_acc" in tb


def test_lr_schedule_and_scaling(make_cfg):
    from normbench.identity import effective_lr as scaled_lr

    assert scaled_lr(make_cfg("batch_size=2", "lr=0.1")) == pytest.approx(0.1 * 2 / 128)
    assert scaled_lr(make_cfg("batch_size=32", "lr=0.1", "optim.lr_scaling=sqrt")) == pytest.approx(0.1 * 0.5)
    assert scaled_lr(make_cfg("batch_size=2", "lr=0.1", "optim.lr_scaling=none")) == pytest.approx(0.1)


def test_rerun_skips_a_completed_run(make_cfg, capsys):
    cfg = make_cfg()
    first = run_job(cfg)
    capsys.readouterr()
    second = run_job(cfg)
    assert "skip" in capsys.readouterr().out
    assert second["finished_at"] == first["finished_at"]


def test_divergence_is_recorded(make_cfg):
    summary = run_job(make_cfg("lr=1e12", "optim.lr_scaling=none", "sched.warmup_epochs=0"))
    assert summary["status"] == "diverged"
    assert isinstance(summary["diverged_step"], int) and summary["diverged_step"] >= 0
    assert "non-finite" in summary["reason"]
    assert summary["steps_done"] == summary["diverged_step"] + 1  # on the CPU it stops at that very step


def test_truncated_checkpoint_restarts_cleanly(make_cfg, tmp_path, capsys):
    cfg = make_cfg("epochs=2")
    reference = run_job(cfg)
    run_dir = tmp_path / "runs" / cfg.run_name
    ckpt = run_dir / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    (run_dir / "summary.json").unlink()
    capsys.readouterr()
    again = run_job(cfg)
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "unreadable" in warnings[0] and "from scratch" in warnings[0]
    assert again["status"] == "completed"
    assert again["test_acc"] == reference["test_acc"] and again["train_loss"] == reference["train_loss"]


def test_mismatched_checkpoint_is_not_resumed(make_cfg, tmp_path, capsys):
    gn = make_cfg("norm=gn")
    run_job(gn)
    bn = make_cfg("norm=bn", "epochs=2")
    bn_dir = tmp_path / "runs" / bn.run_name
    bn_dir.mkdir(parents=True)
    shutil.copy(tmp_path / "runs" / gn.run_name / "checkpoint.pt", bn_dir / "checkpoint.pt")
    capsys.readouterr()
    summary = run_job(bn)
    assert "different configuration" in capsys.readouterr().out
    assert summary["status"] == "completed" and summary["epochs_done"] == 2

    stop = make_cfg("norm=bn", "epochs=2", "optim.momentum=0.8", "on_bad_checkpoint=stop")
    stop_dir = tmp_path / "runs" / stop.run_name
    assert stop_dir == bn_dir  # same folder, other identity (momentum): the old checkpoint is a mismatch
    (bn_dir / "summary.json").unlink()
    with pytest.raises(SystemExit) as e:
        run_job(stop)
    assert e.value.code == 2


def _cli_args(data_root, out_dir, *extra):
    return [*TINY_OVERRIDES, f"data.root={data_root}", f"out_dir={out_dir}", *extra]


def kill_inside_epoch_2(data_root, out_dir, args, run_dir, env) -> None:
    """Start the run (40 images x 10 classes at batch 2: 200 steps per epoch, a checkpoint every 25
    steps) and SIGKILL it inside epoch 2, between two checkpoints."""
    cmd = [sys.executable, "-m", "normbench", *_cli_args(data_root, out_dir, *args, "ckpt_every=25")]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **env, "NORMBENCH_NO_DOWNLOAD": "1", "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.csv").exists():
            break
        time.sleep(0.05)
    time.sleep(0.6)  # well inside epoch 2
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "summary.json").exists() and (run_dir / "checkpoint.pt").exists()


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path):
    data_root = make_image_folder(tmp_path / "data", n_train=40, n_test=8)
    env = {"NORMBENCH_CACHE": str(tmp_path / "cache")}
    args = ["norm=bn", "batch_size=2", "epochs=2", "log_every=10", "stat_gap_every=0"]
    run_dir = tmp_path / "killed" / "cnn/bn/bs2/lr0.1/ep2/seed0"
    kill_inside_epoch_2(data_root, tmp_path / "killed", args, run_dir, env)

    resumed = run_cli(_cli_args(data_root, tmp_path / "killed", *args, "ckpt_every=25"), env_extra=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    straight = run_cli(_cli_args(data_root, tmp_path / "straight", *args), env_extra=env)
    assert straight.returncode == 0, straight.stderr

    a = json.loads((run_dir / "summary.json").read_text())
    b = json.loads((tmp_path / "straight" / "cnn/bn/bs2/lr0.1/ep2/seed0" / "summary.json").read_text())
    for key in ("test_acc", "best_test_acc", "test_loss", "train_loss", "train_acc", "epochs_done", "steps_done"):
        assert a[key] == b[key], key
    rows_a = read_metrics(run_dir)
    rows_b = read_metrics(tmp_path / "straight" / "cnn/bn/bs2/lr0.1/ep2/seed0")
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(rows_a) == drop(rows_b)
    # TensorBoard: the killed attempt's points past the checkpoint are purged, none are lost
    assert [s for s, _ in scalars(run_dir)["test/acc"]] == [400, 800]  # images seen
    assert [v for _, v in scalars(run_dir)["test/acc"]] == pytest.approx([float(r["test_acc"]) for r in rows_a])


@pytest.mark.parametrize("overrides", [
    ["sched=onecycle"],
    ["norm=bn", "eval_stats=precise", "precise_batches=2"],
    ["norm=bn", "norm.virtual_batch=2"],
    ["norm=brn", "norm.relax_unit=steps", "norm.relax_start=2", "norm.r_relax=5", "norm.d_relax=5"],
    ["norm=wn", "norm.init=data", "norm.exp_g=true"],
    ["norm=wn", "norm.mean_only_bn=true", "norm.virtual_batch=4"],
    ["norm=sn"],
    ["norm=gn_ws", "batch_size=1"],
    ["model.placement=after", "norm=frn"],
    ["data.val_split=20", "data.subset=100", "data.test_subset=40"],
], ids=lambda o: " ".join(o))
def test_options_run_end_to_end(make_cfg, overrides):
    summary = run_job(make_cfg(*overrides))
    assert summary["status"] == "completed", summary.get("reason")
    assert summary["test_acc"] is not None and summary["train_loss"] == summary["train_loss"]  # not NaN
    if "data.val_split=20" in overrides:
        assert summary["val_size"] == 20 and summary["train_size"] == 100 and summary["val_acc"] is not None


def test_tensorboard_x_axis_is_comparable_across_batch_sizes(make_cfg, tmp_path):
    """Every scalar is logged against training images seen, so a batch-2 and a batch-8 run end at the
    same x (with optimizer steps they would end at 80 and 20)."""
    ends = {}
    for bs in (2, 8):
        cfg = make_cfg(f"batch_size={bs}", "norm=gn", "epochs=2")
        run_job(cfg)
        tb = scalars(tmp_path / "runs" / cfg.run_name)
        ends[bs] = {tag: tb[tag][-1][0] for tag in ("test/acc", "train/acc", "train/loss_epoch")}
        assert tb["train/loss"][-1][0] <= 320
    assert ends[2] == ends[8] == {"test/acc": 320, "train/acc": 320, "train/loss_epoch": 320}


def test_brn_limits_move_and_are_logged(make_cfg, tmp_path):
    """A short run relaxes Batch Renorm's limits (fractions of the run) and TensorBoard shows them."""
    cfg = make_cfg("norm=brn", "epochs=2", "log_every=2")
    run_job(cfg)
    tb = scalars(tmp_path / "runs" / cfg.run_name)
    r_max, d_max = [v for _, v in tb["zz_diagnostics/brn/r_max"]], [v for _, v in tb["zz_diagnostics/brn/d_max"]]
    assert r_max[0] == 1.0 and d_max[0] == 0.0  # the warm period (5% of 40 steps)
    assert r_max[-1] == pytest.approx(3.0) and d_max[-1] == pytest.approx(5.0)  # reached by 40% / 25%


def test_effective_lr_in_summary_and_hparams(make_cfg, tmp_path):
    cfg = make_cfg("batch_size=2", "norm=gn")
    summary = run_job(cfg)
    assert summary["lr"] == 0.1 and summary["lr_effective"] == pytest.approx(0.1 * 2 / 128)
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(tmp_path / "runs" / cfg.run_name))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["lr_effective"].number_value == pytest.approx(0.1 * 2 / 128)


def test_precise_bn_sets_population_statistics_before_eval(make_cfg, tmp_path):
    """With eval_stats=precise the eval statistics of the first BN layer are those of the training data."""
    from normbench.models import build_from_config

    cfg = make_cfg("norm=bn", "eval_stats=precise", "precise_batches=4", "norm.momentum=0.0001")
    run_job(cfg)
    state = torch.load(tmp_path / "runs" / cfg.run_name / "checkpoint.pt", weights_only=True)
    model = build_from_config(cfg)
    model.load_state_dict(state["model"])
    first_bn = next(m for m in model.modules() if hasattr(m, "running_mean"))
    # momentum 1e-4 alone would leave the running mean at ~0; PreciseBN replaced it
    assert first_bn.running_mean.abs().max() > 1e-2


def test_compile_auto_is_off_on_a_cpu(make_cfg, tmp_path):
    from normbench.train import Run

    for setting, compiled in (("auto", False), ("false", False), ("true", True)):
        run = Run(make_cfg(f"compile={setting}", "device=cpu"), tmp_path / setting, log=lambda *a: None)
        assert isinstance(run.train_model, torch._dynamo.eval_frame.OptimizedModule) == compiled, setting


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["bn", "brn"])
def test_compiled_run_matches_eager(make_cfg, tmp_path, norm):
    """compile=true trains the same run as eager (within float tolerance), BRN's host-side schedule included."""
    results = {}
    for setting in ("false", "true"):
        cfg = make_cfg(f"norm={norm}", f"compile={setting}", "epochs=2", out_dir=tmp_path / setting)
        summary = run_job(cfg)
        assert summary["status"] == "completed", summary.get("reason")
        results[setting] = [float(row["train_loss"]) for row in read_metrics(tmp_path / setting / cfg.run_name)]
    assert results["true"] == pytest.approx(results["false"], rel=1e-3)


# ---------------------------------------------------------------------------------- resume restores what it saves


def seed_every_global_generator(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed + 1)
    random.seed(seed + 2)


def draw_from_every_global_generator() -> list:
    return [torch.rand(4), np.random.rand(4), np.random.standard_normal(3), [random.random() for _ in range(4)],
            random.gauss(0.0, 1.0)]


def assert_same_draws(a: list, b: list) -> None:
    assert torch.equal(a[0], b[0])
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])
    assert a[3] == b[3] and a[4] == b[4]


def test_rng_state_round_trips_torch_numpy_and_python(tmp_path):
    """rng_state / set_rng_state, through a checkpoint file (weights_only), give back every global
    generator's state, the cached Gaussians of numpy and python included."""
    seed_every_global_generator(1)
    np.random.standard_normal()  # an odd number of Gaussians: one is cached
    random.gauss(0.0, 1.0)
    checkpoint.save(tmp_path / "rng.pt", {"rng": checkpoint.rng_state()})
    expected = draw_from_every_global_generator()
    seed_every_global_generator(10)  # elsewhere
    assert not torch.equal(torch.rand(4), expected[0])
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    assert_same_draws(draw_from_every_global_generator(), expected)


def test_resume_puts_the_global_generators_back(make_cfg, tmp_path):
    """Nothing draws from the global generators after a run's initialisation today; the next thing
    that does must find them, after a resume, where the checkpoint left them."""
    from normbench.train import Run

    cfg = make_cfg("norm=bn", "epochs=2")
    run_dir = tmp_path / "runs" / cfg.run_name
    run_job(cfg)
    checkpoint.set_rng_state(torch.load(run_dir / "checkpoint.pt", weights_only=True)["rng"])
    expected = draw_from_every_global_generator()  # what the generators give from the checkpoint's state

    run = Run(cfg, run_dir, log=lambda *a: None)
    seed_every_global_generator(10)  # the generators as another process's would be
    draw_from_every_global_generator()
    run.resume()
    assert run.state.epoch == 2  # it did resume
    assert_same_draws(draw_from_every_global_generator(), expected)


# ---------------------------------------------------------------------------------- the names of what is measured


def test_metric_names_are_those_of_the_committed_results(make_cfg, tmp_path):
    """metrics.csv's header and the TensorBoard tags are a format: the committed results and the
    report read them."""
    committed = sorted((REPO / "results").glob("*/runs/**/metrics.csv"))
    assert committed
    with open(committed[0]) as f:
        assert next(csv.reader(f)) == tracking.METRIC_COLUMNS
    assert tracking.METRIC_COLUMNS == [
        "epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc", "val_loss", "val_acc", "lr", "seconds",
        "gap_train_batchstats_acc", "gap_test_batchstats_acc", "gap_test_popstats_acc", "gap_test_ema_acc",
        "gap_test_precise_acc"]
    assert set(tracking.EPOCH_TAGS) <= set(tracking.METRIC_COLUMNS)
    assert tracking.EPOCH_TAGS["train_loss"] == "train/loss_epoch"
    assert tracking.EPOCH_TAGS["gap_test_ema_acc"] == "gap/test_ema_acc"
    assert tracking.HPARAM_METRICS == ["test/acc", "test/loss", "train/loss", "train/acc", "summary/best_test_acc"]
    assert set(tracking.LAST_EPOCH_FIELDS) == {"train_loss", "train_acc", "test_loss", "test_acc", "val_acc",
                                               *run_summary.GAP_FIELDS}
    # the report reads what the trainer writes
    assert set(collect.REQUIRED_METRICS_COLUMNS) <= set(tracking.METRIC_COLUMNS)
    assert set(run_summary.FLOAT_FIELDS) | set(run_summary.INTEGER_FIELDS) <= set(run_summary.FIELDS)

    cfg = make_cfg("norm=bn", "data.val_split=20", "data.subset=100", "data.test_subset=40", "gap_train_images=20")
    run_job(cfg)
    run_dir = tmp_path / "runs" / cfg.run_name
    with open(run_dir / "metrics.csv") as f:
        assert next(csv.reader(f)) == tracking.METRIC_COLUMNS
    tags = set(scalars(run_dir))
    assert {"train/loss", "zz_diagnostics/lr", "train/loss_epoch", "train/acc", "test/loss", "test/acc", "val/loss",
            "val/acc", "gap/train_batchstats_acc", "gap/test_batchstats_acc", "gap/test_popstats_acc",
            "gap/test_ema_acc", "summary/best_test_acc"} <= tags
    assert {tag.split("/")[0] for tag in tags} == {"train", "test", "val", "gap", "summary", "zz_diagnostics"}
    assert {tag.split("/")[1] for tag in tags if tag.startswith("zz_diagnostics/")} == {"lr", "bn_gap"}  # perf/: 1 epoch
