"""Turn a sweep of run folders into comparison tables and figures.

    normbench-report runs/ [--out DIR] [--target-acc ACC] [--select-best lr]

A run folder is any directory holding ``summary.json`` (and ``metrics.csv``), as written by
the trainer. Library use::

    runs = collect_runs(["runs/"])          # one row per run
    table = aggregate(runs)                 # one row per setting and base lr
    files = write_report(["runs/"], "runs/report")

The work is split: ``normbench.collect`` reads runs (and decides which are comparable),
``normbench.table`` aggregates and formats the table, ``normbench.figures`` draws the figures.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterable

import pandas as pd

from normbench import atomic, comparisons, identity, length, recovery
from normbench.collect import (  # noqa: F401  (the library interface of the report)
    PROG,
    CorruptRun,
    collect_runs,
    describe_protocol,
    find_run_dirs,
    load_curves,
    read_metrics,
    recorded_target_acc,
    setting_columns,
)
from normbench.errors import UserError
from normbench.figures import FIGURES
from normbench.table import (  # noqa: F401
    DEFAULT_TARGET_ACC,
    aggregate,
    format_table,
    row_keys,
    sort_table,
    table_notes,
    table_title,
    to_latex,
    to_markdown,
)

__all__ = [
    "Report", "load_report", "write_report", "main", "build_parser", "default_out_dir",
    # re-exported from normbench.collect and normbench.table for library use
    "CorruptRun", "find_run_dirs", "collect_runs", "read_metrics", "load_curves", "setting_columns",
    "describe_protocol", "aggregate", "sort_table", "format_table", "table_title", "table_notes", "to_markdown",
    "to_latex", "row_keys", "FIGURES",
]

NO_RUNS_HINT = "a run folder holds summary.json; run a sweep first, e.g. normbench experiment=quick"


@dataclass
class Report:
    """Everything the report's files are made of."""

    runs: pd.DataFrame  # one row per run (collect_runs)
    curves: pd.DataFrame  # per-epoch metrics of the completed runs, with their row keys
    table: pd.DataFrame  # one row per setting (aggregate)
    protocol: str  # how the runs were trained, one line (describe_protocol)
    target_acc: float  # the test accuracy (%) of the "to target" columns


def _no_runs_message(paths: list) -> str:
    shown = ", ".join(str(p) for p in paths)
    return f"no runs found under {shown} ({NO_RUNS_HINT})"


def default_out_dir(paths: list) -> Path:
    first = Path(paths[0])
    return (first.parent if first.is_file() else first) / "report"


def load_report(
    paths: Iterable[str | os.PathLike], target_acc: float | None = None, select_best: str | None = None
) -> Report:
    """Collect and aggregate the runs under `paths`; raises UserError if there are none. ``target_acc`` None: the
    one the runs' configs set (``collect.recorded_target_acc``), else the config default."""
    paths = list(paths)
    if not paths:
        raise UserError(_no_runs_message(["(no paths given)"]))
    runs = collect_runs(paths)
    if runs.empty:
        raise UserError(_no_runs_message(paths))
    if target_acc is None:
        target_acc = recorded_target_acc(runs) or DEFAULT_TARGET_ACC
    curves = load_curves(runs, row_keys(setting_columns(runs)))
    table = aggregate(runs, target_acc=target_acc, select_best=select_best, curves=curves)
    return Report(runs, curves, table, describe_protocol(runs), target_acc)


def write_report(
    paths: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike | None = None,
    target_acc: float | None = None,
    select_best: str | None = None,
    gap: tuple[str, str] = length.DEFAULT_GAP,
) -> dict[str, Path]:
    """Collect the runs under `paths`, write tables and figures to `out_dir` (default
    `<first path>/report`). Returns {file name: path}. `gap`: the two norms whose test-accuracy gap a sweep
    over training lengths draws against the length. Raises UserError if there is nothing to report."""
    paths = list(paths)
    report = load_report(paths, target_acc, select_best)
    target_acc = report.target_acc
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(paths)
    title = table_title(report.table, target_acc)
    notes = table_notes(report.table, report.protocol)
    display = format_table(report.table, target_acc)

    written: dict[str, Path] = {}
    contrasts = comparisons.compare(report.table)
    texts = {
        "table.md": to_markdown(display, title, notes),
        "table.csv": report.table.to_csv(index=False),
        "table.tex": to_latex(display, title, notes),
        "comparisons.md": comparisons.comparisons_markdown(contrasts),
        "comparisons.csv": contrasts.to_csv(index=False),
        "comparisons.tex": comparisons.comparisons_latex(contrasts),
        "findings.md": comparisons.findings_markdown(contrasts, report.table, report.runs),
        # A sweep over training lengths only (None otherwise).
        "length.md": length.length_markdown(report.table, target_acc, report.protocol, gap),
        "length.csv": length.length_csv(report.table),
        # A sweep with BN at several normalization batches beside other norms only.
        "recovery.md": recovery.recovery_markdown(report.table),
        "recovery.csv": recovery.recovery_csv(report.table),
    }
    for name, text in texts.items():
        if text is None:
            continue
        written[name] = out_dir / name
        atomic.write_text(written[name], text)
    for name, spec in FIGURES.items():
        draw = partial(spec.draw, pair=gap) if name == "length_gap" else spec.draw
        figure = draw(report.table, report.curves, report.protocol)
        if figure is None:  # a figure of an axis the runs do not vary (the length)
            continue
        written[spec.file_name] = out_dir / spec.file_name
        with atomic.atomic_path(written[spec.file_name]) as tmp:
            figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return written


def write_sweep_report(sweep_dir: str | os.PathLike, config, select_best: str | None) -> None:
    """A sweep's report as its config asks for it (report_dir, else <sweep dir>/report; target_acc):
    written, its table printed. Raises UserError if there is nothing to report."""
    written = write_report([str(sweep_dir)], config.get("report_dir"), config.target_acc, select_best)
    print(written["table.md"].read_text())
    print(f"report: {', '.join(str(p) for p in written.values())}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Turn a normbench sweep (run folders holding summary.json) into comparison "
                    "tables (table.md/.csv/.tex) and figures.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="run folders or sweep roots")
    parser.add_argument("--out", default=None, help="output folder (default: <first PATH>/report)")
    parser.add_argument("--target-acc", type=float, default=None,
                        help="test accuracy (%%) for the 'epochs to target' columns (default: the target_acc the runs' "
                             f"configs set, else {DEFAULT_TARGET_ACC:g})")
    parser.add_argument("--select-best", choices=identity.SELECTABLE_KEYS, default=None,
                        help="keep, per setting, the base lr with the best mean validation accuracy")
    parser.add_argument("--gap", type=_norm_pair, default=length.DEFAULT_GAP, metavar="A,B",
                        help="a sweep over training lengths: the norms whose test-accuracy gap (A minus B) is drawn "
                             f"against the length (default {','.join(length.DEFAULT_GAP)})")
    return parser


def _norm_pair(text: str) -> tuple[str, str]:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2 or not all(parts):
        raise argparse.ArgumentTypeError(f"--gap takes two norm labels, A,B (e.g. bn,gn), not {text!r}")
    return parts[0], parts[1]


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse already printed usage or help
        return e.code if isinstance(e.code, int) else 2
    try:
        written = write_report(args.paths, args.out, args.target_acc, args.select_best, args.gap)
    except UserError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return UserError.exit_code
    except OSError as e:
        print(f"{PROG}: cannot write the report: {e}", file=sys.stderr)
        return 1
    print(written["table.md"].read_text(encoding="utf-8"))
    print("wrote:")
    for path in written.values():
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
