"""Training vs inference statistics (issue 12): eval_stats=ema|precise|batch, the three errors
(gap/* in metrics.csv, summary.json, TensorBoard, the report) and the FrozenBN tail."""

import contextlib
import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from normbench import data
from normbench.cli import run_job
from normbench.norms import build_norm, precise_bn_update
from normbench.summary import GAP_FIELDS
from normbench.evaluation import eval_batches_for, evaluate
from normbench.train import Run
from tests.conftest import make_image_folder, run_cli
from tests.test_train import _cli_args, kill_inside_epoch_2, read_metrics, scalars


def _two_bn_model(seed=0, virtual_batch=None):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), build_norm("bn", 4, virtual_batch=virtual_batch),
                          nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1, bias=False),
                          build_norm("bn", 5, virtual_batch=virtual_batch), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 10))
    with torch.no_grad():  # affine parameters and running statistics away from their defaults
        for m in model.modules():
            if hasattr(m, "running_mean"):
                m.weight.uniform_(0.5, 2.0)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 3.0)
    return model


def _split(n=22, seed=0):
    g = torch.Generator().manual_seed(seed)
    return data.Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                      torch.randint(0, 10, (n,), generator=g))


def test_batch_stats_eval_equals_hand_computation():
    """eval_stats=batch: groups of the normalization batch in a fixed random order, each normalized with
    its own statistics (a train-mode forward), the incomplete tail left out, no buffer changed."""
    model = _two_bn_model()
    split, group = _split(22), 4
    batches = eval_batches_for(split, 8, group, "cpu")
    before = copy.deepcopy(model.state_dict())
    loss, acc = evaluate(model, batches, contextlib.nullcontext, batch_stats=group)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # running statistics untouched
    assert not model.training

    hand = copy.deepcopy(model).train()
    order = torch.randperm(22, generator=torch.Generator().manual_seed(0))  # eval_batches_for's fixed order
    x, y = batches.normalize(split.x[order]), split.y[order][:20]
    with torch.no_grad():
        logits = torch.cat([hand(x[i:i + group]) for i in range(0, 20, group)])  # 22 % 4 = 2 left out
    assert loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert acc == pytest.approx(100.0 * (logits.argmax(1) == y).float().mean().item())
    # and not the running statistics' answer
    eval_loss, _ = evaluate(model, data.Batches(split, 8, "cpu", train=False), contextlib.nullcontext)
    assert abs(eval_loss - loss) > 1e-3


def test_precise_equals_exact_population_stats_of_two_layers():
    """PreciseBN: each layer's running stats become the exact mean / unbiased variance of its inputs
    over the chosen batches, the second layer's inputs computed with the first normalizing with
    batch statistics in training mode (one pass, as fvcore's update_bn_stats)."""
    model = _two_bn_model(seed=1)
    conv1, bn1, _, conv2, bn2 = list(model)[:5]
    torch.manual_seed(2)
    batches = [torch.randn(6, 3, 8, 8) * 2 + 1 for _ in range(5)]
    ins1, ins2 = [], []
    with torch.no_grad():
        for x in batches[:3]:
            h1 = conv1(x)
            h2 = conv2(F.relu(F.batch_norm(h1, None, None, bn1.weight, bn1.bias, True, 0.0, bn1.eps)))
            ins1.append(h1)
            ins2.append(h2)
    weights = [p.clone() for p in model.parameters()]
    precise_bn_update(model, iter(batches), 3)
    for bn, ins in ((bn1, ins1), (bn2, ins2)):
        h = torch.cat(ins)
        torch.testing.assert_close(bn.running_mean, h.mean((0, 2, 3)), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(bn.running_var, h.var((0, 2, 3), unbiased=True), atol=1e-4, rtol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))


def _gap(summary):
    return {k: summary[k] for k in GAP_FIELDS}


