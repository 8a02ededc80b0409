"""Every number in results/README.md comes from a generated file of its preset, or is a published figure.

The README is read section by section (its "## " headings): a preset's section (named by its results
folder: quick, gn_fig1_cpu, ..., bench) against that folder's generated text (table.md / .csv,
comparisons.md / .csv, findings.md, length.* and recovery.* where written; the bench's *.md); the part
before the first section against every preset's; the yardstick section ("What the published numbers
say") holds the published figures, which every section may quote. Numbers inside code spans (commands,
paths, option values) are not claims and are skipped; so are digits that belong to a name (ResNet-20,
bf16, CIFAR-10, fig1).
"""

from __future__ import annotations

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "results"
README = RESULTS / "README.md"
PUBLISHED_HEADING = "What the published numbers say"
GENERATED = ("table.md", "table.csv", "comparisons.md", "comparisons.csv", "findings.md", "length.md", "length.csv",
             "recovery.md", "recovery.csv")

# A number that is not part of a name: not after a letter, digit, dot or underscore, nor after "<letter>-".
NUMBER = re.compile(r"(?<![\w.])(?<![A-Za-z]-)\d+(?:,\d{3})*(?:\.\d+)?")
CODE_SPAN = re.compile(r"`[^`]*`")
LINK_TARGET = re.compile(r"\]\([^)]*\)")
LIST_MARKER = re.compile(r"^\s*\d+\.\s", re.MULTILINE)  # "1. " of an ordered list


def numbers(text: str) -> set[str]:
    text = LIST_MARKER.sub(" ", LINK_TARGET.sub("]", CODE_SPAN.sub(" ", text)))
    return {n.replace(",", "") for n in NUMBER.findall(text)}


def sections(text: str) -> dict[str, str]:
    """heading (its first word, "" before the first) -> text."""
    parts, heading = {"": []}, ""
    for line in text.splitlines():
        if line.startswith("## "):
            heading = line[3:].strip()
            parts[heading] = []
        else:
            parts[heading].append(line)
    return {k: "\n".join(v) for k, v in parts.items()}


def generated_numbers(folder: Path) -> set[str]:
    files = [folder / name for name in GENERATED if (folder / name).exists()]
    files += sorted(folder.glob("*.md")) if folder.name == "bench" else []
    return set().union(*(numbers(f.read_text()) for f in files)) if files else set()


def _folder(heading: str) -> Path | None:
    first = heading.split()[0] if heading else ""
    return RESULTS / first if first and (RESULTS / first).is_dir() else None


def test_every_number_in_results_readme_is_generated_or_published():
    parts = sections(README.read_text())
    published = next((numbers(t) for h, t in parts.items() if h.startswith(PUBLISHED_HEADING)), None)
    assert published, f"results/README.md has no '{PUBLISHED_HEADING}' section"
    every_preset = set().union(*(generated_numbers(d) for d in RESULTS.iterdir() if d.is_dir()))
    unsupported = {}
    for heading, text in parts.items():
        if heading.startswith(PUBLISHED_HEADING):
            continue
        folder = _folder(heading)
        if heading and folder is None:
            unsupported[heading] = ["(a section that names no results folder)"]
            continue
        allowed = (every_preset if folder is None else generated_numbers(folder)) | published
        missing = sorted(numbers(text) - allowed, key=float)
        if missing:
            unsupported[heading or "(before the first section)"] = missing
    assert not unsupported, f"numbers in results/README.md found in no generated file of their preset: {unsupported}"


def test_the_check_notices_a_number_that_no_file_holds(tmp_path):
    """The tokenizer finds prose numbers and skips names and code: the check cannot pass vacuously."""
    assert numbers("BN drops 12.00 points (44.17% to 32.17%) at 15,000 images") == {"12.00", "44.17", "32.17", "15000"}
    assert numbers("ResNet-20 in bf16 on CIFAR-10, `normbench lr=0.4`, fig1") == set()
    assert numbers("1. **Batch 32.** the first point") == {"32"}
