"""The training budget (normbench/budget.py): epochs, steps or images; exact length, schedule, resume, names,
identity, validation, and the folder of runs from before run names held the length."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from normbench import budget, identity, summary as run_summary
from normbench.cli import run_job
from tests.conftest import TINY_OVERRIDES, make_image_folder, run_cli
from tests.test_train import read_metrics

# tiny_data: 160 training images; batch 8 -> 20 steps per epoch.
STEPS_PER_EPOCH = 20


def test_a_steps_budget_trains_exactly_that_many_steps_and_its_schedule_ends_there(make_cfg, tmp_path):
    """30 steps at 20 steps per epoch: two passes, the second cut at step 30 and evaluated there; the cosine
    schedule reaches its end at step 30, not at an epoch boundary (ignoring the budget would train 1 epoch)."""
    cfg = make_cfg("budget.unit=steps", "budget.length=30", "sched.warmup_epochs=0")
    record = run_job(cfg)
    assert record["status"] == "completed" and record["steps_done"] == 30 and record["epochs_done"] == 2
    assert record["budget"] == "steps30" and record["epochs"] is None and record["config"]["epochs"] is None
    rows = read_metrics(tmp_path / "runs" / cfg.run_name)
    assert [int(r["step"]) for r in rows] == [20, 30]
    assert float(rows[-1]["lr"]) == pytest.approx(0.0, abs=1e-12)  # cosine over exactly the budget's steps
    assert 0.0 < float(rows[0]["lr"]) < cfg.lr * 8 / 128
    assert cfg.run_name == "cnn/bn/bs8/lr0.1/steps30/seed0"


def test_an_images_budget_rounds_up_to_whole_batches(make_cfg):
    record = run_job(make_cfg("budget.unit=images", "budget.length=100"))  # 100 / 8 -> 13 steps
    assert record["steps_done"] == 13 and record["epochs_done"] == 1 and record["budget"] == "img100"


def test_equal_steps_at_two_batch_sizes(make_cfg):
    """The point of a steps budget: batch 2 and batch 8 train the same number of steps (equal epochs would
    give batch 2 four times as many)."""
    small, large = (run_job(make_cfg(f"batch_size={b}", "budget.unit=steps", "budget.length=24")) for b in (2, 8))
    assert small["steps_done"] == large["steps_done"] == 24
    assert (small["epochs_done"], large["epochs_done"]) == (1, 2)


def test_an_epochs_budget_is_the_runs_of_before(make_cfg):
    """budget at its default: the identity of a config from before the option (no budget key) is unchanged,
    and the run trains epochs x steps per epoch."""
    cfg = make_cfg("epochs=2")
    config = identity.run_config(cfg)
    before = {k: v for k, v in config.items() if k != "budget"}
    assert identity.fingerprint(before) == identity.fingerprint(config)
    record = run_job(cfg)
    assert record["steps_done"] == 2 * STEPS_PER_EPOCH and record["budget"] == "ep2" and record["epochs"] == 2


def test_a_steps_budget_ignores_epochs_and_is_its_own_identity(make_cfg):
    steps = identity.fingerprint(identity.run_config(make_cfg("budget.unit=steps", "budget.length=40")))
    assert steps == identity.fingerprint(identity.run_config(make_cfg("budget.unit=steps", "budget.length=40",
                                                                      "epochs=7")))
    assert steps != identity.fingerprint(identity.run_config(make_cfg("budget.unit=steps", "budget.length=41")))
    assert steps != identity.fingerprint(identity.run_config(make_cfg("epochs=2")))  # the same 40 steps, as epochs


def test_lengths_of_one_sweep_have_folders_of_their_own(make_cfg):
    names = {make_cfg(f"epochs={e}").run_name for e in (1, 2, 4)}
    names |= {make_cfg("budget.unit=steps", "budget.length=40").run_name}
    assert names == {f"cnn/bn/bs8/lr0.1/{p}/seed0" for p in ("ep1", "ep2", "ep4", "steps40")}


@pytest.mark.parametrize("overrides, message", [
    (["budget.unit=minutes"], "budget.unit='minutes' is not one of: epochs, steps, images"),
    (["budget.unit=steps"], "budget.unit=steps needs budget.length"),
    (["budget.unit=images", "budget.length=0"], "budget.length=0 must be a positive integer"),
    (["budget.unit=steps", "budget.length=2.5"], "budget.length=2.5 is not an integer"),
    (["budget.length=100"], "budget.length=100 is for budget.unit=steps or images"),
])
def test_a_bad_budget_is_one_line_and_exit_2(tiny_data, tmp_path, overrides, message):
    result = run_cli([*TINY_OVERRIDES, f"data.root={tiny_data}", f"out_dir={tmp_path}", *overrides])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not list(tmp_path.glob("**/summary.json"))


def test_a_frozen_tail_longer_than_a_steps_budget_is_refused_before_training(make_cfg, capsys):
    cfg = make_cfg("budget.unit=steps", "budget.length=30", "freeze_stats_epochs=3")
    with pytest.raises(SystemExit) as exit_:
        run_job(cfg)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "freeze_stats_epochs=3 is more than the run's 2 epochs (steps budget of 30)" in err[0]


def test_a_steps_budget_resumes_exactly_inside_its_cut_epoch(tmp_path):
    """Killed (here: stopped by a checkpoint taken inside the short last pass, as kill -9 would leave it) and
    resumed, a steps budget gives the uninterrupted run's metrics bit for bit."""
    from normbench.compose import compose
    from normbench.train import Run, train

    data_root = make_image_folder(tmp_path / "data", n_train=8, n_test=4)  # 80 images, batch 8: 10 steps a pass
    overrides = [*TINY_OVERRIDES, f"data.root={data_root}", "budget.unit=steps", "budget.length=15", "ckpt_every=3",
                 "stat_gap_every=0"]
    straight = train(compose([*overrides, f"out_dir={tmp_path / 'a'}"], hydra_node=False), tmp_path / "a",
                     log=lambda *a: None)

    cfg = compose([*overrides, f"out_dir={tmp_path / 'b'}"], hydra_node=False)
    stop_at = 12  # inside the second, cut pass (steps 11..15), right after the checkpoint at step 12
    original = Run.train_step

    def train_step(run, *args):
        if run.state.step == stop_at:
            raise KeyboardInterrupt
        return original(run, *args)

    Run.train_step = train_step
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg, tmp_path / "b", log=lambda *a: None)
    finally:
        Run.train_step = original
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["run"]["step"] == stop_at
    resumed = train(cfg, tmp_path / "b", log=lambda *a: None)
    for key in ("test_acc", "test_loss", "train_loss", "train_acc", "steps_done", "epochs_done"):
        assert resumed[key] == straight[key], key
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(read_metrics(tmp_path / "b")) == drop(read_metrics(tmp_path / "a"))
    assert straight["steps_done"] == 15