def test_three_errors_everywhere_for_a_tiny_real_run(make_cfg, tmp_path):
    cfg = make_cfg("norm=bn", "epochs=2", "norm.virtual_batch=2", "gap_train_images=40")
    s = run_job(cfg)
    run_dir = tmp_path / "runs" / cfg.run_name
    assert s["status"] == "completed"
    for key in ("gap_train_batchstats_acc", "gap_test_batchstats_acc", "gap_test_popstats_acc", "gap_test_ema_acc"):
        assert isinstance(s[key], float), key
    assert s["gap_test_popstats_acc"] == s["gap_test_ema_acc"] == s["test_acc"]
    assert s["gap_test_precise_acc"] is None  # an ema run does not pay for PreciseBN
    assert json.loads((run_dir / "summary.json").read_text())["gap_test_batchstats_acc"] == s["gap_test_batchstats_acc"]
    rows = read_metrics(run_dir)
    assert len(rows) == 2
    for key in ("gap_train_batchstats_acc", "gap_test_batchstats_acc", "gap_test_popstats_acc"):
        assert float(rows[-1][key]) == pytest.approx(s[key])
    tb = scalars(run_dir)
    for tag in ("gap/train_batchstats_acc", "gap/test_batchstats_acc", "gap/test_popstats_acc", "gap/test_ema_acc"):
        assert [x for x, _ in tb[tag]] == [160, 320], tag  # x axis: training images seen
        assert tb[tag][-1][1] == pytest.approx(s[tag.replace("gap/", "gap_")], rel=1e-5)

    gn = run_job(make_cfg("norm=gn", "gap_train_images=40"))
    assert gn["gap_test_batchstats_acc"] == gn["gap_test_popstats_acc"] == gn["test_acc"]
    assert gn["gap_train_batchstats_acc"] is not None and gn["gap_test_ema_acc"] is None

    from normbench.report import main as report_main

    out = tmp_path / "report"
    assert report_main([str(tmp_path / "runs"), "--out", str(out)]) in (0, None)
    table = (out / "table.md").read_text()
    assert "train err (batch stats)" in table and "test err (pop. stats)" in table
    assert (out / "train_eval_gap.png").exists()


def test_gap_every_measures_the_gap_every_k_epochs_and_at_the_last(make_cfg, tmp_path):
    cfg = make_cfg("norm=bn", "epochs=3", "norm.virtual_batch=2", "gap_train_images=40", "gap_every=2")
    s = run_job(cfg)
    rows = read_metrics(tmp_path / "runs" / cfg.run_name)
    for key in ("gap_train_batchstats_acc", "gap_test_batchstats_acc", "gap_test_popstats_acc"):
        assert [bool(row[key]) for row in rows] == [False, True, True], key  # epochs 2 and 3 (the last)
        assert float(rows[-1][key]) == pytest.approx(s[key])
    assert all(row["test_acc"] for row in rows)  # the headline evaluation stays every epoch
    # the same run, the gap measured every epoch: the training itself is the same
    every = run_job(make_cfg("norm=bn", "epochs=3", "norm.virtual_batch=2", "gap_train_images=40",
                             out_dir=tmp_path / "every"))
    assert every["test_acc"] == s["test_acc"] and every["gap_train_batchstats_acc"] == s["gap_train_batchstats_acc"]


def test_gap_train_images_option(make_cfg, tmp_path):
    off = run_job(make_cfg("norm=bn", "gap_train_images=0"))
    assert off["gap_train_batchstats_acc"] is None
    on = make_cfg("norm=bn", "gap_train_images=30", "seed=1")
    run = Run(on, tmp_path / "x", log=lambda *a: None)
    train_slice = run.evaluation.train_slice.split
    assert len(train_slice) == 30 and torch.bincount(train_slice.y, minlength=10).tolist() == [3] * 10  # balanced
    assert run_job(on)["gap_train_batchstats_acc"] is not None


def test_eval_stats_batch_and_precise_set_the_headline(make_cfg, tmp_path):
    batch = run_job(make_cfg("norm=bn", "eval_stats=batch", "norm.virtual_batch=4"))
    assert batch["run_name"].endswith("bs8-vb4-evalbatch/lr0.1/ep1/seed0")
    assert batch["test_acc"] == batch["gap_test_batchstats_acc"]
    assert batch["gap_test_popstats_acc"] == batch["gap_test_ema_acc"] is not None
    precise = run_job(make_cfg("norm=bn", "eval_stats=precise", "precise_batches=3"))
    assert precise["test_acc"] == precise["gap_test_precise_acc"] == precise["gap_test_popstats_acc"]
    assert precise["gap_test_ema_acc"] is not None
    # batch-independent norms ignore it: one run, one folder
    gn = make_cfg("norm=gn", "eval_stats=precise")
    assert gn.run_name == make_cfg("norm=gn").run_name


def _first_bn_running_mean(tmp_path, cfg):
    state = torch.load(tmp_path / "runs" / cfg.run_name / "checkpoint.pt", weights_only=True)
    return next(v for k, v in state["model"].items() if k.endswith("running_mean"))


def test_precise_batches_option(make_cfg, tmp_path):
    means = []
    for n in (1, 5):
        cfg = make_cfg("norm=bn", "eval_stats=precise", f"precise_batches={n}", "norm.momentum=0.0001", f"variant=p{n}")
        run_job(cfg)
        means.append(_first_bn_running_mean(tmp_path, cfg))
    assert not torch.allclose(means[0], means[1])


def _batch_stat_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_steps" in k}


