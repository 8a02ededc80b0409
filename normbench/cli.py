"""The `normbench` command: Hydra composes the config, `run_job` runs (or skips, or resumes) one run.

A run never raises out of `run_job` in a sweep: crashes are recorded in the run's summary.json
and the sweep goes on; the sweep callback prints what failed at the end.
"""

from __future__ import annotations

import fcntl
import os
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

from normbench import atomic, checkpoint, validate
from normbench.errors import UserError
from normbench.tracking import SUMMARY_NAME, read_summary

FINISHED = ("completed", "diverged")  # divergence is a result: rerunning would diverge again


def run_name(model: DictConfig, norm: DictConfig, batch_size, lr, seed, variant=None) -> str:
    """A readable run directory from the run's identity, e.g. resnet20/bn/bs2/lr0.1/seed0.

    Norm options that differ from their defaults join the norm's part (gn-groups16); the
    virtual batch joins the batch part (bs128-vb8) for batch-dependent norms only, so the
    duplicates of a batch-independent norm in a virtual-batch sweep share one folder. `variant`
    (free text) separates runs that differ in anything else."""
    from normbench.train import norm_label, uses_batch_stats

    model_part = model.name if model.get("placement", "before") == "before" else f"{model.name}-norm{model.placement}"
    vb = norm.get("virtual_batch")
    vb_part = f"-vb{vb}" if vb is not None and uses_batch_stats(norm) else ""
    variant_part = f"/{variant}" if variant else ""
    return f"{model_part}/{norm_label(norm)}/bs{batch_size}{vb_part}/lr{lr:g}{variant_part}/seed{seed}"


OmegaConf.register_new_resolver("nb.run_name", run_name, replace=True)


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


def run_job(cfg: DictConfig) -> dict | None:
    """Validate, then skip / resume / start the run in Hydra's output dir. Returns its summary."""
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    in_sweep = hc.mode == RunMode.MULTIRUN
    try:
        validate.check_config(cfg)
        _auto_threads(cfg)
        with claim(run_dir) as claimed:
            if not claimed:
                print(f"skip {cfg.run_name}: another live process is training it")
                return None
            from normbench.train import run_config, train  # torch-heavy: imported once a run is really due

            fp = checkpoint.fingerprint(run_config(cfg))
            previous = read_summary(run_dir)
            if previous and previous.get("status") in FINISHED and previous.get("fingerprint") == fp:
                print(f"skip {cfg.run_name}: already {previous['status']} (test acc {previous.get('test_acc')})")
                return previous
            if previous and previous.get("status") in FINISHED:
                print(f"warning: {run_dir} holds a finished run of a different configuration; training it again")
            return train(cfg, run_dir, progress=_show_progress(cfg))
    except UserError as e:
        if not in_sweep:  # SystemExit passes through Hydra's error reporting untouched
            if cfg.debug:
                traceback.print_exc()
            print(f"normbench: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        print(f"error in {cfg.run_name}: {e}", file=sys.stderr)
        return _record_failure(cfg, run_dir, f"invalid input: {e}")
    except Exception as e:  # noqa: BLE001 - one crashed run must not take down a sweep
        if cfg.debug:
            traceback.print_exc()
        log = run_dir / "error.log"
        try:
            atomic.write_text(log, traceback.format_exc())
        except OSError:  # the crash may be the disk itself
            log = "not written"
        print(f"error: {cfg.run_name} crashed: {type(e).__name__}: {e} (traceback: {log})", file=sys.stderr)
        result = _record_failure(cfg, run_dir, f"{type(e).__name__}: {e}")
        if not in_sweep:
            raise SystemExit(1)
        return result


def _record_failure(cfg: DictConfig, run_dir: Path, reason: str) -> dict:
    """A failed run's summary: its identity, no metrics (the report counts it as failed)."""
    from datetime import datetime, timezone

    from normbench.train import run_identity

    summary = {**run_identity(cfg), "status": "failed", "reason": reason, "test_acc": None, "best_test_acc": None,
               "epochs_done": 0, "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        atomic.write_json(run_dir / SUMMARY_NAME, summary)
    except OSError:
        pass
    return summary


@hydra.main(version_base="1.3", config_path=str(validate.CONF_DIR), config_name="config")
def hydra_entry(cfg: DictConfig) -> dict | None:
    return run_job(cfg)


# --------------------------------------------------------------------------- the sweep


class SweepSummary(Callback):
    """At the end of a multirun: list failures, optionally write the report; exit 1 if a run crashed."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.started = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        started = getattr(self, "started", 0.0)
        failed, counts = [], {}
        for path in sorted(sweep_dir.rglob(SUMMARY_NAME)):
            summary = read_summary(path.parent)
            if not summary or path.stat().st_mtime < started - 1:
                continue
            counts[summary.get("status")] = counts.get(summary.get("status"), 0) + 1
            if summary.get("status") == "failed":
                failed.append(f"  {summary.get('run_name')}: {summary.get('reason')}")
        done = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        print(f"sweep finished in {sweep_dir}: " + (f"{done} in this sweep" if done else "nothing new to run (every run was already finished)"))
        if config.get("report_at_end"):
            from normbench import report

            try:
                written = report.write_report([str(sweep_dir)], sweep_dir / "report", target_acc=config.target_acc)
                print(written["table.md"].read_text())
                print(f"report: {', '.join(str(p) for p in written.values())}")
            except UserError as e:
                print(f"no report: {e}", file=sys.stderr)
        print(f"curves: tensorboard --logdir {sweep_dir}")
        if failed:
            print("failed runs:\n" + "\n".join(failed), file=sys.stderr)
            raise SystemExit(1)


# --------------------------------------------------------------------------- entry point


def check_composes(argv: list[str]) -> None:
    """Compose the config as Hydra will (first value of each sweep list), so that an unknown key or a
    malformed override is one line and exit 2 instead of Hydra's multi-line error and exit 1."""
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        return  # --help, --cfg, --config-name, ...: Hydra's own business
    overrides = []
    for arg in argv:
        if arg.startswith("-"):
            continue
        key, sep, value = arg.partition("=")
        if sep and not any(ch in value for ch in "()[]{}'\""):
            value = value.split(",")[0]
        overrides.append(f"{key}{sep}{value}")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(validate.CONF_DIR), version_base="1.3"):
            compose("config", overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise UserError(" ".join(lines[:2]) or type(e).__name__) from None
    finally:
        GlobalHydra.instance().clear()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = any(a.lower() in ("debug=true", "debug=1") for a in argv)
    try:
        validate.check_argv(argv)
        check_composes(argv)
        sys.argv = [sys.argv[0], *argv]
        hydra_entry()
    except UserError as e:
        if debug:
            traceback.print_exc()
        print(f"normbench: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
