"""The reference protocol for a preset: tune each arm's learning rate on the validation split,
then train more seeds at the chosen rate, then write the report.

    python scripts/reference.py gn_fig1_cpu [--seeds 3] [override ...]
    make reference PRESET=gn_fig1_cpu          (two parallel one-thread jobs on this machine)

1. Tuning: the preset's sweep as written (its lr grid and data.val_split) with seed 0. Each arm
   of the sweep (one combination of its parameters other than lr and seed) picks the lr with the
   best validation accuracy, by the report's own rule (table.aggregate(select_best="lr")).
2. An arm whose pick is at the edge of the grid (the best rate may lie beyond it) trains one more
   lr past that edge, a grid step further (0.2 -> 0.4; 0.05 -> 0.025), and picks again; at most
   --extend times.
3. Seeds: each arm is trained again with seeds 1 .. n-1 at its pick.
4. Lengths (--lengths 8,16,32, a length study): each arm at its pick, tuned at the preset's own
   length, trains every seed again at each of these epochs (the lr rule of the study: tuned at the
   shortest length on the validation split, kept at the longer ones).
5. Equal steps (--equal-steps, where the arms' batches differ): each arm that took fewer optimizer
   steps than the most any arm took at the preset's own length trains every seed again at its pick
   for that many steps (budget.unit=steps), so that the report compares batches at equal steps as
   well as at the preset's equal training images (comparisons' "batch at equal steps").
6. The report of every run of the preset, with --select-best lr: per arm the chosen lr's test
   accuracy, mean ± std and 95% CI over the seeds. Candidates are compared on seed 0 alone
   there too (the seeds every candidate has), so the report picks what step 3 trained.

To commit what has finished (the runs' summary.json and metrics.csv, as .gitignore keeps them;
not the files of a run still training):  git add $(python scripts/reference.py PRESET --finished)

Each step is `normbench` itself, which skips finished runs and resumes killed ones: a stopped
protocol goes on where it stopped when the same command runs again. Overrides given here go to
every step (e.g. hydra/launcher=local_parallel, threads=1, or norm=bn,gn to do part of it),
except seed=: the protocol owns the seeds (--seeds), so a seed override is dropped. Under the
parallel launcher (hydra/launcher=local_parallel), launches smaller than its n_jobs (one arm alone
at its lr) run side by side, so no core idles.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from normbench import validate
from normbench.compose import compose as compose_config
from normbench.compose import expand
from normbench.errors import UserError

SWEPT_PER_ARM = ("lr", "seed")  # what varies inside one arm: the tuned rate and the seeds
POLL_S = 1.0  # how often run_launches looks for any finished launch while waiting for a free slot


def start_normbench(*args: str) -> subprocess.Popen:
    """Start the normbench command (this interpreter's)."""
    print("+ normbench " + " ".join(args), flush=True)
    return subprocess.Popen([sys.executable, "-m", "normbench", *args])


def normbench(*args: str) -> int:
    """Run the normbench command and return its exit status."""
    return start_normbench(*args).wait()


def parallel_slots(cfg) -> int:
    """Jobs this machine trains at once: the joblib launcher's n_jobs, else one."""
    launcher = cfg.hydra.launcher
    n_jobs = launcher.get("n_jobs") if "joblib" in str(launcher.get("_target_", "")) else None
    return n_jobs if isinstance(n_jobs, int) and n_jobs > 0 else 1


def run_launches(launches: list[list[str]], slots: int) -> bool:
    """Run each launch (normbench's arguments), several side by side while their jobs fit in `slots`:
    a one-job launch under a two-job launcher would leave a core idle (each job's threads are
    cores // n_jobs). The largest go first, so that the one-job launches meet at the end and pair
    up. Returns whether any failed."""
    failed, running = False, []  # (process, jobs it trains at once)
    sized = sorted(((min(len(expand(args)), slots), args) for args in launches), key=lambda item: -item[0])
    for size, args in sized:
        while running and sum(jobs for _, jobs in running) + size > slots:
            try:  # back at once when the oldest ends (each launch starts a new process: seconds in the tests)
                running[0][0].wait(timeout=POLL_S)
            except subprocess.TimeoutExpired:
                pass
            for process, jobs in [r for r in running if r[0].poll() is not None]:
                failed |= process.returncode != 0
                running.remove((process, jobs))
        running.append((start_normbench(*args), size))
    for process, _ in running:
        failed |= process.wait() != 0
    return failed


def compose(preset: str, overrides: list[str]):
    """The preset's config with `overrides`, as the normbench command would compose one of its jobs."""
    return compose_config([f"experiment={preset}", *overrides])


def sweep_jobs(preset: str, extra: list[str]) -> list[list[str]]:
    """Every job of `normbench experiment=<preset> <extra>`: the preset's sweep parameters with the
    command line's on top."""
    params = compose(preset, []).hydra.sweeper.params or {}
    return expand([f"{k}={v}" for k, v in params.items()] + extra)


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def arms_and_grid(jobs: list[list[str]]) -> tuple[list[list[str]], list[str]]:
    """The sweep's arms (a job's overrides without lr and seed, in order, without repeats) and its lr grid."""
    arms, grid = [], []
    for job in jobs:
        arm = [o for o in job if _key(o) not in SWEPT_PER_ARM]
        if arm not in arms:
            arms.append(arm)
        grid += [o.split("=", 1)[1] for o in job if _key(o) == "lr" and o.split("=", 1)[1] not in grid]
    return arms, grid


def run_dir(preset: str, arm: list[str], lr: str | None, seed: int = 0) -> Path:
    """The folder of the arm's run at `lr` (None: the config's) and `seed`."""
    cfg = compose(preset, [*arm, *([f"lr={lr}"] if lr else []), f"seed={seed}"])
    return Path(cfg.out_dir) / cfg.run_name


def chosen_lr(preset: str, arm: list[str], grid: list[str]) -> str | None:
    """The arm's lr with the best validation accuracy at seed 0 (None while no candidate finished)."""
    from normbench.collect import collect_runs
    from normbench.table import aggregate

    run_dirs = [run_dir(preset, arm, lr) for lr in grid or [None]]
    finished = [d for d in dict.fromkeys(run_dirs) if (d / "summary.json").exists()]
    if not finished:
        return None
    table = aggregate(collect_runs(finished), select_best="lr")
    if table.empty:
        return None
    return f"{float(table['lr_selected'].iloc[0]):g}"


def distinct_arms(preset: str, arms: list[list[str]], grid: list[str]) -> list[list[str]]:
    """The arms that train different runs (a batch-independent norm's arms at every virtual batch are one)."""
    kept, seen = [], set()
    for arm in arms:
        runs = str(run_dir(preset, arm, grid[0] if grid else None)).rsplit("/lr", 1)[0]
        if runs not in seen:
            seen.add(runs)
            kept.append(arm)
    return kept


def steps_taken(run: Path) -> int | None:
    """The optimizer steps a finished run took (None: not finished)."""
    from normbench import summary

    record = summary.read(run)
    return record["steps_done"] if record and record["status"] in summary.FINISHED else None


def grid_ratio(grid: list[str]) -> float | None:
    """The step of a geometric lr grid (0.05, 0.1, 0.2: 2); None for fewer than two values."""
    values = sorted(float(v) for v in grid)
    return values[1] / values[0] if len(values) > 1 and values[0] > 0 else None


def beyond_edge(pick: str | None, candidates: list[str], ratio: float | None) -> str | None:
    """The next lr past the edge of `candidates` if `pick` is at that edge (the best rate may lie
    outside the grid), else None."""
    if pick is None or ratio is None:
        return None
    values = [float(v) for v in candidates]
    if float(pick) == max(values):
        return f"{max(values) * ratio:g}"
    if float(pick) == min(values):
        return f"{min(values) / ratio:g}"
    return None


def grouped(items: list[tuple[list[str], list[str]]]) -> list[list[str]]:
    """Launch overrides for (arm, overrides) items: as few launches as the items allow, each a
    product of values that is exactly a set of the items, so a launch has several jobs for the
    parallel launcher to share out (one bn launch for every virtual batch at lr 0.4; one launch for
    gn, ln, none at lr 0.025). Groups that differ in one key only are merged on it, key by key
    from the last."""
    keys = list(dict.fromkeys(_key(o) for arm, _ in items for o in arm))
    groups = [({_key(o): (o.split("=", 1)[1],) for o in arm}, tuple(tail)) for arm, tail in items]
    for key in reversed(keys):
        merged: dict[tuple, tuple[dict, tuple]] = {}
        for values, tail in groups:
            rest = (tuple((k, v) for k, v in values.items() if k != key), key in values, tail)
            if rest in merged:
                merged[rest][0][key] = merged[rest][0].get(key, ()) + values.get(key, ())
            else:
                merged[rest] = (dict(values), tail)
        groups = list(merged.values())
    return [[*(f"{k}={','.join(v)}" for k, v in values.items()), *tail] for values, tail in groups]


def checked_config(preset: str, extra: list[str]):
    """The preset's config with the fixed overrides, once every run it asks for is valid input
    (normbench's own checks) and it has a validation split to pick the lr on; else UserError."""
    validate.check_group_choice("experiment", preset)
    if not compose(preset, []).data.get("val_split") and not any(_key(o) == "data.val_split" for o in extra):
        raise UserError(f"experiment={preset} has no data.val_split to pick the lr on; set one (e.g. data.val_split=2000)")
    validate.check_command_line([f"experiment={preset}", *extra], multirun=True)
    return compose(preset, [o for o in extra if "," not in o])


def finished_run_files(out_dir: Path) -> list[Path]:
    """summary.json and metrics.csv of every finished run under out_dir (a later rerun skips them)."""
    from normbench import summary

    files = []
    for path in sorted(out_dir.rglob(summary.SUMMARY_NAME)):
        record = summary.read(path.parent)
        if record and record["status"] in summary.FINISHED:
            files += [path, *[p for p in [path.parent / "metrics.csv"] if p.exists()]]
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", help="a conf/experiment/ preset with an lr grid and data.val_split")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm at its chosen lr (default 3)")
    parser.add_argument("--extend", type=int, default=2,
                        help="times an arm whose pick is at the edge of the lr grid gets one more lr beyond it (default 2)")
    parser.add_argument("--lengths", default=None, metavar="E1,E2,...",
                        help="epochs at which every arm trains every seed again at the lr picked at the preset's "
                             "own epochs (a length study)")
    parser.add_argument("--equal-steps", action="store_true",
                        help="then every seed again, at its pick, of each arm that took fewer optimizer steps than the "
                             "most any arm took, for that many steps (small and large batches at equal steps)")
    parser.add_argument("--finished", action="store_true",
                        help="only list the committable files of the preset's finished runs, one per line")
    parser.add_argument("overrides", nargs="*",
                        help="normbench overrides for every step (a seed= override is dropped: see --seeds)")
    args = parser.parse_intermixed_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    if args.lengths is not None:
        try:
            lengths = [validate.check_positive_int("--lengths", v) for v in args.lengths.split(",")]
        except UserError as e:
            parser.error(str(e))
    extra = [o for o in args.overrides if _key(o) != "seed"]

    try:
        if args.finished:  # a listing: no data needed
            validate.check_group_choice("experiment", args.preset)
            out_dir = compose(args.preset, [o for o in extra if "," not in o]).out_dir
            print("\n".join(str(p) for p in finished_run_files(Path(out_dir))))
            return 0
        cfg = checked_config(args.preset, extra)
    except UserError as e:
        print(f"reference.py: error: {e}", file=sys.stderr)
        return 2
    failed = False
    status = normbench(f"experiment={args.preset}", *extra, "seed=0", "report_at_end=false")
    if status == 2:
        return 2  # bad input: said in one line by normbench
    failed |= status != 0

    slots = parallel_slots(cfg)

    def train(items: list[tuple[list[str], list[str]]]) -> bool:  # (arm, its lr and seeds) -> whether a launch failed
        return run_launches([[f"experiment={args.preset}", *launch, "report_at_end=false"] for launch in grouped(items)], slots)

    arms, grid = arms_and_grid(sweep_jobs(args.preset, extra))  # the overrides given here are in every arm
    arms = distinct_arms(args.preset, arms, grid)
    ratio = grid_ratio(grid)
    candidates = [list(grid) for _ in arms]
    picks = [chosen_lr(args.preset, arm, grid) for arm in arms]
    for _ in range(args.extend):  # a pick at the grid's edge: one more lr beyond it, for that arm
        beyond = [beyond_edge(pick, lrs, ratio) for pick, lrs in zip(picks, candidates)]
        if not any(beyond):
            break
        for lrs, lr in zip(candidates, beyond):
            lrs += [lr] if lr else []
        failed |= train([(arm, [f"lr={lr}", "seed=0"]) for arm, lr in zip(arms, beyond) if lr])
        picks = [chosen_lr(args.preset, arm, lrs) for arm, lrs in zip(arms, candidates)]
    for arm, pick in zip(arms, picks):
        if pick is None:
            print(f"skipping {' '.join(arm)}: none of its lr candidates finished", file=sys.stderr)
            failed = True
    more_seeds = ",".join(str(s) for s in range(1, args.seeds))
    if more_seeds:
        failed |= train([(arm, [f"lr={pick}", f"seed={more_seeds}"]) for arm, pick in zip(arms, picks) if pick])
    every_seed = ",".join(str(s) for s in range(args.seeds))
    if args.lengths is not None:  # the longer lengths at the picks, every seed
        epochs = ",".join(str(e) for e in lengths)
        failed |= train([(arm, [f"lr={pick}", f"epochs={epochs}", f"seed={every_seed}"])
                         for arm, pick in zip(arms, picks) if pick])
    if args.equal_steps:  # the arms with fewer steps, again at the most steps any arm took
        steps = [steps_taken(run_dir(args.preset, arm, pick)) if pick else None for arm, pick in zip(arms, picks)]
        most = max((n for n in steps if n is not None), default=None)
        failed |= train([(arm, [f"lr={pick}", "budget.unit=steps", f"budget.length={most}", f"seed={every_seed}"])
                         for arm, pick, n in zip(arms, picks, steps) if n is not None and n < most])

    from normbench.report import write_sweep_report

    write_sweep_report(cfg.out_dir, cfg, select_best="lr")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
