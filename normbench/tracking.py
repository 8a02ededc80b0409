"""Everything a run writes about itself, in one place: TensorBoard scalars and hparams,
metrics.csv (one row per epoch) and summary.json (written last: the completion marker).

Only the process with rank 0 writes (`enabled=False` elsewhere), so a data-parallel run
logs once.
"""

from __future__ import annotations

import csv
import io
import math
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
# The summary's fields that are the last epoch's values (test_acc, train_loss, ..., the gap's).
LAST_EPOCH_FIELDS = tuple(column for column in METRIC_COLUMNS if column in run_summary.RESULT_FIELDS)
# Scalars logged as the run goes, against training images seen.
TRAIN_LOSS_TAG = "train/loss"  # the mean over the last log_every steps
LR_TAG = "lr"
BN_GAP_TAGS = ("bn_gap/mean/{layer}", "bn_gap/logvar/{layer}")  # a BN layer's train/eval statistics gap
IMAGES_PER_S_TAG, SECONDS_PER_EPOCH_TAG = "perf/images_per_s", "perf/seconds_per_epoch"
BEST_TEST_ACC_TAG = "summary/best_test_acc"  # once, at the end of a run that did not diverge
# Scalars shown as metrics in TensorBoard's HPARAMS tab (their last value per run).
HPARAM_METRICS = [EPOCH_TAGS["test_acc"], EPOCH_TAGS["test_loss"], TRAIN_LOSS_TAG, EPOCH_TAGS["train_acc"],
                  BEST_TEST_ACC_TAG]


class RunRecorder:
    def __init__(self, run_dir: str | Path, *, purge_step: int | None = None, enabled: bool | None = None):
        self.run_dir = Path(run_dir)
        self.enabled = rank() == 0 if enabled is None else enabled
        self.rows: list[dict] = []
        self.writer = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed predecessor wrote past the checkpoint we resume from.
            self.writer = SummaryWriter(str(self.run_dir), purge_step=purge_step)

    def scalar(self, tag: str, value, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, float(value), step)

    def hparams(self, hparams: dict) -> None:
        """Write the HPARAMS-tab summary into this run's own event file (add_hparams would make a sub-run)."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        for summary in hparams_summary(clean, {tag: math.nan for tag in HPARAM_METRICS}):
            self.writer.file_writer.add_summary(summary)

    def epoch_scalars(self, row: dict, step: int) -> None:
        """The TensorBoard scalars of one epoch's row (EPOCH_TAGS), those it has a value for (a gap
        accuracy also needs a finite one: NaN where no complete group of images was left)."""
        for column, tag in EPOCH_TAGS.items():
            value = row[column]
            if value is not None and (column not in run_summary.GAP_FIELDS or math.isfinite(value)):
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
        if self.enabled:
            self.flush()
            run_summary.write(self.run_dir, summary)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

