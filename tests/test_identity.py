"""A run's identity: what its fingerprint covers, and that a new option at its default changes nothing.

The scenario of every future option (precision, memory format, a training budget): conf/ gains a key
at a default that reproduces what runs did before it. Every finished run must keep its identity (its
rerun skipped, its report row shared with new runs), and a run that sets the key otherwise must not.
"""

from __future__ import annotations

import shutil

import pytest
from omegaconf import open_dict

from normbench import collect, identity


@pytest.fixture
def conf_copy(tmp_path, monkeypatch):
    """A copy of conf/ that identity reads instead of the real one (as if a later commit had edited it)."""
    copy = tmp_path / "conf"
    shutil.copytree(identity.CONF_DIR, copy)
    monkeypatch.setattr(identity, "CONF_DIR", copy)
    identity._yaml.cache_clear()
    yield copy
    identity._yaml.cache_clear()


def _add_line(path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}\n")
    identity._yaml.cache_clear()


def _with(cfg, **values):
    cfg = cfg.copy()
    with open_dict(cfg):
        for dotted, value in values.items():
            node = cfg
            *parents, key = dotted.split(".")
            for parent in parents:
                node = node[parent]
            node[key] = value
    return cfg


@pytest.mark.parametrize("file, key", [("config.yaml", "new_option"), ("data/cifar10.yaml", "data.new_option"),
                                       ("optim/sgd.yaml", "optim.new_option")])
def test_a_new_key_at_its_default_leaves_the_fingerprint(make_cfg, conf_copy, file, key):
    cfg = make_cfg("norm=gn")
    before = identity.run_config(cfg)  # a run finished before the option existed
    fp_before = identity.fingerprint(before)

    _add_line(conf_copy / file, f"{key.rsplit('.', 1)[-1]}: 3   # the new option, at the old behaviour")
    assert identity.fingerprint(before) == fp_before  # its summary still names the same run
    at_default = identity.run_config(_with(cfg, **{key: 3}))
    assert identity.fingerprint(at_default) == fp_before  # a new run at the default is that run
    changed = identity.run_config(_with(cfg, **{key: 4}))
    assert identity.fingerprint(changed) != fp_before  # set otherwise, it is another run


def test_a_new_key_at_its_default_shares_the_report_row(make_cfg, conf_copy):
    cfg = make_cfg("norm=gn")
    old = {"config": identity.run_config(cfg), "device": "cpu", "results_version": 2,
           "run_name": cfg.run_name, "model": "cnn", "placement": "before", "batch_size": 8, "lr": 0.1,
           "devices": 1, "virtual_batch": None, "epochs": 1, "norm_label": "gn"}
    _add_line(conf_copy / "config.yaml", "new_option: 3")
    new = {**old, "config": identity.run_config(_with(cfg, new_option=3))}
    other = {**old, "config": identity.run_config(_with(cfg, new_option=4))}
    old_setting, new_setting = collect.recorded_setting(old), collect.recorded_setting(new)
    assert old_setting == new_setting and old_setting["new_option"] == 3  # the old run reads as the default
    assert collect.recorded_setting(other)["new_option"] == 4


def test_every_result_key_is_in_the_identity(make_cfg):
    """A key that affects results, changed, changes the fingerprint; a declared non-result key does not."""
    cfg = make_cfg()
    fp = identity.fingerprint(identity.run_config(cfg))
    for key, value in {"lr": 0.3, "seed": 7, "batch_size": 4, "data.crop_padding": 2, "optim.momentum": 0.5,
                       "sched.warmup_epochs": 0.25, "norm.eps": 1e-3, "amp": True, "compile": True}.items():
        assert identity.fingerprint(identity.run_config(_with(cfg, **{key: value}))) != fp, key
    for key, value in {"log_every": 7, "threads": 1, "target_acc": 50.0, "data.eval_batch_size": 7,
                       "out_dir": "elsewhere", "device": "cpu", "progress": False}.items():
        assert identity.fingerprint(identity.run_config(_with(cfg, **{key: value}))) == fp, key


@pytest.mark.parametrize("matrix_units", [True, False])
def test_auto_is_recorded_as_what_it_resolved_to(make_cfg, monkeypatch, matrix_units):
    """amp=auto on a CPU is bf16 where it has bf16 matrix units, fp32 elsewhere, and compile=auto off:
    the same run as amp forced to that value, never the same as the other precision."""
    from normbench import device

    monkeypatch.setattr(device, "cpu_has_bf16_matrix_units", lambda: matrix_units)
    cfg = make_cfg("device=cpu")
    auto = identity.run_config(_with(cfg, amp="auto", compile="auto"))
    assert auto["amp"] is matrix_units and auto["compile"] is False
    same = identity.run_config(_with(cfg, amp=matrix_units, compile=False))
    other = identity.run_config(_with(cfg, amp=not matrix_units))
    assert identity.fingerprint(auto) == identity.fingerprint(same) != identity.fingerprint(other)


