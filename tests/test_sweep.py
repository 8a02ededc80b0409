"""Real Hydra multiruns in a subprocess: readable run folders, skip/resume on rerun, failure isolation,
reports, and parallel launchers."""

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from normbench import identity, report
from tests.conftest import TINY_OVERRIDES, run_cli

RUNS = ["cnn/bn/bs2/lr0.1/ep1/seed0", "cnn/bn/bs8/lr0.1/ep1/seed0", "cnn/gn/bs2/lr0.1/ep1/seed0", "cnn/gn/bs8/lr0.1/ep1/seed0"]


def sweep(tiny_data, out_dir, *overrides, env=None):
    args = ["-m", *TINY_OVERRIDES, f"data.root={tiny_data}", f"out_dir={out_dir}", *overrides]
    return run_cli(args, env_extra={"NORMBENCH_CACHE": str(Path(out_dir).parent / "cache"), **(env or {})})


def statuses(out_dir: Path) -> dict[str, str]:
    return {str(p.parent.relative_to(out_dir)): json.loads(p.read_text())["status"] for p in out_dir.rglob("summary.json")}


@pytest.mark.slow  # 43 s; skip and resume are tested in one process by test_train
def test_sweep_report_rerun_and_partial_rerun(tiny_data, tmp_path):
    out = tmp_path / "sweep"
    first = sweep(tiny_data, out, "norm=bn,gn", "batch_size=2,8", "report_at_end=true")
    assert first.returncode == 0, first.stderr
    assert statuses(out) == {run: "completed" for run in RUNS}
    assert "| bn " in first.stdout and "tensorboard --logdir" in first.stdout  # the table, printed at the end
    table = pd.read_csv(out / "report" / "table.csv")
    assert len(table) == 4
    for png in ("error_vs_batch.png", "curves_test_acc.png", "curves_train_loss.png"):
        assert (out / "report" / png).read_bytes()[:4] == b"\x89PNG"

    again = sweep(tiny_data, out, "norm=bn,gn", "batch_size=2,8")
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("skip ") == 4 and "epoch 1/1" not in again.stdout

    old = json.loads((out / RUNS[2] / "summary.json").read_text())
    (out / RUNS[2] / "summary.json").unlink()
    partial = sweep(tiny_data, out, "norm=bn,gn", "batch_size=2,8")
    assert partial.returncode == 0, partial.stderr
    assert partial.stdout.count("skip ") == 3
    # only that run is picked up again: it resumes from its last checkpoint (after its only epoch)
    assert f"resuming {RUNS[2]}" in partial.stdout and partial.stdout.count("resuming") == 1
    new = json.loads((out / RUNS[2] / "summary.json").read_text())
    assert new["status"] == "completed" and new["test_acc"] == old["test_acc"]

    # the report command reads the same runs
    assert report.main([str(out), "--out", str(tmp_path / "rep")]) == 0
    assert len(pd.read_csv(tmp_path / "rep" / "table.csv")) == 4


def test_divergence_and_crash_do_not_stop_the_sweep(tiny_data, tmp_path):
    out = tmp_path / "sweep"
    result = sweep(tiny_data, out, "norm=bn", "lr=0.1,1e12", "optim.lr_scaling=none")
    assert result.returncode == 0, result.stderr  # divergence is a result, not an error
    assert sorted(statuses(out).values()) == ["completed", "diverged"]

    # A run that fails at run time (here: a batch larger than the training set, known only once the
    # data is loaded) is recorded; the sweep finishes the other runs, then exits non-zero.
    crash = sweep(tiny_data, tmp_path / "crash", "norm=gn", "batch_size=8,200,4")
    assert crash.returncode == 1
    assert statuses(tmp_path / "crash") == {"cnn/gn/bs8/lr0.1/ep1/seed0": "completed",
                                            "cnn/gn/bs200/lr0.1/ep1/seed0": "failed",
                                            "cnn/gn/bs4/lr0.1/ep1/seed0": "completed"}
    assert "failed runs:" in crash.stderr and "larger than the training set" in crash.stderr
    table = pd.read_csv(report.write_report([tmp_path / "crash"], tmp_path / "crash_report")["table.csv"])
    assert table.set_index("batch_size")["n_failed"].to_dict() == {4: 0, 8: 0, 200: 1}


