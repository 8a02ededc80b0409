"""Everything a run writes about itself, in one place: TensorBoard scalars, hparams and dashboard
layout, metrics.csv (one row per epoch) and summary.json (written last: the completion marker).

Only the process with rank 0 writes (`enabled=False` elsewhere), so a data-parallel run
logs once. TensorBoard gets one event file per run (no add_hparams / add_scalars: they make sub-runs).

What TensorBoard opens on (issue 27): the CUSTOM SCALARS tab's first category (`LAYOUT`) holds test
accuracy, training loss and the three errors; the HPARAMS tab shows the compared settings
(`COMPARED_HPARAMS`) as its first columns; the main tags (train/, test/, val/, gap/, summary/) come
first in the scalar dashboards and every diagnostic tag is under `DIAGNOSTIC_PREFIX`, which sorts after
them. A diagnostic is a curve or absent: step-based scalars are logged often enough for
`STEP_CURVE_POINTS` points per run (`curve_every`), per-epoch ones only in runs of `MIN_CURVE_POINTS` epochs.
"""

from __future__ import annotations

import csv
import io
import math
import re
import time
from pathlib import Path

from normbench import atomic, summary as run_summary
from normbench.distributed import rank

# The names of what a run measures, written here once (the trainer writes them, the report reads
# them; committed results/ hold them, so a rename is a format change).

# metrics.csv, one row per completed epoch: its columns, in order.
METRIC_COLUMNS = ["epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc", "val_loss", "val_acc",
                  "lr", "seconds", *run_summary.GAP_FIELDS]
# The epoch's metrics that TensorBoard shows too: column -> tag (gap_test_ema_acc -> gap/test_ema_acc).
EPOCH_TAGS = {"train_loss": "train/loss_epoch", "train_acc": "train/acc", "test_loss": "test/loss",
              "test_acc": "test/acc", "val_loss": "val/loss", "val_acc": "val/acc",
              **{column: column.replace("gap_", "gap/", 1) for column in run_summary.GAP_FIELDS}}
# The three errors' accuracies (summary.GAP_FIELDS (1) to (3)): gap/train_batchstats_acc,
# gap/test_batchstats_acc, gap/test_popstats_acc.
THREE_ERROR_TAGS = tuple(EPOCH_TAGS[column] for column in run_summary.GAP_FIELDS[:3])
# The summary's fields that are the last epoch's values (test_acc, train_loss, ..., the gap's).
LAST_EPOCH_FIELDS = tuple(column for column in METRIC_COLUMNS if column in run_summary.RESULT_FIELDS)
# Scalars logged as the run goes, against training images seen.
TRAIN_LOSS_TAG = "train/loss"  # the mean over the steps since its last point
BEST_TEST_ACC_TAG = "summary/best_test_acc"  # once, at the end of a run that did not diverge
# Diagnostics: how the run went rather than what it found. Their prefix sorts after every main tag
# (asciibetically, naturally and by locale: "zz"), so the dashboards open on the main ones.
DIAGNOSTIC_PREFIX = "zz_diagnostics/"


def diagnostic_tag(name: str) -> str:
    """The TensorBoard tag of a diagnostic (lr -> zz_diagnostics/lr; also the norms' schedules, brn/r_max)."""
    return DIAGNOSTIC_PREFIX + name


LR_TAG = diagnostic_tag("lr")  # with train/loss
# A BN layer's train/eval statistics gap, every stat_gap_every steps.
BN_GAP_TAGS = (diagnostic_tag("bn_gap/mean/{layer}"), diagnostic_tag("bn_gap/logvar/{layer}"))
IMAGES_PER_S_TAG = diagnostic_tag("perf/images_per_s")  # per epoch
SECONDS_PER_EPOCH_TAG = diagnostic_tag("perf/seconds_per_epoch")
# Scalars shown as metrics in TensorBoard's HPARAMS tab (their last value per run), with their column names.
HPARAM_METRICS = [EPOCH_TAGS["test_acc"], EPOCH_TAGS["test_loss"], TRAIN_LOSS_TAG, EPOCH_TAGS["train_acc"],
                  BEST_TEST_ACC_TAG]
