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

METRIC_COLUMNS = ["epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc", "val_loss", "val_acc",
                  "lr", "seconds", *run_summary.GAP_FIELDS]
# Scalars shown as metrics in TensorBoard's HPARAMS tab (their last value per run).
HPARAM_METRICS = ["test/acc", "test/loss", "train/loss", "train/acc", "summary/best_test_acc"]


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

    def epoch_row(self, row: dict) -> None:
        """Append one epoch's metrics and rewrite metrics.csv atomically."""
        self.rows.append({k: row.get(k) for k in METRIC_COLUMNS})
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

