"""summary.json, the one record of a finished run: its fields, its statuses, writing and reading.

The trainer writes it last (it marks the run finished), the command line writes the failure
variant, the sweep callback and ``normbench-report`` read it. Every summary has every field of
``FIELDS`` (None where a run has no value, e.g. a failed run's metrics).
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path

from normbench import atomic, budget, identity

SUMMARY_NAME = "summary.json"

COMPLETED, DIVERGED, FAILED = "completed", "diverged", "failed"
STATUSES = (COMPLETED, DIVERGED, FAILED)
# A run with one of these is done: rerunning the same config would give the same result
# (divergence is a result too). A failed run is tried again.
FINISHED = (COMPLETED, DIVERGED)

# Which run this is (identity.run_identity); the report keys its rows on these.
IDENTITY_FIELDS = ("run_name", "model", "norm", "norm_label", "placement", "batch_size", "devices", "virtual_batch",
                   "norm_batch", "lr", "lr_effective", "seed", "epochs", "budget")
# Training vs inference statistics at the last evaluation (accuracy, %): (1) the training slice with
# mini-batch statistics, (2) the test set with mini-batch statistics, (3) the test set with population
# statistics (the run's eval_stats; batch: the running estimates), and the test set with the running
# estimates (ema) and PreciseBN's statistics (precise) where measured. Batch-independent norms: (2) = (3).
GAP_FIELDS = ("gap_train_batchstats_acc", "gap_test_batchstats_acc", "gap_test_popstats_acc", "gap_test_ema_acc",
              "gap_test_precise_acc")
# What happened (None where the run has no value).
RESULT_FIELDS = ("status", "reason", "epochs_done", "steps_done", "test_acc", "best_test_acc", "test_loss",
                 "train_loss", "train_acc", "val_acc", "best_val_acc", "wall_time_s", "seconds_per_epoch",
                 "images_per_s", "diverged_step", "train_size", "test_size", "val_size", "device", "fingerprint",
                 "results_version", "finished_at", "config", *GAP_FIELDS)
FIELDS = IDENTITY_FIELDS + RESULT_FIELDS
# Without these a summary cannot be placed in a table.
REQUIRED_FIELDS = ("status", "model", "norm", "batch_size", "norm_batch", "lr", "seed", "test_acc")
# The numeric fields by the kind of their values (the report's column types): floats and integers.
FLOAT_FIELDS = ("lr", "lr_effective", "test_acc", "best_test_acc", "test_loss", "train_loss", "train_acc", "val_acc",
                "best_val_acc", "wall_time_s", "seconds_per_epoch", "images_per_s", *GAP_FIELDS)
INTEGER_FIELDS = ("batch_size", "devices", "virtual_batch", "norm_batch", "seed", "epochs", "epochs_done", "steps_done",
                  "diverged_step", "train_size", "test_size", "val_size")


class BadSummary(Exception):
    """A summary.json that cannot be used; the one-line message says why."""


def new(run_identity: dict, status: str, **fields) -> dict:
    """A complete summary: every field of FIELDS, from the run's identity and the given results."""
    if status not in STATUSES:
        raise ValueError(f"unknown status {status!r}")
    unknown = set(fields) - set(RESULT_FIELDS)
    if unknown:
        raise ValueError(f"not summary fields: {sorted(unknown)}")
    record = {key: None for key in FIELDS}
    record.update(run_identity)
    record.update(fields, status=status)
    record["results_version"] = identity.RESULTS_VERSION
    if record["finished_at"] is None:
        record["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return record


def write(run_dir: str | Path, summary: dict) -> None:
    atomic.write_json(Path(run_dir) / SUMMARY_NAME, summary)


def read(run_dir: str | Path) -> dict | None:
    """The run's summary, or None if it has none that can be used (missing, unreadable or malformed)."""
    try:
        return load(run_dir)
    except BadSummary:
        return None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load(run_dir: str | Path) -> dict:
    """The run's summary with every field present; raises BadSummary (one line) if it cannot be used."""
    try:
        summary = json.loads((Path(run_dir) / SUMMARY_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadSummary("no summary.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadSummary(f"unreadable summary.json ({e})") from None
    if not isinstance(summary, dict):
        raise BadSummary("summary.json is not a JSON object")
    missing = [key for key in REQUIRED_FIELDS if key not in summary]
    if missing:
        raise BadSummary(f"summary.json lacks {', '.join(missing)}")
    status = summary["status"]
    if status not in STATUSES:
        raise BadSummary(f"unknown status {status!r}")
    for key in ("batch_size", "seed", "lr"):
        if not _is_number(summary[key]):
            raise BadSummary(f"{key} is not a number: {summary[key]!r}")
    for key in ("norm_batch", "virtual_batch", "lr_effective", "devices"):
        if summary.get(key) is not None and not _is_number(summary[key]):
            raise BadSummary(f"{key} is neither a number nor null: {summary[key]!r}")
    for key in ("model", "norm"):
        if not isinstance(summary[key], str) or not summary[key]:
            raise BadSummary(f"{key} is not a name: {summary[key]!r}")
    if not isinstance(summary.get("placement"), (str, type(None))):
        raise BadSummary(f"placement is not a string: {summary['placement']!r}")
    if status == COMPLETED and not _is_number(summary["test_acc"]):
        raise BadSummary("completed run without a numeric test_acc")
    record = {key: None for key in FIELDS}
    record.update(summary)
    # Summaries written before these fields existed.
    record["placement"] = record["placement"] or identity.PLACEMENTS[0]
    record["results_version"] = record["results_version"] or identity.FIRST_RECORDED_VERSION
    record["devices"] = record["devices"] or 1
    record["norm_label"] = record["norm_label"] or record["norm"]
    if record["budget"] is None and isinstance(record["epochs"], int):
        record["budget"] = budget.label("epochs", None, record["epochs"])
    return record