def test_a_summary_of_version_2_keeps_its_identity(make_cfg):
    """Summaries written before amp was recorded resolved say amp=auto: on a CPU that was fp32."""
    cfg = make_cfg()
    config = identity.run_config(cfg)
    legacy = {**config, "amp": "auto"}
    legacy.pop("compile")  # before compile existed
    assert identity.record_fingerprint({"config": legacy, "device": "cpu"}) == identity.fingerprint(config)
    on_gpu = identity.record_fingerprint({"config": legacy, "device": "cuda:0"})
    assert on_gpu == identity.fingerprint({**config, "amp": True})  # compile did not exist: off


def test_the_results_version_separates_runs(make_cfg, monkeypatch):
    """Bumping RESULTS_VERSION makes every earlier summary another run (it is trained again)."""
    config = identity.run_config(make_cfg())
    record = {"config": config, "device": "cpu", "results_version": identity.RESULTS_VERSION}
    assert identity.record_fingerprint(record) == identity.fingerprint(config)
    monkeypatch.setattr(identity, "RESULTS_VERSION", identity.RESULTS_VERSION + 1)
    assert identity.record_fingerprint(record) != identity.fingerprint(config)


def test_committed_summaries_are_the_runs_their_presets_compose():
    """Every committed run's summary still names its run: recomputing its fingerprint from what it
    records gives one distinct identity per run folder of a preset (nothing collapses, nothing is lost).
    Two presets may hold the same run (remedies_cpu's BN at 4 epochs is length_cnn_cpu's), each trained
    in its own folder."""
    import json

    presets = sorted((identity.CONF_DIR.parent / "results").glob("*/runs"))
    summaries = {runs: sorted(runs.glob("**/summary.json")) for runs in presets}
    if not any(summaries.values()):
        pytest.skip("no committed runs")
    for runs, paths in summaries.items():
        fingerprints = {identity.record_fingerprint(json.loads(path.read_text())) for path in paths}
        assert None not in fingerprints and len(fingerprints) == len(paths), runs.parent.name


def _cli_value(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


_ABSENT = object()  # a key a record's config does not hold (a run from before its option existed)


def _dotted(tree: dict, key: str):
    for part in key.split("."):
        if part not in tree:
            return _ABSENT
        tree = tree[part]
    return tree["name"] if isinstance(tree, dict) else tree


COMMITTED_RESULTS = identity.CONF_DIR.parent / "results"


# One test per results folder with runs, so that the workers share them (together they take the longest).
@pytest.mark.parametrize("folder", sorted(p.name for p in COMMITTED_RESULTS.iterdir() if (p / "runs").is_dir()))
def test_rerunning_a_committed_preset_trains_nothing(monkeypatch, folder):
    """Each committed run, composed again from its preset and its own sweep values, lands in its own
    folder with its own fingerprint: `normbench experiment=<preset>` (and scripts/reference.py) skip it.
    On a machine like the one they were trained on: an AMX CPU, where amp=auto means bf16 (elsewhere auto
    resolves to fp32, another run, trained again; that is the identity's rule)."""
    import json

    from omegaconf import OmegaConf

    from normbench import budget, device
    from normbench.compose import compose

    monkeypatch.setattr(device, "cpu_has_bf16_matrix_units", lambda: True)

    # A results folder is its preset's out_dir (results/bench/runs: bf16_parity_cpu), else the preset of its
    # name (results/quick/runs: a copy of quick's runs/quick).
    presets = {OmegaConf.load(p).get("out_dir"): p.stem for p in (identity.CONF_DIR / "experiment").glob("*.yaml")}
    checked = 0
    preset_dir = COMMITTED_RESULTS / folder
    preset = presets.get(f"results/{preset_dir.name}/runs", preset_dir.name)
    # what the preset sweeps, and what scripts/reference.py sets: lr, seed, and the length settings in a
    # length study (epochs) or an equal-steps one (budget.unit, budget.length)
    swept = [*compose([f"experiment={preset}"]).hydra.sweeper.params, "lr", "seed", *budget.SETTINGS]
    composed = {}
    for path in sorted((preset_dir / "runs").glob("**/summary.json")):
        record = json.loads(path.read_text())
        values = {key: value for key in swept if (value := _dotted(record["config"], key)) is not _ABSENT}
        if values.get("budget.unit", budget.DEFAULT_UNIT) != "epochs":
            del values["epochs"]  # recorded as null, unused: the composed run keeps the preset's
        choices = tuple(f"{k}={_cli_value(v)}" for k, v in values.items() if k in ("norm", "model"))
        if choices not in composed:
            composed[choices] = compose([f"experiment={preset}", *choices], hydra_node=False)
        cfg = composed[choices].copy()
        for key, value in values.items():
            if key not in ("norm", "model"):
                OmegaConf.update(cfg, key, value, force_add=False)
        run_dir = path.parent.relative_to(preset_dir / "runs")  # quick's out_dir is runs/quick: a copy
        # its folder, or the one it had before run names held the training length (where the cli finds it)
        assert str(run_dir) in (cfg.run_name, identity.legacy_run_name(cfg)), (preset, values)
        assert identity.record_fingerprint(record) == identity.fingerprint(identity.run_config(cfg)), run_dir
        checked += 1
    if not checked:
        pytest.skip("no committed runs")

