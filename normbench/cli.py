"""The `normbench` command: Hydra composes the config, `run_job` runs (or skips, or resumes) one run.

A run never raises out of `run_job` in a sweep: crashes are recorded in the run's summary.json
and the sweep goes on; the sweep callback prints what failed at the end. A data-parallel run
(torchrun, SLURM, submitit: `distributed`) calls `run_job` on every rank; rank 0 decides and
writes, and a crash on any rank ends the job with a recorded failure.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from normbench import atomic, budget, distributed, identity, summary, validate
from normbench.errors import UserError

# Before Hydra resolves a job's folder (its name carries the device count): a submitit task imports
# this module when it unpickles its job, before it starts it.
distributed.adopt_cluster_env()


# --------------------------------------------------------------------------- one run


@contextmanager
def claim(run_dir: Path):
    """Hold an exclusive lock on the run folder while training it; yields False if a live process has it.

    flock is released by the kernel when its holder dies, so a killed run never leaves a stale claim."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield True
    finally:
        os.close(fd)


@contextmanager
def claim_for_every_rank(run_dir: Path):
    """`claim` by rank 0 for the whole data-parallel run, every rank following its answer (a claim
    per rank would make the ranks above 0 skip the run that rank 0 holds)."""
    if not distributed.is_main():
        yield distributed.broadcast(None)
        return
    with claim(run_dir) as claimed:
        yield distributed.broadcast(claimed)


def _show_progress(cfg: DictConfig) -> bool:
    if cfg.progress == "auto":
        return sys.stderr.isatty() and not os.environ.get("CI")
    return bool(cfg.progress)


