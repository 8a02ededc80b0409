"""Precision (amp) and memory format: resolved from auto in one place (normbench/device.py), trained
as the run's identity records them, and refused in one line when bad."""

from __future__ import annotations

import pytest
import torch

from normbench import device, identity
from normbench.train import Run

CL = torch.channels_last


def _run(make_cfg, tmp_path, *overrides) -> Run:
    cfg = make_cfg(*overrides)
    return Run(cfg, tmp_path / "run", log=lambda *a, **k: None)


@pytest.mark.parametrize("overrides, layout", [
    (("memory_format=channels_last", "norm=gn"), "channels_last"),  # forced, whatever the norm prefers
    (("memory_format=contiguous", "amp=true"), "contiguous"),
    (("amp=false",), "contiguous"),  # auto in fp32: contiguous, as before the option
    (("amp=true", "norm=bn"), "channels_last"),  # auto in bf16: the norm's declared preference
    (("amp=true", "norm=gn"), "contiguous"),
])
def test_the_model_and_every_batch_are_in_the_resolved_format(make_cfg, tmp_path, overrides, layout):
    run = _run(make_cfg, tmp_path, *overrides)
    assert run.config["memory_format"] == layout
    want = CL if layout == "channels_last" else torch.contiguous_format
    conv = next(m for m in run.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=want)
    x, _ = next(iter(run.train_batches.epoch(0)))
    x_test, _ = next(iter(run.evaluation.test.epoch()))
    for batch in (x, x_test):
        assert batch.is_contiguous(memory_format=want)
        if layout == "channels_last":
            assert not batch.is_contiguous()  # really reordered (a 3-channel batch can be both otherwise)


def test_amp_true_trains_under_bf16_autocast(make_cfg, tmp_path):
    run = _run(make_cfg, tmp_path, "amp=true")
    x, _ = next(iter(run.train_batches.epoch(0)))
    with run.autocast():
        assert run.model(x).dtype == torch.bfloat16
    off = _run(make_cfg, tmp_path, "amp=false")
    with off.autocast():
        assert off.model(x.contiguous()).dtype == torch.float32


def test_auto_bf16_on_a_cpu_needs_matrix_units(monkeypatch):
    monkeypatch.setattr(device, "cpu_has_bf16_matrix_units", lambda: True)
    assert device.uses_bf16("auto", "cpu") and device.uses_bf16("auto", "cuda")
    assert not device.uses_bf16(False, "cuda") and device.uses_bf16(True, "cpu")
    monkeypatch.setattr(device, "cpu_has_bf16_matrix_units", lambda: False)
    assert not device.uses_bf16("auto", "cpu")  # no bf16 matrix units: fp32
    assert device.uses_bf16(True, "cpu")
    assert device.uses_bf16("auto", "mps") is False


def test_this_cpu_is_detected_through_torch():
    """The machines of this project have AMX (lscpu: amx_bf16): torch must see it where lscpu does."""
    flags = open("/proc/cpuinfo").read() if __import__("os").path.exists("/proc/cpuinfo") else ""
    if "amx_bf16" not in flags:
        pytest.skip("no AMX here")
    assert device.cpu_has_bf16_matrix_units()


def test_precision_and_layout_name_the_run_folder(make_cfg):
    """An fp32 and a bf16 run never share a folder; fp32 contiguous runs keep their old names."""
    names = {o: make_cfg(*o).run_name for o in [("amp=false",), ("amp=true",), ("amp=true", "memory_format=contiguous"),
                                               ("amp=false", "memory_format=channels_last")]}
    assert names[("amp=false",)] == "cnn/bn/bs8/lr0.1/ep1/seed0"
    assert names[("amp=true",)] == "cnn/bn/bs8-bf16-cl/lr0.1/ep1/seed0"
    assert names[("amp=true", "memory_format=contiguous")] == "cnn/bn/bs8-bf16/lr0.1/ep1/seed0"
    assert names[("amp=false", "memory_format=channels_last")] == "cnn/bn/bs8-cl/lr0.1/ep1/seed0"
    fps = {identity.fingerprint(identity.run_config(make_cfg(*o))) for o in names}
    assert len(fps) == len(names)


def test_a_bad_memory_format_is_one_line(tiny_data, tmp_path):
    from tests.conftest import TINY_OVERRIDES, run_cli

    result = run_cli([*TINY_OVERRIDES, f"data.root={tiny_data}", f"out_dir={tmp_path}", "memory_format=nhwc"])
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "memory_format='nhwc' is not one of" in result.stderr