METRIC_NAMES = dict(zip(HPARAM_METRICS, ["test accuracy (%)", "test loss", "training loss", "training accuracy (%)",
                                         "best test accuracy (%)"]))

# How often: a step-based scalar (train/loss with lr and the norms' schedules every log_every steps,
# the BN gaps every stat_gap_every) gets at least STEP_CURVE_POINTS points in a run long enough, or
# none; a per-epoch diagnostic (perf/*) goes to TensorBoard only in runs of at least MIN_CURVE_POINTS
# epochs (summary.json and metrics.csv keep their values in every run).
STEP_CURVE_POINTS = 20
MIN_CURVE_POINTS = 10


def curve_every(every, total_steps: int) -> int:
    """Steps between the points of a scalar configured for every `every` steps in a run of `total_steps`:
    0 (none) where the run is shorter than `every` or `every` is 0 / None (scripts/bench.py's
    log_every=1000000: no logging), else `every` or less, for STEP_CURVE_POINTS points (`make run`'s
    log_every=100 and stat_gap_every=200 in a 250-step run: every 12 steps)."""
    every = int(every or 0)
    return max(1, min(every, total_steps // STEP_CURVE_POINTS)) if 0 < every <= total_steps else 0


# --------------------------------------------------------------------------- TensorBoard's HPARAMS tab

# The run's identity (identity.run_identity) as hyperparameters: name -> (column name, description).
HPARAMS = {
    "model": ("model", ""),
    "norm": ("norm", ""),
    "norm_label": ("norm, options", "the norm with its non-default options"),
    "placement": ("norm placement", "before or after the activation"),
    "batch_size": ("batch", "the SGD batch per device"),
    "virtual_batch": ("virtual batch", "the normalization batch of BN and BRN (norm.virtual_batch); None: the batch "
                                       "itself, or a batch-independent norm"),
    "devices": ("devices", ""),
    "lr": ("base lr", "at optim.ref_batch"),
    "lr_effective": ("effective lr", "the base lr scaled with the global batch"),
    "seed": ("seed", ""),
    "epochs": ("epochs", ""),
}
# Marked `differs`: the HPARAMS tab puts the columns so marked first and shows the first five only (the
# others are a click away), so these five.
COMPARED_HPARAMS = ("model", "norm", "batch_size", "virtual_batch", "seed")
# Logged as numbers (an interval filter); every other hparam as text: TensorBoard prints every number
# with five digits (a batch of 32 as "32.000"), "32" only as text.
NUMBER_HPARAMS = ("lr", "lr_effective")
# The discrete domains: the same in every run (TensorBoard takes one run's declaration for all), the
# registries' names, the usual batch sizes and seeds, plus the run's own value if it is not there.
BATCH_GRID = tuple(2 ** k for k in range(9))  # 1 .. 256


def hparam_domains() -> dict[str, list[str]]:
    """The discrete hparams' domains, as text."""
    from normbench import identity, models, norms

    grids = {"model": models.MODELS, "norm": norms.NORMS, "placement": identity.PLACEMENTS, "batch_size": BATCH_GRID,
             "virtual_batch": [None, *BATCH_GRID[:8]], "devices": (1, 2, 4, 8), "seed": range(5)}
    return {name: [str(value) for value in grid] for name, grid in grids.items()}


def hparam_value(name: str, value) -> float | str:
    """A setting as the HPARAMS tab holds it: a number (NUMBER_HPARAMS) or text (integers as "32", None as "None")."""
    return float(value) if name in NUMBER_HPARAMS else str(value)


def _hparams_summary(tag: str, **plugin_data):
    """A summary of the hparams plugin (as its summary_v2 writes them, without TensorFlow)."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    data = plugin_data_pb2.HParamsPluginData(**plugin_data)
    return Summary(value=[Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(data),
                                        tensor=metadata.NULL_TENSOR)])


def hparams_summaries(run_identity: dict) -> list:
    """The HPARAMS tab's experiment (its columns: names, types, domains; its metrics) and this run's values."""
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    values = {name: hparam_value(name, run_identity[name]) for name in HPARAMS}
    domains = hparam_domains()
    start = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    infos = []
    for name, (display_name, description) in HPARAMS.items():
        number = name in NUMBER_HPARAMS
        setattr(start.hparams[name], "number_value" if number else "string_value", values[name])
        info = api_pb2.HParamInfo(name=name, display_name=display_name, description=description,
                                  type=api_pb2.DATA_TYPE_FLOAT64 if number else api_pb2.DATA_TYPE_STRING,
                                  differs=name in COMPARED_HPARAMS)
        if name in domains:
            domain = domains[name] if values[name] in domains[name] else [*domains[name], values[name]]
            info.domain_discrete.extend(domain)
        infos.append(info)
    metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), display_name=METRIC_NAMES[tag])
               for tag in HPARAM_METRICS]
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics)
    return [_hparams_summary(metadata.EXPERIMENT_TAG, experiment=experiment),
            _hparams_summary(metadata.SESSION_START_INFO_TAG, session_start_info=start)]


def session_end_summary(status: str):
    """The HPARAMS tab's status of the run: success for a completed run, failure for a diverged one."""
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    end = plugin_data_pb2.SessionEndInfo(end_time_secs=time.time(), status=api_pb2.STATUS_SUCCESS
                                         if status == run_summary.COMPLETED else api_pb2.STATUS_FAILURE)
    return _hparams_summary(metadata.SESSION_END_INFO_TAG, session_end_info=end)


# --------------------------------------------------------------------------- TensorBoard's CUSTOM SCALARS tab


def _exactly(*tags: str) -> list[str]:
    """Chart tags are regular expressions: these tags exactly."""
    return [f"^{re.escape(tag)}$" for tag in tags]


def _starting(prefix: str) -> list[str]:
    """The tags that start with prefix."""
    return [f"^{re.escape(prefix)}"]


# (category, closed, [(chart, tag regexes)]): the same in every run (TensorBoard merges the runs' layouts).
# Each chart draws every selected run, a line per run and tag.
LAYOUT = [
    ("normbench: test accuracy, training loss, the three errors", False, [
        ("test accuracy (%)", _exactly(EPOCH_TAGS["test_acc"])),
        ("training loss (mean since the last point)", _exactly(TRAIN_LOSS_TAG)),
        ("the three errors, as accuracy (%): (1) train, mini-batch statistics (2) test, mini-batch statistics "
         "(3) test, population statistics", _exactly(*THREE_ERROR_TAGS)),
    ]),
    ("more metrics", True, [
        ("test loss", _exactly(EPOCH_TAGS["test_loss"])),
        ("training accuracy (%), epoch", _exactly(EPOCH_TAGS["train_acc"])),
        ("training loss, epoch mean", _exactly(EPOCH_TAGS["train_loss"])),
        ("validation accuracy (%)", _exactly(EPOCH_TAGS["val_acc"])),
        ("test accuracy (%), running estimates and PreciseBN",
         _exactly(*(EPOCH_TAGS[column] for column in run_summary.GAP_FIELDS[3:]))),
    ]),
    ("diagnostics", True, [
        ("learning rate", _exactly(LR_TAG)),
        ("BN statistics gap: mean", _starting(BN_GAP_TAGS[0].format(layer=""))),
        ("BN statistics gap: log variance", _starting(BN_GAP_TAGS[1].format(layer=""))),
        ("Batch Renorm limits", _starting(diagnostic_tag("brn/"))),
        ("images per second", _exactly(IMAGES_PER_S_TAG)),
        ("seconds per epoch (training)", _exactly(SECONDS_PER_EPOCH_TAG)),
    ]),
]


def layout_summary():
    """The CUSTOM SCALARS layout (LAYOUT) as a summary, the way torch's add_custom_scalars writes one."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    layout = layout_pb2.Layout(category=[
        layout_pb2.Category(title=title, closed=closed, chart=[
            layout_pb2.Chart(title=chart, multiline=layout_pb2.MultilineChartContent(tag=tags)) for chart, tags in charts])
        for title, closed, charts in LAYOUT])
    tensor = TensorProto(dtype="DT_STRING", string_val=[layout.SerializeToString()], tensor_shape=TensorShapeProto())
    return Summary(value=[Summary.Value(tag=metadata.CONFIG_SUMMARY_TAG, tensor=tensor,
                                        metadata=metadata.create_summary_metadata())])


# --------------------------------------------------------------------------- the recorder


class RunRecorder:
    def __init__(self, run_dir: str | Path, *, purge_step: int | None = None, enabled: bool | None = None,
                 epochs: int | None = None):
        self.run_dir = Path(run_dir)
        self.enabled = rank() == 0 if enabled is None else enabled
        # Whether the per-epoch diagnostics make curves (MIN_CURVE_POINTS epochs); unknown length: they do.
        self.epoch_curves = epochs is None or epochs >= MIN_CURVE_POINTS
        self.rows: list[dict] = []
        self.writer = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed predecessor wrote past the checkpoint we resume from.
            self.writer = SummaryWriter(str(self.run_dir), purge_step=purge_step)

    def scalar(self, tag: str, value, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, float(value), step)

    def dashboards(self, run_identity: dict) -> None:
        """Once per run, into its own event file: the HPARAMS tab's columns and values and the CUSTOM
        SCALARS layout (a resumed attempt keeps the first attempt's: purge_step drops later steps only)."""
        if self.writer is None:
            return
        for summary in [*hparams_summaries(run_identity), layout_summary()]:
            self.writer.file_writer.add_summary(summary)
        self.flush()  # on disk before any checkpoint a resumed attempt could start from

    def epoch_scalars(self, row: dict, step: int) -> None:
        """The TensorBoard scalars of one epoch's row (EPOCH_TAGS), those it has a value for (a gap
        accuracy also needs a finite one: NaN where no complete group of images was left)."""
        for column, tag in EPOCH_TAGS.items():
            value = row[column]
            if value is not None and (column not in run_summary.GAP_FIELDS or math.isfinite(value)):
                self.scalar(tag, value, step)

    def epoch_diagnostics(self, values: dict[str, float], step: int) -> None:
        """Per-epoch diagnostics (tag -> value), in a run with enough epochs to draw them (epoch_curves)."""
        if self.epoch_curves:
            for tag, value in values.items():
                self.scalar(tag, value, step)

    def epoch_row(self, row: dict) -> None:
        """Append one epoch's metrics (a value for every column of METRIC_COLUMNS, None where the epoch
        has none) and rewrite metrics.csv atomically."""
        if set(row) != set(METRIC_COLUMNS):
            odd = sorted(set(row) ^ set(METRIC_COLUMNS))
            raise ValueError(f"an epoch row has the columns of METRIC_COLUMNS: {odd} are extra or missing")
        self.rows.append({k: row[k] for k in METRIC_COLUMNS})
        if not self.enabled:
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, METRIC_COLUMNS)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic.write_text(self.run_dir / "metrics.csv", buf.getvalue())
        self.flush()

    def summary(self, summary: dict) -> None:
        """The run's end: its status in the HPARAMS tab, then summary.json."""
        if self.enabled:
            if self.writer is not None:
                self.writer.file_writer.add_summary(session_end_summary(summary["status"]))
            self.flush()
            run_summary.write(self.run_dir, summary)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
