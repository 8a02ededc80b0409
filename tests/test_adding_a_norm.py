"""The README's promise, "a norm is 3 files plus its tests", kept: in a copy of the project a
throwaway norm is added through exactly its layer, its registry entry and its yaml; then the norm
tests (which enumerate the registry) cover it and pass, a sweep with it trains, and its report
draws it in a colour no other norm has."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

LAYER = '''"""A throwaway norm: per-sample RMS over (C, H, W), per-channel affine (batch-independent)."""

import torch
import torch.nn as nn


class SampleRMSNorm(nn.Module):
    def __init__(self, num_features: int, *, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None

    def forward(self, x):
        y = x * torch.rsqrt(x.pow(2).mean(dim=(1, 2, 3), keepdim=True) + self.eps)
        if self.weight is None:
            return y
        return y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
'''
ENTRY = '        NormInfo("rms", "sample RMS norm: x/sqrt(mean_CHW(x^2)+eps), per-channel affine", SampleRMSNorm),\n'
YAML = "# A throwaway norm (tests/test_adding_a_norm.py)\nname: rms\neps: 1.0e-05\naffine: true\nvirtual_batch: null\n"
NEW_FILES = {"normbench/norms/sample_rms.py", "conf/norm/rms.yaml"}
EDITED_FILES = {"normbench/norms/registry.py"}


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for part in ("normbench", "conf", "tests", "scripts")
            for p in (root / part).rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def _add_norm(copy: Path) -> None:
    (copy / "normbench/norms/sample_rms.py").write_text(LAYER)
    (copy / "conf/norm/rms.yaml").write_text(YAML)
    registry = copy / "normbench/norms/registry.py"
    text = registry.read_text()
    entries_end = text.index("    ]\n}", text.index("NORMS: dict[str, NormInfo]"))
    text = text[:entries_end] + ENTRY + text[entries_end:]
    first_import = text.index("from normbench.norms.")
    text = text[:first_import] + "from normbench.norms.sample_rms import SampleRMSNorm\n" + text[first_import:]
    registry.write_text(text)


def _run(copy: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1", "NORMBENCH_NO_DOWNLOAD": "1"}
    result = subprocess.run([sys.executable, *args], cwd=copy, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_a_norm_is_its_layer_its_registry_entry_and_its_yaml(tmp_path, tiny_data):
    copy = tmp_path / "repo"
    for part in ("normbench", "conf", "tests", "scripts"):
        shutil.copytree(REPO / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, copy / name)
    before = _tree(copy)
    _add_norm(copy)
    after = _tree(copy)
    changed = {path for path in after if before.get(path) != after[path]}
    assert changed == NEW_FILES | EDITED_FILES  # exactly the three files

    # The copy is what Python imports (not the installed checkout).
    where = _run(copy, "-c", "import normbench, sys; print(normbench.__file__)").stdout
    assert where.strip().startswith(str(copy))

    # The README's norm table is the registry's: regenerated, it names rms.
    _run(copy, "-c", f"from normbench.norms.registry import print_norms; print_norms(['--update-readme', "
               f"{str(copy / 'README.md')!r}])")  # normbench-norms --update-readme README.md
    assert "| `rms` | sample RMS norm" in (copy / "README.md").read_text()

    # The norm tests enumerate the registry: they cover rms with no edit, and pass.
    tests = _run(copy, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider", "tests/test_norms.py",
                 "-k", "rms").stdout
    passed = int(tests.strip().splitlines()[-1].split(" passed")[0].split()[-1])
    assert passed >= 5, tests[-2000:]

    # A sweep with it trains, and its report draws it in a colour of its own.
    out = tmp_path / "runs"
    _run(copy, "-m", "normbench", "-m", "norm=rms,bn,gn", "model=cnn", "epochs=1", "batch_size=8",
         "data.eval_batch_size=64", "gap_train_images=16", f"data.root={tiny_data}", f"out_dir={out}")
    assert len(list(out.glob("cnn/rms/bs8*/lr0.1/ep1/seed0/summary.json"))) == 1  # -bf16 where amp=auto means bf16
    report = tmp_path / "report"
    _run(copy, "-m", "normbench.report", str(out), "--out", str(report))
    colours = _run(copy, "-c", "from normbench import figures; from normbench.norms import NORMS\n"
                   "for name, style in figures.norm_styles(list(NORMS)).items(): print(name, style.color)").stdout
    colour = dict(line.split() for line in colours.splitlines())
    assert list(colour.values()).count(colour["rms"]) == 1  # no other norm has it
    _assert_drawn(report / "curves_test_acc.png", colour["rms"])


def _assert_drawn(png: Path, colour: str) -> None:
    """Some pixels of the figure are exactly the norm's colour (its line)."""
    from matplotlib import image

    pixels = (image.imread(png)[..., :3] * 255).round().astype(int)
    rgb = tuple(int(colour.lstrip("#")[i:i + 2], 16) for i in (0, 2, 4))
    assert ((pixels == rgb).all(axis=-1)).sum() > 20, f"{colour} not drawn in {png.name}"