def test_virtual_batch_identity(tiny_data, tmp_path):
    """Batch-independent norms ignore the virtual batch: their duplicates share one run folder."""
    out = tmp_path / "sweep"
    result = sweep(tiny_data, out, "norm=bn,gn", "norm.virtual_batch=2,4")
    assert result.returncode == 0, result.stderr
    assert set(statuses(out)) == {"cnn/bn/bs8-vb2/lr0.1/ep1/seed0", "cnn/bn/bs8-vb4/lr0.1/ep1/seed0", "cnn/gn/bs8/lr0.1/ep1/seed0"}
    trained = [line for line in result.stdout.splitlines() if "epoch 1/1" in line]
    assert sum(line.startswith("cnn/gn/") for line in trained) == 1  # trained once, then skipped
    assert "skip cnn/gn/bs8/lr0.1/ep1/seed0: already completed" in result.stdout
    gn = json.loads((out / "cnn/gn/bs8/lr0.1/ep1/seed0/summary.json").read_text())
    assert gn["virtual_batch"] is None and gn["norm_batch"] is None
    summary = json.loads((out / "cnn/bn/bs8-vb2/lr0.1/ep1/seed0/summary.json").read_text())
    assert summary["batch_size"] == 8 and summary["virtual_batch"] == 2 and summary["norm_batch"] == 2


@pytest.mark.slow  # 18 s: two parallel jobs; make test-all
def test_joblib_launcher_runs_two_jobs_in_parallel(tiny_data, tmp_path):
    out = tmp_path / "sweep"
    result = sweep(tiny_data, out, "hydra/launcher=local_parallel", "hydra.launcher.n_jobs=2", "norm=bn,gn")
    assert result.returncode == 0, result.stderr
    assert statuses(out) == {"cnn/bn/bs8/lr0.1/ep1/seed0": "completed", "cnn/gn/bs8/lr0.1/ep1/seed0": "completed"}
    for run in statuses(out):
        cfg = json.loads((out / run / "summary.json").read_text())["config"]
        assert cfg["threads"] >= 1  # jobs x threads <= cores


def test_live_claim_blocks_a_second_trainer(tiny_data, tmp_path):
    """A run folder held by a live process is skipped by another sweep, not trained twice."""
    import fcntl
    import os

    out = tmp_path / "sweep"
    run_dir = out / "cnn/bn/bs8/lr0.1/ep1/seed0"
    run_dir.mkdir(parents=True)
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        result = sweep(tiny_data, out, "norm=bn,gn")
    finally:
        os.close(fd)
    assert result.returncode == 0, result.stderr
    assert "another live process" in result.stdout
    assert statuses(out) == {"cnn/gn/bs8/lr0.1/ep1/seed0": "completed"}


@pytest.mark.slow  # 18 s; the joblib launcher test covers parallel sweeps
def test_submitit_local_launcher(tiny_data, tmp_path):
    out = tmp_path / "sweep"
    result = sweep(tiny_data, out, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "norm=bn,gn")
    assert result.returncode == 0, result.stderr
    assert sorted(statuses(out).values()) == ["completed", "completed"]


# Every preset but bf16_parity_cpu, whose runs train for scripts/parity.py's table under results/bench/.
SWEEP_PRESETS = sorted(p.stem for p in (identity.CONF_DIR / "experiment").glob("*.yaml") if p.stem != "bf16_parity_cpu")


def test_the_readme_preset_table_names_every_preset():
    """A preset added to conf/experiment/ has its row in the README's preset table (a GPU preset and its
    CPU variant may share one: `gn_fig1` / `gn_fig1_cpu`)."""
    readme = (identity.CONF_DIR.parent / "README.md").read_text()
    table = readme[readme.index("## Experiment presets"):readme.index("### Reference results")]
    named = {name for line in table.splitlines() if line.startswith("| `") for name in
             line.split(" | ")[0].strip("| ").replace("`", "").split(" / ")}
    assert {p.stem for p in (identity.CONF_DIR / "experiment").glob("*.yaml")} == named


