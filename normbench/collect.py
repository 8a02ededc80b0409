"""Collect run folders for the report: one row per run, its experiment setting, its curves.

A run's *setting* is everything that determines its result except the seed: the semantic part of
its resolved config (``identity.semantic_config``) plus its ``variant`` label, flattened to dotted
keys (``data.subset``). Runs are comparable (seeds of one table row, points of one line) only when
their settings agree; a setting that differs between runs of one report becomes a table column
(``setting_columns``), so no two experiments are silently mixed.
"""

from __future__ import annotations

import json
import numbers
import os
import sys
from pathlib import Path
from typing import Iterable

import pandas as pd

from normbench import budget, identity, summary

PROG = "normbench-report"

# A summary that does not record its config (a failed run's, an old one's) has these settings
# unknown; they show as "?" and never merge with a known value.
UNKNOWN = "?"

# Columns of the runs frame: where the run is, its summary fields (the config only as `setting`).
RUN_COLUMNS = ["path", *(field for field in summary.FIELDS if field != "config"), "setting",
               "target_acc"]  # the config's target_acc (a preset's "images to X%"), not a setting
NUMERIC_COLUMNS = list(summary.FLOAT_FIELDS)
INTEGER_COLUMNS = list(summary.INTEGER_FIELDS)
# The columns of metrics.csv (tracking.METRIC_COLUMNS) the curves need.
REQUIRED_METRICS_COLUMNS = ("epoch", "test_acc", "train_loss")

# Settings the table shows through its own columns: model, placement, norm label, batch, devices,
# virtual batch, lr. Options under model./norm. are shown by these too when they follow from
# them (gn's groups are in its label gn-groups16); otherwise they become columns of their own.
AXIS_SETTINGS = {"model.name", "model.placement", "norm.name", "norm.virtual_batch", "batch_size", "lr",
                 "devices"}
LABELLED_PREFIXES = ("model.", "norm.")
# Resolved per norm (memory_format=auto: NormInfo.memory_format): a column only where it varies within a norm.
PER_NORM_SETTINGS = ("memory_format",)
# Settings of batch-dependent norms only: a batch-independent norm's config records them as null
# (identity.run_config), which matches every value (its run is the reference for each of them).
BATCH_STAT_SETTINGS = set(identity.BATCH_STAT_KEYS)
# Without a config, these settings are known from the summary's identity fields.
IDENTITY_SETTINGS = {"model.name": "model", "model.placement": "placement", "batch_size": "batch_size",
                     "lr": "lr", "devices": "devices", "norm.virtual_batch": "virtual_batch", "epochs": "epochs"}
# Which of two copies of one run to keep: the one with a result.
STATUS_PREFERENCE = (summary.COMPLETED, summary.DIVERGED, summary.FAILED)


class CorruptRun(Exception):
    """A run folder that cannot be used; the message says why."""