def test_a_run_finished_before_names_held_the_length_is_skipped_where_it_is(make_cfg, tmp_path, capsys):
    """A committed run sits in its folder of then (cnn/bn/bs8/lr0.1/seed0): rerunning its command skips it
    there, and the empty folder made for it now goes."""
    cfg = make_cfg()
    first = run_job(cfg)
    runs = tmp_path / "runs"
    legacy = runs / identity.legacy_run_name(cfg)
    assert legacy == runs / "cnn/bn/bs8/lr0.1/seed0"
    shutil.move(runs / cfg.run_name, legacy)
    (runs / cfg.run_name / ".hydra").mkdir(parents=True)  # what Hydra makes before the job runs
    capsys.readouterr()
    again = run_job(cfg)
    assert again["finished_at"] == first["finished_at"] and f"in {legacy}" in capsys.readouterr().out
    assert not (runs / cfg.run_name).exists()
    # Another length is another run: the legacy folder does not stand in for it.
    other = make_cfg("epochs=2")
    assert run_job(other)["epochs_done"] == 2 and json.loads((legacy / "summary.json").read_text())["epochs"] == 1


def test_old_summaries_read_with_their_epochs_budget(tmp_path):
    record = run_summary.new({"run_name": "x", "model": "cnn", "norm": "bn", "batch_size": 8, "norm_batch": 8,
                              "lr": 0.1, "seed": 0, "epochs": 3}, "completed", test_acc=10.0)
    record.pop("budget")
    run_summary.write(tmp_path, record)
    assert run_summary.load(tmp_path)["budget"] == budget.label("epochs", None, 3) == "ep3"