def _auto_threads(cfg: DictConfig) -> None:
    """Parallel jobs on one machine share its cores: jobs x threads <= cores."""
    if cfg.threads is None:
        n_jobs = OmegaConf.select(HydraConfig.get(), "launcher.n_jobs")
        if n_jobs and n_jobs > 0:
            cfg.threads = max(1, len(os.sched_getaffinity(0)) // int(n_jobs))


def _registry_dir() -> Path:
    """Where training normbench processes of this user on this machine register (one file each)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or os.environ.get("TMPDIR") or "/tmp"
    return Path(base) / f"normbench-{os.getuid()}" / "training"


@contextmanager
def registered_as_training():
    """While inside, this process is listed as training on this machine: a file named by its pid under
    ``_registry_dir()``, flock-ed (the kernel drops the lock when the process dies, so a killed run is
    never counted). Yields the pids of the other normbench processes training now."""
    folder = _registry_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / f"{os.getpid()}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # no writable temp dir: nothing to compare with, nothing to warn about
        yield []
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        others = []
        for path in folder.glob("*.lock"):
            if path.stem == str(os.getpid()):
                continue
            try:
                other = os.open(path, os.O_RDWR)
            except OSError:
                continue
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # got it: its process is gone
                path.unlink(missing_ok=True)
            except BlockingIOError:
                others.append(int(path.stem) if path.stem.isdigit() else path.stem)
            finally:
                os.close(other)
        yield others
    finally:
        (folder / f"{os.getpid()}.lock").unlink(missing_ok=True)
        os.close(fd)


def warn_if_sharing_cores(cfg: DictConfig, others: list) -> None:
    """Two CPU runs that each take every core oversubscribe them, and each runs several times slower
    (a batch-2 run measured: 1.9 s with threads=1 beside another run, 13.7 s and 75 s with torch's
    default threads): say so when this run has not been given a thread count."""
    if not others or cfg.threads is not None or distributed.world_size() > 1:
        return
    import torch

    from normbench.device import resolve_device

    cores = len(os.sched_getaffinity(0))
    if resolve_device(cfg.device).type != "cpu" or torch.get_num_threads() * (len(others) + 1) <= cores:
        return  # e.g. OMP_NUM_THREADS=1 in every shell
    pids = ", ".join(map(str, sorted(others, key=str)))
    print(f"warning: another normbench process is training on this machine (pid {pids}) and threads is unset: "
          f"both use all {cores} cores and each runs several times slower; give each run "
          f"threads={max(1, cores // (len(others) + 1))}", file=sys.stderr)


def run_job(cfg: DictConfig) -> dict | None:
    """Validate, then skip / resume / start the run in Hydra's output dir. Returns its summary.

    In a data-parallel run every rank calls it: rank 0 claims the folder and decides whether the
    run is due, and the other ranks follow; bad input is the same on every rank (rank 0 records it)."""
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    in_sweep = hc.mode == RunMode.MULTIRUN
    attempt_start = time.time()
    main = distributed.is_main()
    try:
        validate.check_config(cfg)
        _auto_threads(cfg)
        distributed.init_process_group(cfg.dist_timeout_s)  # a no-op in a single process
        with claim_for_every_rank(run_dir) as claimed:
            if not claimed:
                if main:
                    print(f"skip {cfg.run_name}: another live process is training it")
                return None
            from normbench.train import train  # torch-heavy: imported once a run is really due

            finished = distributed.broadcast(_finished_summary(cfg, run_dir) if main else None)
            if finished:
                return finished
            with registered_as_training() as others:
                warn_if_sharing_cores(cfg, others)
                return train(cfg, run_dir, progress=_show_progress(cfg))
    except UserError as e:
        if not in_sweep:  # SystemExit passes through Hydra's error reporting untouched
            if cfg.debug:
                traceback.print_exc()
            if main:
                print(f"normbench: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        if not main:
            return None
        print(f"error in {cfg.run_name}: {e}", file=sys.stderr)
        return _record_failure(cfg, run_dir, f"invalid input: {e}")
    except Exception as e:  # noqa: BLE001 - one crashed run must not take down a sweep
        if cfg.debug:
            traceback.print_exc()
        data_parallel = distributed.world_size() > 1
        rank = distributed.rank()
        log = run_dir / (f"error.rank{rank}.log" if data_parallel else "error.log")
        try:
            atomic.write_text(log, traceback.format_exc())
        except OSError:  # the crash may be the disk itself
            log = "not written"
        who = f"rank {rank}: " if data_parallel else ""
        print(f"error: {cfg.run_name} crashed: {who}{type(e).__name__}: {e} (traceback: {log})", file=sys.stderr)
        result = _record_failure(cfg, run_dir, f"{who}{type(e).__name__}: {e}",
                                 first_since=attempt_start if data_parallel else None)
        # A data-parallel job ends when a rank crashes: the other ranks cannot go on in step with it
        # (torchrun then stops them; a submitit task runs this one job only, its peers fail on the
        # broken connection or the process group's timeout).
        if not in_sweep or (data_parallel and not distributed.launched_by_submitit()):
            raise SystemExit(1)
        return result


def _finished_summary(cfg: DictConfig, run_dir: Path) -> dict | None:
    """The summary of this very run if it is finished already (then it is skipped), else None.
    The finished run's fingerprint is recomputed from what its summary records, so a run finished
    before an option existed is still this run when the option is at its default; one finished before
    run names held the training length is found in its folder of then (``identity.legacy_run_name``)."""
    previous = summary.read(run_dir)
    if not previous:
        legacy = _finished_in_legacy_folder(cfg, run_dir)
        if legacy:
            return legacy
    if not previous or previous["status"] not in summary.FINISHED:
        return None
    if identity.record_fingerprint(previous) == identity.fingerprint(identity.run_config(cfg)):
        print(f"skip {cfg.run_name}: already {previous['status']} (test acc {previous['test_acc']})")
        return previous
    print(f"warning: {run_dir} holds a finished run of a different configuration; training it again")
    return None


def _finished_in_legacy_folder(cfg: DictConfig, run_dir: Path) -> dict | None:
    """This run, finished in the folder it had before run names held the training length, if it is there;
    then the folder made for it now, which holds only what Hydra and the claim put in it, goes."""
    legacy_dir = Path(cfg.out_dir) / identity.legacy_run_name(cfg)
    if legacy_dir == run_dir or budget.unit(cfg) != "epochs":
        return None
    previous = summary.read(legacy_dir)
    if not previous or previous["status"] not in summary.FINISHED:
        return None
    if identity.record_fingerprint(previous) != identity.fingerprint(identity.run_config(cfg)):
        return None
    print(f"skip {cfg.run_name}: already {previous['status']} in {legacy_dir} (test acc {previous['test_acc']})")
    if {p.name for p in run_dir.iterdir()} <= {".hydra", ".lock"}:
        shutil.rmtree(run_dir, ignore_errors=True)
    return previous


def _record_failure(cfg: DictConfig, run_dir: Path, reason: str, first_since: float | None = None) -> dict:
    """A failed run's summary: its identity, no metrics (the report counts it as failed).

    In a data-parallel run (`first_since`: when this rank's attempt began) the first rank to fail
    says why: a rank that fails after it, on the broken connection, keeps that record."""
    if first_since is not None:
        try:
            earlier = summary.read(run_dir) if (run_dir / summary.SUMMARY_NAME).stat().st_mtime >= first_since else None
        except OSError:
            earlier = None
        if earlier and earlier["status"] == summary.FAILED:
            return earlier
    record = summary.new(identity.run_identity(cfg), summary.FAILED, reason=reason, epochs_done=0,
                         config=identity.run_config(cfg))
    try:
        summary.write(run_dir, record)
    except OSError:
        pass
    return record


@hydra.main(version_base="1.3", config_path=str(validate.CONF_DIR), config_name="config")
def hydra_entry(cfg: DictConfig) -> dict | None:
    return run_job(cfg)


# --------------------------------------------------------------------------- the sweep


class SweepSummary(Callback):
    """At the end of a multirun: list failures, optionally write the report; exit 1 if a run crashed."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.started = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if not distributed.is_main():  # every rank of a sweep under torchrun ends here; rank 0 reports
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        started = getattr(self, "started", 0.0)
        failed, counts = [], {}
        for path in sorted(sweep_dir.rglob(summary.SUMMARY_NAME)):
            record = summary.read(path.parent)
            if not record or path.stat().st_mtime < started - 1:
                continue
            counts[record["status"]] = counts.get(record["status"], 0) + 1
            if record["status"] == summary.FAILED:
                failed.append(f"  {record['run_name']}: {record['reason']}")
        done = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        print(f"sweep finished in {sweep_dir}: " + (f"{done} in this sweep" if done else "nothing new to run (every run was already finished)"))
        if config.get("report_at_end"):
            from normbench import report

            try:
                report.write_sweep_report(sweep_dir, config, config.get("select_best"))
            except UserError as e:
                print(f"no report: {e}", file=sys.stderr)
        print(f"curves: tensorboard --logdir {sweep_dir}")
        if failed:
            print("failed runs:\n" + "\n".join(failed), file=sys.stderr)
            raise SystemExit(1)


# --------------------------------------------------------------------------- entry point


MULTIRUN_FLAGS = ("-m", "--multirun")
RUN_FLAGS = ("-r", "--run")


def check_command_line(argv: list[str]) -> None:
    """Check every run the command line asks for before Hydra starts one (and creates its folder):
    each bad input is then one line and exit status 2, not Hydra's multi-line error and exit 1."""
    if any(a.startswith("-") and a not in MULTIRUN_FLAGS + RUN_FLAGS for a in argv):
        return  # --help, --cfg, --info, --config-name, ...: Hydra's own business (not ours to second-guess)
    overrides = [a for a in argv if a not in MULTIRUN_FLAGS + RUN_FLAGS]
    validate.check_command_line(overrides, multirun=any(a in MULTIRUN_FLAGS for a in argv))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = any(a.lower() in ("debug=true", "debug=1") for a in argv)
    try:
        check_command_line(argv)
        sys.argv = [sys.argv[0], *argv]
        hydra_entry()
    except UserError as e:
        if debug:
            traceback.print_exc()
        if distributed.is_main():  # every rank of a data-parallel run finds the same bad input
            print(f"normbench: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