def warn(message: str) -> None:
    one_line = " ".join(str(message).split())
    print(f"{PROG}: warning: {one_line}", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Finding and reading run folders
# --------------------------------------------------------------------------------------------

def find_run_dirs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Every directory holding summary.json under `paths` (a path may itself be a run folder
    or a summary.json file). Run folders are not searched further. Sorted, no duplicates."""
    found: dict[str, Path] = {}
    for root in map(Path, paths):
        if root.is_file() and root.name == summary.SUMMARY_NAME:
            found.setdefault(os.path.realpath(root.parent), root.parent)
            continue
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            if summary.SUMMARY_NAME in filenames:
                found.setdefault(os.path.realpath(dirpath), Path(dirpath))
                dirnames.clear()
    return sorted(found.values())


def read_metrics(run_dir: str | os.PathLike) -> pd.DataFrame:
    """The per-epoch metrics.csv of a run (numeric columns); raises CorruptRun if unusable."""
    metrics_path = Path(run_dir) / "metrics.csv"
    try:
        metrics = pd.read_csv(metrics_path)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:  # ParserError, EmptyDataError, UnicodeDecodeError
        raise CorruptRun(f"unreadable metrics.csv ({e})") from None
    missing = [column for column in REQUIRED_METRICS_COLUMNS if column not in metrics.columns]
    if missing:
        raise CorruptRun(f"metrics.csv lacks column(s) {', '.join(missing)}")
    for column in metrics.columns:
        metrics[column] = pd.to_numeric(metrics[column], errors="coerce")
    if metrics["epoch"].isna().any():
        raise CorruptRun("metrics.csv has a non-numeric epoch")
    return metrics


def _check_metrics(run_dir: Path, status: str) -> None:
    """Completed runs need a metrics.csv with at least one epoch; failed ones may lack it."""
    try:
        metrics = read_metrics(run_dir)
    except FileNotFoundError:
        if status == summary.COMPLETED:
            raise CorruptRun("completed run without metrics.csv") from None
        return
    if status == summary.COMPLETED and metrics.empty:
        raise CorruptRun("completed run with an empty metrics.csv")


# --------------------------------------------------------------------------------------------
# Settings: what makes two runs comparable
# --------------------------------------------------------------------------------------------

def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, (list, tuple)):
            flat[f"{prefix}{key}"] = json.dumps(value, default=str)  # hashable, comparable
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def recorded_setting(record: dict) -> dict | None:
    """The run's setting from its recorded config, or None if the summary has no config."""
    config = record.get("config")
    if not isinstance(config, dict):
        return None
    setting = _flatten(identity.semantic_config(config, record.get("device")))
    setting.pop("seed", None)
    # Runs of different results versions are different experiments (the code changed what they compute).
    setting["results_version"] = record["results_version"]
    # `variant` is a label, not part of semantic_config, but it is what separates experiments
    # that the run name alone would not.
    setting["variant"] = config.get("variant")
    setting.update(_identity_setting(record))
    return setting


def _identity_setting(record: dict) -> dict:
    """The settings every summary records in its identity fields (they key the table's rows)."""
    setting = {key: record[field] for key, field in IDENTITY_SETTINGS.items()}
    setting["norm.label"] = record["norm_label"]
    return setting


def _identity_key(record: dict) -> str:
    return _setting_id(_identity_setting(record))


def _settings(records: list[dict]) -> list[dict]:
    """Each run's setting. A summary without a config takes the setting of the recorded runs
    with the same identity when there is exactly one such setting (a failed seed of a sweep);
    otherwise only its identity fields are known."""
    recorded = [recorded_setting(record) for record in records]
    by_identity: dict[tuple, dict[str, dict]] = {}
    for record, setting in zip(records, recorded):
        if setting is not None:
            by_identity.setdefault(_identity_key(record), {})[_setting_id(setting)] = setting
    settings = []
    for record, setting in zip(records, recorded):
        if setting is None:
            candidates = by_identity.get(_identity_key(record), {})
            if len(candidates) == 1:
                setting = dict(next(iter(candidates.values())))
            else:
                setting = {**_identity_setting(record), "config": UNKNOWN}
        settings.append(setting)
    return settings


def _setting_id(setting: dict) -> str:
    return json.dumps(setting, sort_keys=True, default=str)


def setting_columns(runs: pd.DataFrame) -> list[str]:
    """The settings that differ between the runs (besides the table's own axes), in a stable
    order: these must be table columns, or rows from different experiments would look alike."""
    if runs.empty:
        return []
    settings = [json.loads(text) for text in runs["setting"]]
    all_keys = sorted({key for setting in settings for key in setting})
    columns = []
    for key in all_keys:
        if key in AXIS_SETTINGS or key in ("norm.label", "config"):
            continue
        # A run without a recorded config knows only its identity settings. A key missing from
        # a recorded config counts as null (a newer option, off in older runs).
        known = {json.dumps(setting.get(key), default=str) for setting in settings
                 if not (setting.get("config") == UNKNOWN and key not in setting)
                 and not (key in BATCH_STAT_SETTINGS and setting.get(key) is None)}
        if len(known) <= 1:
            continue
        if (key.startswith(LABELLED_PREFIXES) or key in PER_NORM_SETTINGS) and _follows_from_labels(runs, settings, key):
            continue
        columns.append(key)
    # Most readable first: epochs and data sizes, then the rest alphabetically, variant last.
    priority = {"epochs": 0, "data.subset": 1, "data.test_subset": 2, "data.val_split": 3}
    return sorted(columns, key=lambda key: (key == "variant", priority.get(key, 9), key))


def _follows_from_labels(runs: pd.DataFrame, settings: list[dict], key: str) -> bool:
    """Whether `key` has one value per model/placement/norm label (so those columns show it)."""
    seen: dict[tuple, str] = {}
    for label, setting in zip(zip(runs["model"], runs["placement"], runs["norm_label"]), settings):
        if setting.get("config") == UNKNOWN:
            continue
        value = json.dumps(setting.get(key), default=str)
        if seen.setdefault(label, value) != value:
            return False
    return True


def setting_value(setting_json: str, key: str):
    """One setting of a run for display: None where its config lacks the key, UNKNOWN where
    its summary recorded no config."""
    setting = json.loads(setting_json)
    if setting.get("config") == UNKNOWN and key not in setting:
        return UNKNOWN
    return setting.get(key)


# --------------------------------------------------------------------------------------------
# Collecting runs
# --------------------------------------------------------------------------------------------

def collect_runs(paths: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """One row per run under `paths`: the summary.json fields (summary.FIELDS but `config`),
    `path`, and `setting` (the run's setting as JSON). Unusable run folders are skipped with a
    one-line warning; of two copies of one run (same setting and seed) one is kept, with a
    warning naming both."""
    records, run_dirs = [], []
    for run_dir in find_run_dirs(paths):
        try:
            record = summary.load(run_dir)
            _check_metrics(run_dir, record["status"])
        except (summary.BadSummary, CorruptRun) as e:
            warn(f"skipping {run_dir}: {e}")
            continue
        records.append(record)
        run_dirs.append(run_dir)

    copies: dict[tuple, list[int]] = {}
    settings = _settings(records)
    for index, (record, setting) in enumerate(zip(records, settings)):
        copies.setdefault((_setting_id(setting), record["seed"]), []).append(index)
    kept = []
    for indices in copies.values():
        best = min(indices, key=lambda i: (STATUS_PREFERENCE.index(records[i]["status"]), i))
        for other in indices:
            if other != best:
                warn(f"skipping {run_dirs[other]}: same configuration and seed as {run_dirs[best]}")
        kept.append(best)

    rows = []
    for index in sorted(kept):
        row = {"path": str(run_dirs[index])}
        row.update({key: value for key, value in records[index].items() if key in RUN_COLUMNS})
        row["setting"] = _setting_id(settings[index])
        config = records[index].get("config")
        row["target_acc"] = config.get("target_acc") if isinstance(config, dict) else None
        rows.append(row)
    runs = pd.DataFrame(rows, columns=RUN_COLUMNS)
    return _normalize_run_dtypes(runs)


def recorded_target_acc(runs: pd.DataFrame) -> float | None:
    """The target accuracy (%) the runs' configs set (``target_acc``: a preset's "images to X%"), where every run
    that records one agrees; else None."""
    values = set(pd.to_numeric(runs["target_acc"], errors="coerce").dropna())
    return float(values.pop()) if len(values) == 1 else None


def _normalize_run_dtypes(runs: pd.DataFrame) -> pd.DataFrame:
    runs = runs.copy()
    for column in NUMERIC_COLUMNS:
        runs[column] = pd.to_numeric(runs[column], errors="coerce").astype(float)
    for column in INTEGER_COLUMNS:
        runs[column] = pd.to_numeric(runs[column], errors="coerce").round().astype("Int64")
    for column in ("model", "norm", "norm_label", "placement", "status"):
        runs[column] = runs[column].astype(str)
    return runs


def keyed_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs with the columns a table row is keyed on: `norm` is the norm label (gn-groups16),
    `lr_effective` falls back to `lr` for summaries that lack it, and every setting that differs
    between the runs (setting_columns) is a column."""
    keyed = runs.copy()
    keyed["norm"] = keyed["norm_label"]
    keyed["lr_effective"] = keyed["lr_effective"].fillna(keyed["lr"])
    keyed["devices"] = keyed["devices"].fillna(1)
    for key in setting_columns(runs):
        keyed[key] = [setting_value(text, key) for text in keyed["setting"]]
    return keyed


# --------------------------------------------------------------------------------------------
# Curves
# --------------------------------------------------------------------------------------------

def load_curves(runs: pd.DataFrame, key_columns: list[str]) -> pd.DataFrame:
    """Per-epoch metrics of the completed runs in long form, with the runs' `key_columns`
    (taken from keyed_runs) and seed attached."""
    keyed = keyed_runs(runs)
    frames = []
    for run in keyed[keyed["status"] == summary.COMPLETED].itertuples(index=False):
        try:
            metrics = read_metrics(run.path)
        except (CorruptRun, FileNotFoundError) as e:
            warn(f"no curves for {run.path}: {e}")
            continue
        # metrics.csv's `lr` is the scheduled lr of each epoch, not the run's base lr.
        metrics = metrics.rename(columns={"lr": "epoch_lr"})
        metrics = metrics.drop(columns=[c for c in (*key_columns, "seed") if c in metrics.columns])
        metrics["path"] = run.path
        frames.append(metrics)
    if not frames:
        return pd.DataFrame(columns=["path", *REQUIRED_METRICS_COLUMNS, *key_columns, "seed"])
    curves = pd.concat(frames, ignore_index=True)
    return curves.merge(keyed[["path", *key_columns, "seed"]], on="path", how="left")


def to_target(curves: pd.DataFrame, target_acc: float) -> pd.DataFrame:
    """Per run path, at its first evaluation with test_acc >= target_acc (NaN if never): the epoch, the
    optimizer steps taken (``step``; NaN in a metrics.csv without it) and the training seconds so far (the sum
    of its epochs' ``seconds``, evaluation not counted; NaN without them)."""
    curves = curves.sort_values(["path", "epoch"])
    seconds = curves["seconds"] if "seconds" in curves.columns else pd.Series(float("nan"), index=curves.index)
    steps = curves["step"] if "step" in curves.columns else pd.Series(float("nan"), index=curves.index)
    frame = pd.DataFrame({"path": curves["path"], "epoch": curves["epoch"].astype(float), "step": steps.astype(float),
                          "seconds": seconds.astype(float).groupby(curves["path"]).cumsum()})  # NaN stays NaN
    first = frame[curves["test_acc"] >= target_acc].groupby("path").first()
    all_paths = pd.Index(curves["path"].unique(), name="path")
    return first.reindex(all_paths)[["epoch", "step", "seconds"]].astype(float)


# --------------------------------------------------------------------------------------------
# Protocol: the line under every figure that says how the runs were trained
# --------------------------------------------------------------------------------------------

def _one_or_all(values: Iterable, fmt=str, joiner: str = " or ") -> str:
    """The distinct values, numbers in numeric order (2 or 4 or 16 epochs), then the rest by their text."""
    distinct = sorted({v for v in values if v is not None and not pd.isna(v)},
                      key=lambda v: (0, float(v), "") if isinstance(v, numbers.Real) else (1, 0.0, str(v)))
    if not distinct:
        return ""
    return joiner.join(fmt(v) for v in distinct)


def _lr_rule(setting: dict) -> str | None:
    scaling, ref_batch = setting.get("optim.lr_scaling"), setting.get("optim.ref_batch")
    if scaling is None or scaling == UNKNOWN:
        return None
    devices = setting.get("devices")
    batch = "global batch" if isinstance(devices, int) and devices > 1 else "batch"
    rule = identity.LR_SCALING.get(scaling)
    return rule.formula.format(batch=batch, ref_batch=ref_batch) if rule else f"lr scaling {scaling}"


def _schedule(setting: dict) -> str | None:
    name = setting.get("sched.name")
    if name is None or name == UNKNOWN:
        return None
    warmup = setting.get("sched.warmup_epochs")
    if not isinstance(warmup, (int, float)) or not warmup:
        return f"{name} schedule"
    return f"{name} schedule after {warmup:g} warmup epoch{'' if warmup == 1 else 's'}"


def _training_images(run) -> str | None:
    if not pd.isna(run.train_size):
        return f"{int(run.train_size)}"
    setting = json.loads(run.setting)
    subset = setting.get("data.subset")
    if subset == UNKNOWN or setting.get("config") == UNKNOWN:
        return None
    return "all" if subset is None else f"{subset}"


def describe_protocol(runs: pd.DataFrame) -> str:
    """One line: model, epochs, training images, lr rule, schedule, seeds of the runs.
    Where runs differ, the values are joined with "or" (the table/legend say which is which)."""
    if runs.empty:
        return "no runs"
    settings = [json.loads(text) for text in runs["setting"]]
    parts = [_one_or_all(runs["model"], joiner=", ")]
    epochs = _one_or_all(runs["epochs"], lambda e: f"{int(e)}")
    if epochs:
        parts.append(f"{epochs} epoch{'' if epochs == '1' else 's'}")
    budgets = _one_or_all(budget.describe(b) for b in runs["budget"] if isinstance(b, str) and not b.startswith("ep"))
    if budgets:  # steps or images budgets (budget.unit)
        parts.append(budgets)
    images = _one_or_all(_training_images(run) for run in runs.itertuples(index=False))
    if images:
        parts.append(f"{images} training images")
    val = _one_or_all(f"{int(v)}" for v in runs["val_size"].dropna() if v > 0)
    if val:  # data.val_split: held out of the full training set first, the training images drawn from the rest
        parts.append(f"{val} validation images held out of the training set before the training draw")
    test = _one_or_all(f"{int(v)}" for v in runs["test_size"].dropna())
    if test:
        parts.append(f"{test} test images")
    parts.append(_one_or_all((_lr_rule(s) for s in settings), joiner="; or ") or "lr rule not recorded")
    schedule = _one_or_all(_schedule(s) for s in settings)
    if schedule:
        parts.append(schedule)
    seeds = sorted({int(s) for s in runs["seed"].dropna()})
    parts.append(f"seed {seeds[0]}" if len(seeds) == 1 else f"{len(seeds)} seeds ({', '.join(map(str, seeds))})")
    return "; ".join(part for part in parts if part)