@pytest.mark.parametrize("preset", SWEEP_PRESETS)
def test_experiment_presets_compose_to_valid_sweeps(preset, tmp_path):
    from normbench.compose import compose, expand
    from normbench.models import MODELS
    from normbench.norms import NORMS

    cfg = compose([f"experiment={preset}"])
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    jobs = [dict(o.split("=", 1) for o in job) for job in expand(f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items())]
    assert {job["norm"] for job in jobs} <= set(NORMS)
    assert cfg.model.name in MODELS
    # Reference presets train inside results/ (their summary.json and metrics.csv are committed) and
    # write their report beside the runs; the others train under runs/.
    assert (cfg.out_dir, cfg.report_dir) in ((f"runs/{preset}", None), (f"results/{preset}/runs", f"results/{preset}"))
    for job in jobs:
        vb = job.get("norm.virtual_batch")
        assert vb in (None, "null") or int(job.get("batch_size", cfg.batch_size)) % int(vb) == 0
    if preset.endswith("_cpu"):
        assert cfg.data.subset is not None  # reduced, but real data


def test_sweep_report_honours_select_best_and_report_dir(tmp_path, capsys):
    """The end-of-sweep report (report_at_end) with a preset's select_best and report_dir."""
    from omegaconf import OmegaConf

    from normbench.cli import SweepSummary
    from tests.test_report import make_run

    sweep_dir = tmp_path / "runs"
    for lr, val in ((0.1, 70.0), (0.2, 75.0)):
        make_run(sweep_dir, norm="gn", lr=lr, seed=0, test_accs=[50.0, 60.0], val_accs=[50.0, val])
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}, "report_at_end": True,
                               "report_dir": str(tmp_path / "reference"), "select_best": "lr", "target_acc": 80.0})

    SweepSummary().on_multirun_end(config)

    table = pd.read_csv(tmp_path / "reference" / "table.csv")
    assert len(table) == 1 and table["lr_selected"].iloc[0] == pytest.approx(0.2)
    assert not (sweep_dir / "report").exists()
    assert "lr (selected)" in capsys.readouterr().out