@pytest.mark.parametrize("norm", ["bn", "brn"])
def test_frozen_tail_keeps_running_stats(make_cfg, tmp_path, norm):
    def buffers_per_epoch(*overrides):
        cfg = make_cfg(f"norm={norm}", "epochs=3", *overrides)
        run = Run(cfg, tmp_path / "runs" / cfg.run_name, log=lambda *a: None)
        run.start_recording()
        seen = []
        for _ in range(3):
            weights = [p.clone() for p in run.model.parameters()]
            assert run.train_epoch() is None
            run.end_epoch()
            seen.append((_batch_stat_buffers(run.model), weights))
        run.recorder.close()
        return seen, run

    seen, run = buffers_per_epoch("freeze_stats_epochs=2")
    assert run.frozen_epoch(1) and run.frozen_epoch(2) and not run.frozen_epoch(0)
    after_first = seen[0][0]
    for buffers, _ in seen[1:]:
        for k, v in buffers.items():
            assert torch.equal(v, after_first[k]), k
    final_weights = [p for p in run.model.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(seen[2][1], final_weights))  # still training
    unfrozen, _ = buffers_per_epoch("freeze_stats_epochs=0", "variant=nofreeze")
    assert any(not torch.equal(unfrozen[2][0][k], unfrozen[0][0][k]) for k in after_first)


@pytest.mark.slow  # three runs of 600 steps; the plain SIGKILL resume test runs in make test
def test_sigkill_inside_frozen_tail_then_resume_is_exact(tmp_path):
    data_root = make_image_folder(tmp_path / "data", n_train=40, n_test=8)
    env = {"NORMBENCH_CACHE": str(tmp_path / "cache")}
    args = ["norm=bn", "batch_size=2", "epochs=3", "log_every=10", "stat_gap_every=0", "freeze_stats_epochs=2",
            "eval_stats=precise", "precise_batches=3", "gap_train_images=40"]
    run_dir = tmp_path / "killed" / "cnn/bn/bs2-evalprecise-freeze2/lr0.1/ep3/seed0"
    kill_inside_epoch_2(data_root, tmp_path / "killed", args, run_dir, env)  # the first frozen epoch
    resumed = run_cli(_cli_args(data_root, tmp_path / "killed", *args, "ckpt_every=25"), env_extra=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout and "epoch 1 batch" in resumed.stdout
    straight = run_cli(_cli_args(data_root, tmp_path / "straight", *args), env_extra=env)
    assert straight.returncode == 0, straight.stderr
    a = json.loads((run_dir / "summary.json").read_text())
    b = json.loads((tmp_path / "straight" / "cnn/bn/bs2-evalprecise-freeze2/lr0.1/ep3/seed0" / "summary.json").read_text())
    for key in ("test_acc", "test_loss", "train_loss", "train_acc", "steps_done", *GAP_FIELDS):
        assert a[key] == b[key], key
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(read_metrics(run_dir)) == drop(read_metrics(tmp_path / "straight" / "cnn/bn/bs2-evalprecise-freeze2/lr0.1/ep3/seed0"))


@pytest.mark.parametrize("preset", ["train_eval_gap", "train_eval_gap_cpu"])
def test_train_eval_gap_presets_have_25_distinct_runs(preset, tiny_data, tmp_path):
    """bn and brn at normalization batch 2..128 with ema and precise (24 runs) plus one gn run."""
    import itertools

    from normbench.compose import compose
    from tests.conftest import compose_cfg

    preset_cfg = compose([f"experiment={preset}"])
    params = preset_cfg.hydra.sweeper.params
    assert params["norm.virtual_batch"] == "2,4,8,16,32,128" and params.eval_stats == "ema,precise"
    names = set()
    for norm, vb, stats in itertools.product(params.norm.split(","), params["norm.virtual_batch"].split(","),
                                             params.eval_stats.split(",")):
        cfg = compose_cfg(tiny_data, tmp_path, [f"experiment={preset}", f"norm={norm}", f"norm.virtual_batch={vb}",
                                                f"eval_stats={stats}"])
        names.add(cfg.run_name)
    assert len(names) == 25


def test_mini_batch_statistics_groups_mix_classes():
    """The splits are stored sorted by class; a group of one class would be normalized with that class's
    statistics. The evaluation groups are a fixed random draw, as training batches are."""
    from normbench import data
    from normbench.evaluation import eval_batches_for

    split = data.Split(torch.zeros(40, 3, 32, 32, dtype=torch.uint8), torch.arange(10).repeat_interleave(4))
    first = [eval_batches_for(split, 8, 4, "cpu") for _ in range(2)]
    groups = [[y[i:i + 4] for _, y in b.epoch() for i in range(0, len(y), 4)] for b in first]
    assert max(len(set(g.tolist())) for g in groups[0]) > 1  # not one class per group
    assert all(torch.equal(a, b) for a, b in zip(*groups))  # the same fixed order every evaluation
    assert sorted(torch.cat(groups[0]).tolist()) == sorted(split.y.tolist())  # every image once
