"""bf16 against fp32, arm by arm: does training in bf16 (in the norm's preferred memory format) reach
the test accuracy of fp32? The decision rule of issue 26 for amp=auto on CPUs, applied to the runs of
a sweep that trained each arm in both precisions over the same seeds (conf/experiment/bf16_parity_cpu.yaml):

    python scripts/parity.py results/bench/runs --out results/bench/bf16_parity.md

An arm is (model, norm, normalization batch, lr); per arm the difference of the mean test accuracy,
bf16 - fp32, with its 95% confidence interval by Welch's t-test, and by the paired t-test over the
seeds both precisions share (the same initial weights and data order). Rule: an arm passes if the
difference is within 1 point or its Welch interval contains 0; bf16 may be the CPU default only if
every arm passes. The runs' images per second are printed too, but they are not a benchmark (the
runs shared the machine); `make bench` measures speed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from normbench import collect, stats

MAX_POINTS = 1.0  # the largest difference that passes whatever its interval
ARM = ["model", "norm", "norm_batch", "lr"]


def _fmt(value: float, digits: int = 2) -> str:
    return "n/a" if value != value else f"{value:+.{digits}f}"


def parity_rows(runs_dir: str) -> list[dict]:
    """One row per arm with both precisions: means, the two differences and the verdict."""
    keyed = collect.keyed_runs(collect.collect_runs([runs_dir]))
    keyed = keyed[keyed["status"] == "completed"]
    if "amp" not in keyed.columns:
        raise SystemExit("parity: these runs are all of one precision (no amp column); nothing to compare")
    rows = []
    for arm, group in keyed.groupby(ARM, dropna=False, sort=True):
        by_amp = {amp: sub.set_index("seed")["test_acc"] for amp, sub in group.groupby("amp")}
        if set(by_amp) != {False, True}:
            continue
        fp32, bf16 = by_amp[False], by_amp[True]
        shared = sorted(set(fp32.index) & set(bf16.index))
        welch = stats.welch(bf16.tolist(), fp32.tolist())
        paired = stats.paired(bf16[shared].tolist(), fp32[shared].tolist())
        speed = group.groupby("amp")["images_per_s"].mean()
        passes = abs(welch.diff) <= MAX_POINTS or welch.contains_zero()
        rows.append({**dict(zip(ARM, arm)), "fp32": fp32.tolist(), "bf16": bf16.tolist(), "welch": welch,
                     "paired": paired, "speed": speed[True] / speed[False], "passes": passes})
    return rows


def markdown(rows: list[dict], command: str) -> str:
    lines = [
        "# bf16 vs fp32: test accuracy, arm by arm",
        "",
        f"Command: `{command}` (runs: `normbench experiment=bf16_parity_cpu`). bf16 = amp=true with",
        "memory_format=auto (the norm's preference); fp32 = amp=false (contiguous). Difference = bf16 - fp32 in",
        "test accuracy points; 95% CIs by Welch's t-test and by the paired t-test over the shared seeds.",
        f"Rule: an arm passes if |difference| <= {MAX_POINTS:g} point or its Welch CI contains 0.",
        "",
        "| model | norm | norm batch | lr | fp32 mean (n) | bf16 mean (n) | difference | Welch 95% CI | p | "
        "paired 95% CI | p (paired) | passes | img/s bf16 / fp32 (shared machine) |",
        "|:---|:---|---:|---:|---:|---:|---:|:---|---:|:---|---:|:---|---:|",
    ]
    for row in rows:
        w, p = row["welch"], row["paired"]
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        lines.append(
            f"| {row['model']} | {row['norm']} | {row['norm_batch']} | {row['lr']:g} | "
            f"{mean(row['fp32']):.2f} ({len(row['fp32'])}) | {mean(row['bf16']):.2f} ({len(row['bf16'])}) | "
            f"{_fmt(w.diff)} | [{_fmt(w.low)}, {_fmt(w.high)}] | {w.p:.3f} | [{_fmt(p.low)}, {_fmt(p.high)}] | "
            f"{p.p:.3f} | {'yes' if row['passes'] else '**no**'} | {row['speed']:.2f}x |")
    verdict = all(row["passes"] for row in rows) and rows
    lines += ["", f"Every arm passes: {'yes' if verdict else 'no'} ({len(rows)} arms)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", help="the runs of a sweep over amp=false,true")
    parser.add_argument("--out", help="write the markdown table here (else print it)")
    args = parser.parse_args(argv)
    rows = parity_rows(args.runs)
    if not rows:
        print("parity: no arm was trained in both precisions", file=sys.stderr)
        return 1
    command = "python scripts/parity.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = markdown(rows, command)
    if args.out:
        Path(args.out).write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