def reference_script():
    """scripts/reference.py as a module (scripts/ is not a package)."""
    import importlib
    import sys

    scripts = str(Path(__file__).resolve().parents[1] / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    return importlib.import_module("reference")


def reference_setup(tiny_data, tmp_path, monkeypatch, *sweep: str):
    """scripts/reference.py, its run and report folders, and the tiny overrides of a gn_fig1_cpu protocol over
    `sweep` (its norms and batches) with a two-lr grid."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out, rep = tmp_path / "runs", tmp_path / "report"
    overrides = [*TINY_OVERRIDES, f"data.root={tiny_data}", f"out_dir={out}", f"report_dir={rep}", *sweep,
                 "lr=0.1,0.3", "data.subset=null", "data.test_subset=null", "data.val_split=40"]
    return reference_script(), out, rep, overrides


def test_reference_protocol_tunes_on_seed_0_then_adds_seeds_at_the_pick(tiny_data, tmp_path, monkeypatch, capsys):
    """scripts/reference.py: the preset's lr grid at seed 0, one more seed at each arm's pick
    (by validation accuracy), the report over both seeds."""
    reference, out, rep, overrides = reference_setup(tiny_data, tmp_path, monkeypatch, "norm=bn,gn",
                                                     "norm.virtual_batch=2", "gap_every=1")

    assert reference.main(["gn_fig1_cpu", "--seeds", "2", "--extend", "1", *overrides]) == 0

    runs = {p.parent.relative_to(out).as_posix(): json.loads(p.read_text()) for p in out.rglob("summary.json")}
    assert all(r["status"] in ("completed", "diverged") for r in runs.values())
    table = pd.read_csv(rep / "table.csv")
    assert sorted(table["norm"]) == ["bn", "gn"] and (table["n_completed"] >= 1).all()
    for arm in ("bn/bs8-vb2", "gn/bs8"):
        tuned = {run.split("/lr")[1].split("/")[0]: r for run, r in runs.items()
                 if run.startswith(f"cnn/{arm}/") and run.endswith("/seed0")}
        # a two-lr grid: any pick is at an edge, so one more lr a grid step (x3) beyond it
        assert len(tuned) == 3 and {"0.1", "0.3"} < set(tuned) and set(tuned) - {"0.1", "0.3"} <= {"0.9", "0.0333333"}
        val = {lr: r["best_val_acc"] if r["best_val_acc"] is not None else -1.0 for lr, r in tuned.items()}
        with_seed1 = [lr for lr in tuned if f"cnn/{arm}/lr{lr}/ep1/seed1" in runs]
        assert len(with_seed1) == 1 and val[with_seed1[0]] == max(val.values()), (arm, val)
        picked = table[table["norm"] == arm.split("/")[0]]["lr_selected"].iloc[0]
        assert f"{picked:g}" == with_seed1[0]
    assert len(runs) == 8  # 2 arms x 3 lr at seed 0, and seed 1 at each pick

    # what to commit: the finished runs' summary.json and metrics.csv, not a run still in progress
    (out / "cnn/gn/bs8/lr0.1/ep1/seed7").mkdir(parents=True)
    (out / "cnn/gn/bs8/lr0.1/ep1/seed7/metrics.csv").write_text("epoch\n1\n")
    capsys.readouterr()
    assert reference.main(["gn_fig1_cpu", "--finished", f"out_dir={out}"]) == 0
    listed = capsys.readouterr().out.split()
    assert sorted(listed) == sorted(str(out / run / name) for run in runs for name in ("summary.json", "metrics.csv"))


def test_reference_lengths_train_every_seed_at_the_pick_of_the_shortest(tiny_data, tmp_path, monkeypatch):
    """--lengths 2: tuned at the preset's epochs (1 here), each arm's every seed again at 2 epochs at its pick
    and at no other lr; the report then has a length section."""
    reference, out, rep, overrides = reference_setup(tiny_data, tmp_path, monkeypatch, "norm=bn,gn",
                                                     "norm.virtual_batch=2")
    assert reference.main(["gn_fig1_cpu", "--seeds", "2", "--extend", "0", "--lengths", "2", *overrides]) == 0
    runs = {p.parent.relative_to(out).as_posix() for p in out.rglob("summary.json")}
    table = pd.read_csv(rep / "table.csv")
    for norm, batch in (("bn", "bs8-vb2"), ("gn", "bs8")):
        pick = table[(table["norm"] == norm) & (table["epochs"] == 1)]["lr_selected"].iloc[0]
        long = sorted(r for r in runs if r.startswith(f"cnn/{norm}/") and "/ep2/" in r)
        assert long == [f"cnn/{norm}/{batch}/lr{pick:g}/ep2/seed{s}" for s in (0, 1)]
    assert len(runs) == 2 * (2 + 1 + 2)  # per arm: 2 lrs at seed 0, seed 1 at the pick, 2 seeds at 2 epochs
    assert (rep / "length.md").is_file()
    with pytest.raises(SystemExit) as bad:
        reference.main(["gn_fig1_cpu", "--lengths", "2,x", *overrides])
    assert bad.value.code == 2


def test_reference_equal_steps_trains_the_larger_batch_again_for_the_smaller_ones_steps(tiny_data, tmp_path,
                                                                                          monkeypatch):
    """--equal-steps: batch 8 and 2 tuned and seeded at the preset's length (1 epoch of 120 images: 15 and 60
    steps); then batch 8's every seed again at its pick for 60 steps, batch 2 (already at 60) not again; the
    report contrasts them at equal images (batch) and at equal steps."""
    reference, out, rep, overrides = reference_setup(tiny_data, tmp_path, monkeypatch, "norm=gn",
                                                     "norm.virtual_batch=null", "batch_size=8,2")
    assert reference.main(["gn_fig1_cpu", "--seeds", "2", "--extend", "0", "--equal-steps", *overrides]) == 0
    runs = {p.parent.relative_to(out).as_posix(): json.loads(p.read_text()) for p in out.rglob("summary.json")}
    table = pd.read_csv(rep / "table.csv")
    pick = table[(table["batch_size"] == 8) & (table["budget"] == "ep1")]["lr_selected"].iloc[0]
    again = sorted(r for r in runs if "/steps" in r)
    assert again == [f"cnn/gn/bs8/lr{pick:g}/steps60/seed{s}" for s in (0, 1)]
    assert all(runs[r]["steps_done"] == 60 for r in again)
    assert len(runs) == 2 * (2 + 1) + 2  # per batch: 2 lrs at seed 0, seed 1 at the pick; batch 8's 2 seeds again
    contrasts = pd.read_csv(rep / "comparisons.csv")
    assert sorted(contrasts[contrasts["family"].str.startswith("batch")]["family"]) == ["batch", "batch at equal steps"]


@pytest.mark.parametrize("args, fragment", [
    (["quik"], "unknown experiment 'quik'"),
    (["train_eval_gap_cpu"], "has no data.val_split"),
    (["gn_fig1_cpu", "norm=bn,batchnorm"], "unknown norm 'batchnorm'"),
])
def test_reference_protocol_refuses_bad_input_in_one_line(tiny_data, tmp_path, capsys, args, fragment):
    reference = reference_script()

    assert reference.main([*args, f"data.root={tiny_data}", f"out_dir={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "runs").exists()


def test_reference_launches_cover_exactly_the_arms_in_few_launches():
    """The protocol's launches: each a product of override values that is exactly a set of the
    arms asked for (no run more, none less), arms differing in any one key sharing a launch."""
    import itertools

    reference = reference_script()

    def arm(norm, vb, lr):
        return [f"norm={norm}", f"norm.virtual_batch={vb}"], [f"lr={lr}", "seed=0"]

    items = [arm("bn", 4, 0.4), arm("bn", 2, 0.4), arm("brn", 32, 0.4), arm("brn", 2, 0.4),
             arm("gn", 32, 0.025), arm("ln", 32, 0.025), arm("none", 32, 0.025), arm("in", 32, 0.4)]
    launches = reference.grouped(items)

    def jobs(launch):
        options = [[f"{o.split('=')[0]}={v}" for v in o.split("=", 1)[1].split(",")] for o in launch]
        return {tuple(job) for job in itertools.product(*options)}

    covered = [job for launch in launches for job in jobs(launch)]
    assert sorted(covered) == sorted(tuple(a + t) for a, t in items)  # every arm once, nothing else
    assert ["norm=gn,ln,none", "norm.virtual_batch=32", "lr=0.025", "seed=0"] in launches
    assert ["norm=bn", "norm.virtual_batch=4,2", "lr=0.4", "seed=0"] in launches
    assert len(launches) == 4


def test_reference_runs_launches_side_by_side_while_their_jobs_fit(monkeypatch):
    """A launch of one job under a two-job launcher leaves a core idle: the next launch starts beside
    it when its jobs fit in the free slots, else waits; a failed launch is reported."""
    reference = reference_script()

    class Launch:
        """A normbench command that ends on its second poll."""
        running: list = []

        def __init__(self, args):
            self.args, self.polls = args, 0
            self.returncode = 1 if "norm=bad" in args else 0
            self.beside = [launch.args for launch in Launch.running]  # what was still training when this started
            Launch.running.append(self)

        def poll(self):
            self.polls += 1
            return None if self.polls < 2 else self.wait()

        def wait(self, timeout=None):
            if timeout is not None and self.polls < 2:  # still training: the wait times out, as Popen's does
                raise subprocess.TimeoutExpired(self.args, timeout)
            if self in Launch.running:
                Launch.running.remove(self)
            return self.returncode

    started = []
    monkeypatch.setattr(reference, "start_normbench", lambda *args: started.append(Launch(list(args))) or started[-1])
    monkeypatch.setattr(reference, "POLL_S", 0.0)
    one_bn, one_gn, two, bad = ["norm=bn", "lr=0.4"], ["norm=gn", "lr=0.025"], ["norm=bn,gn", "lr=0.1"], ["norm=bad", "lr=0.1"]

    assert reference.run_launches([one_bn, two, one_gn, ["norm=ln", "lr=0.1"]], slots=2) is False
    assert [launch.args for launch in started] == [two, one_bn, one_gn, ["norm=ln", "lr=0.1"]]  # the largest first
    assert [launch.beside for launch in started] == [[], [], [one_bn], []]  # the two-job launch fills both slots
    assert started[0].polls >= 2 and started[1].polls >= 2  # the one-job launches waited for it, the third for a slot

    started.clear()
    assert reference.run_launches([one_bn, one_gn], slots=1) is False
    assert [launch.beside for launch in started] == [[], []]  # one slot: one after the other

    started.clear()
    assert reference.run_launches([one_bn, bad], slots=2) is True
    assert len(reference.expand(["experiment=small_batch_cpu", "norm=bn,gn", "batch_size=128,32,8", "lr=0.1"])) == 6
    assert reference.parallel_slots(reference.compose("small_batch_cpu", ["hydra/launcher=local_parallel"])) == 2
    assert reference.parallel_slots(reference.compose("small_batch_cpu", [])) == 1  # the basic launcher: one at a time
