"""TensorBoard opens on the answer (issue 27, item 5): one tiny run of the real entry point, its event
file read back the way TensorBoard reads it.

The run is shaped like one of `make run` (log_every=100 and stat_gap_every=200 in 250 steps, 2 epochs):
log_every=20 and stat_gap_every=30 in 40 steps, 2 epochs; as configured, two points per curve.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

from normbench.cli import run_job
from tests.conftest import compose_cfg

DIAGNOSTICS = "zz_diagnostics/"
THREE_ERRORS = ("gap/train_batchstats_acc", "gap/test_batchstats_acc", "gap/test_popstats_acc")
COMPARED = {"model", "norm", "batch_size", "virtual_batch", "seed"}


@pytest.fixture(scope="module")
def run_dir(tiny_data, tmp_path_factory):
    """One finished run (BN, batch 8, 2 epochs of 20 steps), shared by the checks below."""
    root = tmp_path_factory.mktemp("dashboard")
    with pytest.MonkeyPatch.context() as mp:  # conftest's _isolated_env, for a fixture wider than a test
        mp.setenv("NORMBENCH_CACHE", str(root / "cache"))
        mp.setenv("XDG_RUNTIME_DIR", str(root / "xdg"))
        mp.setenv("NORMBENCH_NO_DOWNLOAD", "1")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            cfg = compose_cfg(tiny_data, root / "runs", ["norm=bn", "epochs=2", "log_every=20", "stat_gap_every=30"])
            assert run_job(cfg)["status"] == "completed"
        finally:
            torch.set_num_threads(threads)
    return root / "runs" / cfg.run_name


@pytest.fixture(scope="module")
def events(run_dir) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return acc


def hparams_data(events: EventAccumulator, tag: str) -> plugin_data_pb2.HParamsPluginData:
    return plugin_data_pb2.HParamsPluginData.FromString(events.PluginTagToContent("hparams")[tag])


def test_one_event_file_per_run(run_dir):
    """hparams and layout go into the run's own event file: no sub-run (add_hparams, add_scalars)."""
    files = list(run_dir.rglob("events.out.tfevents.*"))
    assert len(files) == 1 and files[0].parent == run_dir, files
    assert not [p for p in run_dir.iterdir() if p.is_dir() and p.name != ".hydra"]


def test_custom_scalars_open_on_accuracy_loss_and_the_three_errors(events):
    layouts = events.Tensors("custom_scalars__config__")
    assert len(layouts) == 1  # written once per run
    layout = layout_pb2.Layout.FromString(layouts[0].tensor_proto.string_val[0])
    first, *others = layout.category
    assert not first.closed and all(c.closed for c in others)
    tags = events.Tags()["scalars"]
    # TensorBoard matches each chart's regular expressions against the run's tags (re.match)
    drawn = [{t for t in tags if any(re.match(rx, t) for rx in chart.multiline.tag)} for chart in first.chart]
    assert drawn == [{"test/acc"}, {"train/loss"}, set(THREE_ERRORS)]
    # every other chart draws something of its own or a scalar this run may lack (val/, PreciseBN, BRN)
    charted = {t for c in layout.category for chart in c.chart for t in tags
               if any(re.match(rx, t) for rx in chart.multiline.tag)}
    assert {t for t in tags if t.startswith(DIAGNOSTICS)} <= charted


def test_hparams_show_the_compared_settings_as_discrete_text(events):
    experiment = hparams_data(events, "_hparams_/experiment").experiment
    infos = {info.name: info for info in experiment.hparam_infos}
    start = hparams_data(events, "_hparams_/session_start_info").session_start_info.hparams
    expected = {"model": "cnn", "norm": "bn", "placement": "before", "batch_size": "8", "virtual_batch": "None",
                "seed": "0"}
    for name, value in expected.items():
        # text: TensorBoard prints a number with five digits (8 as "8.0000"); a discrete domain holding the value
        assert start[name].WhichOneof("kind") == "string_value" and start[name].string_value == value, name
        assert infos[name].type == api_pb2.DATA_TYPE_STRING and infos[name].display_name, name
        assert value in [v.string_value for v in infos[name].domain_discrete.values], name
    assert {"gn", "ln", "none"} <= {v.string_value for v in infos["norm"].domain_discrete.values}
    assert {"2", "32", "128"} <= {v.string_value for v in infos["batch_size"].domain_discrete.values}
    assert start["lr"].number_value == pytest.approx(0.1) and start["epochs"].string_value == "2"
    # The HPARAMS tab sorts the columns that differ first (then by name) and shows the first five.
    shown = sorted(infos.values(), key=lambda info: (not info.differs, info.name))[:5]
    assert {info.name for info in shown} == COMPARED
    assert {m.name.tag for m in experiment.metric_infos} >= {"test/acc", "train/loss"}
    end = hparams_data(events, "_hparams_/session_end_info").session_end_info
    assert end.status == api_pb2.STATUS_SUCCESS


def test_diagnostic_tags_sort_after_the_main_tags(events):
    tags = sorted(events.Tags()["scalars"])
    diagnostics = [t for t in tags if t.startswith(DIAGNOSTICS)]
    assert {f"{DIAGNOSTICS}lr", f"{DIAGNOSTICS}bn_gap/mean/features.0.1.0"} <= set(diagnostics)
    assert tags[-len(diagnostics):] == diagnostics  # asciibetically last
    main = tags[:-len(diagnostics)]
    assert {"test/acc", "train/loss", "train/acc", *THREE_ERRORS, "summary/best_test_acc"} <= set(main)
    assert not [t for t in main if t.split("/")[0] in ("lr", "bn_gap", "brn", "perf")]  # no diagnostic unprefixed


def test_diagnostics_draw_a_curve_or_are_not_logged(events, run_dir):
    """As configured, training loss, lr and BN gaps would be two points each in this 40-step run, and the
    per-epoch diagnostics of its 2 epochs two points too."""
    counts = {tag: len(events.Scalars(tag)) for tag in events.Tags()["scalars"]}
    step_based = [t for t in counts if t.startswith(DIAGNOSTICS) or t == "train/loss"]
    assert len(step_based) == 1 + 1 + 2 * 5  # train/loss, lr, mean and logvar gaps of the CNN's 5 BN layers
    assert all(counts[t] >= 10 for t in step_based), {t: counts[t] for t in step_based}
    assert not [t for t in counts if t.startswith(f"{DIAGNOSTICS}perf/")]  # 2 epochs: not a curve
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["images_per_s"] > 0 and summary["seconds_per_epoch"] > 0  # kept there


def test_a_short_run_logs_more_often_and_a_cadence_longer_than_the_run_logs_nothing():
    from normbench.tracking import curve_every

    assert curve_every(100, 250) == curve_every(200, 250) == 12  # make run: 20 points, not 2
    assert curve_every(50, 30 * 390) == 50 and curve_every(200, 30 * 390) == 200  # a default run: as configured
    assert curve_every(2, 40) == 2 and curve_every(1, 5) == 1
    assert curve_every(1_000_000, 250) == curve_every(0, 250) == curve_every(None, 250) == 0  # off (bench.py)
