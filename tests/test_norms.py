"""Tests of normbench.norms: layer definitions, registry <-> conf/norm yaml, weight reparams, PreciseBN.

Tests that concern every norm enumerate the registry (``NORMS``): adding a norm needs no edit here."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from omegaconf import OmegaConf

from normbench import validate
from normbench.errors import UserError
from normbench.models import build_model
from normbench.norms import (
    NORMS,
    NormConfigError,
    NormInfo,
    apply_weight_reparam,
    batch_stat_gaps,
    build_norm,
    check_virtual_batch,
    data_dependent_init,
    is_batch_dependent,
    norm_layer_factory,
    precise_bn_update,
    print_norms,
    recording_batch_stats,
    schedule_scalars,
    set_training_length,
)
from normbench.norms.batch_stat import BatchNorm, BatchStatNorm, MeanOnlyBatchNorm

torch.set_num_threads(1)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "norm"
# The norms whose layers split channels into groups (norm.groups / norm.group_size).
GROUPED = [name for name, info in NORMS.items() if "groups" in info.options]


def structured_input(n=4, c=16, h=5, w=6, seed=0) -> torch.Tensor:
    """Input whose per-sample, per-channel and per-row means and scales all differ, so that a
    norm normalizing over the wrong axes leaves visibly non-normalized units."""
    g = torch.Generator().manual_seed(seed)
    off = 3 * torch.randn(n, c, 1, 1, generator=g)  # per (sample, channel) offset
    scale = 0.5 + 3 * torch.rand(n, c, 1, 1, generator=g)  # per (sample, channel) scale
    row = 2 * torch.randn(n, c, h, 1, generator=g)  # per (sample, channel, row) offset
    return off + scale * (row + torch.randn(n, c, h, w, generator=g))


def units(y: torch.Tensor, grouping: str, groups: int = 8) -> torch.Tensor:
    """(units, elements): the sets of values a norm would normalize together under ``grouping``."""
    n, c = y.shape[:2]
    if grouping == "bn":  # per channel over (N, H, W)
        return y.transpose(0, 1).reshape(c, -1)
    if grouping == "ln":  # per sample over (C, H, W)
        return y.reshape(n, -1)
    if grouping == "gn":  # per sample and group over (C/G, H, W)
        return y.reshape(n * groups, -1)
    if grouping == "in":  # per sample and channel over (H, W)
        return y.reshape(n * c, -1)
    if grouping == "row":  # per sample, channel, row over W
        return y.reshape(-1, y.shape[-1])
    raise AssertionError(grouping)


def is_standardized(y, grouping, tol=1e-3) -> bool:
    u = units(y, grouping)
    mean, var = u.mean(1), u.var(1, unbiased=False)
    return bool((mean.abs().max() < tol) and ((var - 1).abs().max() < tol))


# Positive: groupings a norm standardizes (its own axes + coarser groupings implied by them).
# Negative: groupings it must NOT standardize.
AXES = {
    "bn": ({"bn"}, {"ln", "gn", "in", "row"}),
    "brn": ({"bn"}, {"ln", "gn", "in", "row"}),
    "ln": ({"ln"}, {"bn", "gn", "in", "row"}),
    "gn": ({"gn", "ln"}, {"bn", "in", "row"}),
    "gn_ws": ({"gn", "ln"}, {"bn", "in", "row"}),
    "in": ({"in", "gn", "ln", "bn"}, {"row"}),
}


# ------------------------------------------------------------------------------------------
# Registry, options, yaml
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NORMS)
def test_registry_entry(name):
    info = NORMS[name]
    assert isinstance(info, NormInfo) and info.name == name
    assert info.description and "\n" not in info.description
    assert "virtual_batch" in info.options and info.options["virtual_batch"] is None
    assert not {"apply_act", "norm_name"} & set(info.options)  # what build_norm passes itself
    assert isinstance(build_norm(name, 16), nn.Module) and isinstance(build_norm(name, 16, apply_act=True), nn.Module)


def test_weight_norms_reparametrize_and_the_others_do_not():
    for name, info in NORMS.items():
        conv = apply_weight_reparam(nn.Conv2d(2, 3, 1), name)
        hooks_only = name == "cbn"  # its reparam hooks the conv (to compensate through it) and changes no weight
        assert hasattr(conv, "parametrizations") == (info.reparam is not None and not hooks_only), name


def test_yaml_mirrors_registry():
    files = sorted(CONF_DIR.glob("*.yaml"))
    assert {f.stem for f in files} == set(NORMS)
    for f in files:
        raw = yaml.safe_load(f.read_text())
        cfg = OmegaConf.to_container(OmegaConf.load(f))
        for d in (raw, cfg):
            assert d["name"] == f.stem
            opts = {k: v for k, v in d.items() if k != "name"}
            defaults = dict(NORMS[f.stem].options)
            assert list(opts) == list(defaults), f.name  # same set, same order
            for k, v in opts.items():
                assert v == defaults[k] and type(v) is type(defaults[k]), (f.name, k, v, defaults[k])
        # The model builder's exact call must work.
        c = OmegaConf.load(f)
        m = build_norm(c.name, 16, **{k: v for k, v in c.items() if k != "name"})
        assert isinstance(m, nn.Module)


def test_unknown_name_and_option_errors():
    with pytest.raises(NormConfigError) as e:
        build_norm("batchnorm", 8)
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in NORMS)
    assert isinstance(e.value, ValueError) and isinstance(e.value, UserError)
    with pytest.raises(NormConfigError, match="unknown option"):
        norm_layer_factory("bn", groups=4)  # eager validation
    with pytest.raises(NormConfigError, match="momentum"):
        build_norm("bn", 8, momentum=2.0)
    with pytest.raises(NormConfigError, match="virtual_batch"):
        build_norm("bn", 8, virtual_batch=0)
    with pytest.raises(NormConfigError, match="init"):
        apply_weight_reparam(nn.Conv2d(2, 2, 1), "wn", init="lsuv")
    # None means default.
    bn = build_norm("bn", 8, momentum=None, eps=None, virtual_batch=None)
    assert bn.momentum == 0.1 and bn.eps == 1e-5


def test_norm_layer_factory():
    f = norm_layer_factory("gn", groups=4, eps=1e-3)
    m = f(16)
    assert isinstance(m, nn.GroupNorm) and m.num_groups == 4 and m.eps == 1e-3 and m.num_channels == 16
    assert is_batch_dependent("wn", mean_only_bn=True)
    assert isinstance(build_norm("wn", 8, mean_only_bn=True), MeanOnlyBatchNorm)
    for n in ("wn", "sn"):
        assert isinstance(build_norm(n, 8), nn.Identity)
    assert isinstance(build_norm("gn_ws", 16), nn.GroupNorm)


# Every registry entry with its defaults, and the options that change a norm's batch dependence.
BATCH_DEPENDENCE_CASES = [(name, {}) for name in NORMS] + [("wn", {"mean_only_bn": True})]


@pytest.mark.parametrize("name, opts", BATCH_DEPENDENCE_CASES)
def test_declared_batch_dependence_is_what_the_layer_does(name, opts):
    """A training forward of a sample changes with the rest of its batch exactly where the registry declares
    the norm batch-dependent, and exactly there the slot is a batch-statistics layer (what the modes drive)."""
    layer = set_training_length(build_norm(name, 8, apply_act=True, **opts), 100).train()
    x = structured_input(n=4, c=8)
    with torch.no_grad():
        alone, together = copy.deepcopy(layer)(x[:1]), copy.deepcopy(layer)(x)[:1]
    declared = is_batch_dependent(name, **opts)
    assert declared == (not torch.allclose(alone, together)), (name, opts)
    assert declared == any(isinstance(m, BatchStatNorm) for m in layer.modules()), (name, opts)


def _torch_batch_norm(num_features: int, *, momentum: float = 0.1, eps: float = 1e-5, affine: bool = True,
                      sync: bool = False) -> nn.Module:
    """torch's BatchNorm2d (bn's options): batch-dependent, but no BatchStatNorm, so no mode could drive it."""
    return nn.BatchNorm2d(num_features, eps=eps, momentum=momentum, affine=affine)


def test_batch_dependent_norm_without_a_batch_statistics_layer_is_refused(monkeypatch):
    """Declared batch-dependent, a norm whose layer is not a BatchStatNorm would be skipped by PreciseBN, the
    FrozenBN tail, batch-statistics evaluation, sync and the stat gaps: building it is a one-line error."""
    monkeypatch.setitem(NORMS, "torch_bn", NormInfo("torch_bn", "torch's BatchNorm2d", _torch_batch_norm,
                                                    batch_dependent=True))
    for apply_act in (False, True):
        with pytest.raises(NormConfigError) as e:
            build_norm("torch_bn", 8, apply_act=apply_act)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("norm 'torch_bn': ") and "batch-dependent" in msg
        assert "BatchStatNorm" in msg and "BatchNorm2d" in msg and "PreciseBN" in msg
    with pytest.raises(NormConfigError, match="torch_bn.*batch-dependent"):
        build_model("cnn", "torch_bn")


def test_a_run_with_such_a_norm_is_refused_before_training(make_cfg, monkeypatch):
    """Validation builds the run's model once: the refusal comes before any training, as a one-line UserError."""
    cfg = make_cfg("norm=bn")
    monkeypatch.setitem(NORMS, "bn", NormInfo("bn", "torch's BatchNorm2d", _torch_batch_norm, batch_dependent=True))
    with pytest.raises(UserError) as e:
        validate.check_model(cfg)
    assert "\n" not in str(e.value) and "norm 'bn'" in str(e.value) and "batch-dependent" in str(e.value)


def _batch_norm_declared_independent(num_features: int) -> nn.Module:
    return BatchNorm(num_features)


def test_batch_statistics_layer_of_a_norm_declared_batch_independent_is_refused(monkeypatch):
    monkeypatch.setitem(NORMS, "quiet_bn", NormInfo("quiet_bn", "BN declared batch-independent",
                                                    _batch_norm_declared_independent))
    with pytest.raises(NormConfigError) as e:
        build_norm("quiet_bn", 8)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("norm 'quiet_bn': ") and "batch-independent" in msg
    assert "BatchNorm" in msg


def test_virtual_batch_rule_of_a_run():
    """One rule, which validation applies to the run's batch size and the layers to every training batch:
    a positive integer that divides the batch; the message names the chosen norm."""
    for name, vb, bs in (("bn", None, 6), ("bn", 3, 6), ("bn", 6, 6), ("gn", 2, 8)):
        check_virtual_batch(name, vb, bs)
    with pytest.raises(NormConfigError) as e:
        check_virtual_batch("brn", 4, 6)
    assert str(e.value).startswith("norm 'brn': norm.virtual_batch=4 does not divide batch_size=6; ")
    assert "\n" not in str(e.value) and isinstance(e.value, UserError)
    for bad in (0, -2, 2.0, True, "2"):
        with pytest.raises(NormConfigError, match="norm 'wn': option virtual_batch must be an integer >= 1"):
            check_virtual_batch("wn", bad, 8)
    layer = build_norm("wn", 4, mean_only_bn=True, virtual_batch=4).train()
    with pytest.raises(NormConfigError, match="^norm 'wn': norm.virtual_batch=4 does not divide batch_size=6; "):
        layer(torch.randn(6, 4, 2, 2))  # the same rule at a training forward


def test_print_norms(capsys):
    print_norms()
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == list(NORMS)
    assert all(NORMS[ln.split()[0]].description in ln for ln in lines)


def test_grouped_norms():
    assert {"gn", "gn_ws", "evonorm_s0"} <= set(GROUPED)


@pytest.mark.parametrize("name", GROUPED)
def test_group_count_incompatible_raises(name):
    with pytest.raises(NormConfigError) as e:
        build_norm(name, 12, groups=8)
    msg = str(e.value)
    assert "12" in msg and "groups=8" in msg and "\n" not in msg
    assert msg.startswith(f"norm '{name}': ")  # the norm chosen (gn_ws's layer is group norm's builder)
    with pytest.raises(NormConfigError, match=f"^norm '{name}': .*group_size=5"):
        build_norm(name, 12, group_size=5)
    with pytest.raises(NormConfigError, match="12"):
        norm_layer_factory(name, groups=8)(12)
    with pytest.raises(NormConfigError, match="4"):
        build_norm(name, 4, groups=8)  # fewer channels than groups
    assert build_norm(name, 12, groups=4) is not None
    assert build_norm(name, 12, group_size=3) is not None


# ------------------------------------------------------------------------------------------
# Normalization axes, affine parameters, batch size 1 / 2
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(AXES))
def test_normalization_axes(name):
    torch.manual_seed(0)
    x = structured_input()
    m = set_training_length(build_norm(name, x.shape[1]).train(), 100)
    y = m(x).detach()
    pos, neg = AXES[name]
    for g in pos:
        assert is_standardized(y, g), (name, g)
    for g in neg:
        assert not is_standardized(y, g, tol=0.1), (name, g)
    # the input itself is standardized along no grouping (so the negative checks mean something)
    assert not any(is_standardized(x, g, tol=0.1) for g in ("bn", "ln", "gn", "in", "row"))


def test_mean_only_bn_axes():
    x = structured_input()
    m = build_norm("wn", x.shape[1], mean_only_bn=True).train()
    y = m(x).detach()
    u = units(y, "bn")
    assert u.mean(1).abs().max() < 1e-4
    assert (u.var(1, unbiased=False) - 1).abs().max() > 0.5  # no variance division
    assert units(y, "in").mean(1).abs().max() > 0.1
    m.eval()
    torch.testing.assert_close(m(x), x - m.running_mean.view(1, -1, 1, 1) + m.bias.view(1, -1, 1, 1))


def test_frn_normalizes_second_moment_over_hw():
    x = structured_input()
    m = build_norm("frn", x.shape[1]).train()  # without its activation: no TLU, gamma*x_hat+beta
    assert m.tau is None
    y = m(x).detach()
    u = units(y, "in")
    assert (u.square().mean(1) - 1).abs().max() < 1e-3  # nu^2 over (H, W) = 1
    assert u.mean(1).abs().max() > 0.1  # not centred
    assert (units(y, "row").square().mean(1) - 1).abs().max() > 0.1


@pytest.mark.parametrize("name", NORMS)
def test_per_channel_affine(name):
    """A norm slot with a layer has a per-channel shift (beta = 0) and possibly a scale (gamma = 1); with
    affine=false, where the norm has the option, it has no parameters at all."""
    c = 16
    m = build_norm(name, c)
    params = dict(m.named_parameters())
    if isinstance(m, nn.Identity):  # none, and the weight norms without a slot layer (wn, sn)
        assert not params
        return
    assert params, name
    for pname, p in params.items():
        if pname in ("mean_weight", "var_weight"):  # switchnorm's switch weights: one per statistic, per layer
            assert p.shape == (len(m.importance_weights()) // 2,), (name, pname, p.shape)
            continue
        assert p.shape == (c,), (name, pname, p.shape)
    if "weight" in params:
        assert torch.equal(params["weight"], torch.ones(c))
    assert torch.equal(params["bias"], torch.zeros(c))
    if "affine" in NORMS[name].options:
        assert not dict(build_norm(name, c, affine=False).named_parameters())
    assert isinstance(build_norm("wn", c, mean_only_bn=True).bias, nn.Parameter)


def small_convnet(name: str, c: int = 16, total_steps: int = 100, **opts) -> nn.Module:
    norm = norm_layer_factory(name, **opts)
    model = nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1, bias=False), norm(c, apply_act=True),
        nn.Conv2d(c, c, 3, padding=1, bias=False), norm(c, apply_act=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10),
    )
    set_training_length(model, total_steps)  # Batch Renorm's relaxation is a fraction of the run
    return apply_weight_reparam(model, name, **opts)


@pytest.mark.parametrize("name", NORMS)
@pytest.mark.parametrize("bs", [1, 2])
def test_trains_at_batch_size_1_and_2(name, bs):
    """Not only finite: a few SGD steps on one fixed small batch lower its loss (the layer learns)."""
    torch.manual_seed(0)
    opts = {"init": "data"} if "init" in NORMS[name].options else {}  # wn: data-dependent init
    model = small_convnet(name, total_steps=30, **opts).train()
    x, y = torch.randn(bs, 3, 4, 4), torch.arange(bs)
    data_dependent_init(model, torch.randn(8, 3, 4, 4))  # init batch larger than the training batch
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert all(map(math.isfinite, losses))
    assert losses[-1] < 0.5 * losses[0], (name, bs, losses[0], losses[-1])
    model.eval()
    assert torch.isfinite(model(x)).all()


# ------------------------------------------------------------------------------------------
# Batch norm
# ------------------------------------------------------------------------------------------


def _bn_ref(x, mean, var, w, b, eps):
    shape = (1, -1, 1, 1)
    return (x - mean.view(shape)) / (var.view(shape) + eps).sqrt() * w.view(shape) + b.view(shape)


def test_bn_train_vs_eval():
    torch.manual_seed(0)
    x = structured_input(c=3)
    bn = build_norm("bn", 3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, 0.5, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        bn.running_mean.copy_(torch.tensor([1.0, -1.0, 0.5]))
        bn.running_var.copy_(torch.tensor([2.0, 0.5, 4.0]))
    rm0, rv0 = bn.running_mean.clone(), bn.running_var.clone()
    y_train = bn.train()(x)
    bm, bv = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(y_train, _bn_ref(x, bm, bv, bn.weight, bn.bias, 1e-5))
    # running stats: momentum update with the unbiased batch variance
    n = x.numel() / 3
    torch.testing.assert_close(bn.running_mean, 0.9 * rm0 + 0.1 * bm)
    torch.testing.assert_close(bn.running_var, 0.9 * rv0 + 0.1 * bv * n / (n - 1))
    y_eval = bn.eval()(x)
    torch.testing.assert_close(y_eval, _bn_ref(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, 1e-5))
    assert (y_train - y_eval).abs().max() > 0.5


def test_bn_running_stats_converge():
    torch.manual_seed(0)
    mu, sigma = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([0.5, 2.0, 1.0])
    bn = build_norm("bn", 3).train()
    for _ in range(150):
        bn(mu.view(1, 3, 1, 1) + sigma.view(1, 3, 1, 1) * torch.randn(8, 3, 4, 4))
    torch.testing.assert_close(bn.running_mean, mu, atol=0.1, rtol=0)
    torch.testing.assert_close(bn.running_var, sigma**2, atol=0, rtol=0.1)


def test_bn_virtual_batch_equals_separate_groups():
    torch.manual_seed(0)
    x = structured_input(n=6, c=3)
    w, b = torch.tensor([1.5, 0.5, 2.0]), torch.tensor([0.1, -0.2, 0.3])
    bn = build_norm("bn", 3, virtual_batch=2).train()
    with torch.no_grad():
        bn.weight.copy_(w)
        bn.bias.copy_(b)
        bn.running_mean.fill_(0.5)
        bn.running_var.fill_(2.0)
    rms, rvs, outs = [], [], []
    for chunk in x.split(2):
        rm, rv = torch.full((3,), 0.5), torch.full((3,), 2.0)
        outs.append(F.batch_norm(chunk, rm, rv, w, b, True, 0.1, 1e-5))
        rms.append(rm)
        rvs.append(rv)
    y = bn(x)
    torch.testing.assert_close(y, torch.cat(outs))
    torch.testing.assert_close(bn.running_mean, torch.stack(rms).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack(rvs).mean(0))
    # differs from full-batch BN
    assert (y - F.batch_norm(x, None, None, w, b, True)).abs().max() > 0.1
    with pytest.raises(NormConfigError, match="norm 'bn': norm.virtual_batch=2 does not divide batch_size=5"):
        bn(x[:5])
    bn.eval()(x[:5])  # eval does not use batch statistics


@pytest.mark.parametrize("virtual_batch", [None, 2])
def test_precise_bn_gives_population_stats(virtual_batch):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, bias=False)
    bn = build_norm("bn", 4, virtual_batch=virtual_batch, momentum=0.1)
    model = nn.Sequential(conv, bn)
    # stale running stats from differently distributed data
    model.train()
    for _ in range(3):
        model(torch.randn(4, 3, 6, 6) * 0.5 - 1.0)
    batches = [torch.randn(4, 3, 6, 6) * 3 + 2 for _ in range(7)]
    with torch.no_grad():
        h = torch.cat([conv(xb) for xb in batches[:5]])
    pop_mean, pop_var = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=True)
    before = (bn.running_mean - pop_mean).abs().max()
    w0 = conv.weight.clone()
    model.eval()
    it = iter(batches)
    precise_bn_update(model, it, 5)
    assert len(list(it)) == 2  # used exactly 5 batches
    assert not model.training and not bn.training
    assert torch.equal(conv.weight, w0)
    assert before > 0.5
    torch.testing.assert_close(bn.running_mean, pop_mean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bn.running_var, pop_var, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("norm, num_batches", [("bn", 0), ("gn", 3)])
def test_precise_bn_noop_without_request(norm, num_batches):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), build_norm(norm, 4, **({"groups": 2} if norm == "gn" else {})))
    sd = copy.deepcopy(model.state_dict())
    it = iter([torch.randn(2, 3, 5, 5) for _ in range(3)])
    precise_bn_update(model, it, num_batches)
    assert len(list(it)) == 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k])


# ------------------------------------------------------------------------------------------
# Batch renormalization
# ------------------------------------------------------------------------------------------


def _set_stats(m, mean, var, w=None, b=None):
    with torch.no_grad():
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        if w is not None:
            m.weight.copy_(w)
            m.bias.copy_(b)


def test_brn_with_unit_limits_equals_bn():
    torch.manual_seed(0)
    x = structured_input(c=3)
    w, b = torch.tensor([1.5, 0.5, 2.0]), torch.tensor([0.1, -0.2, 0.3])
    rm, rv = torch.tensor([5.0, -3.0, 0.5]), torch.tensor([9.0, 0.1, 4.0])
    for opts in ({"r_max": 1.0, "d_max": 0.0, "relax_unit": "steps", "relax_start": 0, "r_relax": 0, "d_relax": 0}, {}):
        brn = set_training_length(build_norm("brn", 3, **opts).train(), 1000)  # step 0: limits (1, 0) either way
        bn = build_norm("bn", 3, momentum=0.1).train()
        _set_stats(brn, rm, rv, w, b)
        _set_stats(bn, rm, rv, w, b)
        torch.testing.assert_close(brn(x), bn(x))
        torch.testing.assert_close(brn.running_mean, bn.running_mean)
        torch.testing.assert_close(brn.running_var, bn.running_var)
        torch.testing.assert_close(brn.eval()(x), bn.eval()(x))


def test_brn_clipping_formula():
    torch.manual_seed(0)
    x = structured_input(n=4, c=4)
    bm, bv = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    eps = 1e-5
    sb = (bv + eps).sqrt()
    # channel 0: r clipped up, 1: r clipped down, 2: unclipped; d: 0 clipped +, 1 clipped -, 2/3 inside
    rv = torch.stack([bv[0] / 4, bv[1] * 4, bv[2] * 1.1, bv[3]])
    sig = (rv + eps).sqrt()
    rm = torch.stack([bm[0] - 2 * sig[0], bm[1] + 2 * sig[1], bm[2] - 0.2 * sig[2], bm[3] + 0.3 * sig[3]])
    w, b = torch.tensor([1.5, 0.5, 2.0, 1.0]), torch.tensor([0.1, -0.2, 0.3, 0.0])
    brn = build_norm("brn", 4, momentum=0.01, r_max=1.5, d_max=0.5, relax_unit="steps", relax_start=0, r_relax=0,
                     d_relax=0).train()
    _set_stats(brn, rm, rv, w, b)
    r = (sb / sig).clamp(1 / 1.5, 1.5)
    d = ((bm - rm) / sig).clamp(-0.5, 0.5)
    assert r[0] == 1.5 and r[1] == pytest.approx(1 / 1.5) and 1 / 1.5 < r[2] < 1.5
    assert d[0] == 0.5 and d[1] == -0.5 and abs(d[2]) < 0.5
    s = (1, -1, 1, 1)
    expected = ((x - bm.view(s)) / sb.view(s) * r.view(s) + d.view(s)) * w.view(s) + b.view(s)
    torch.testing.assert_close(brn(x), expected)
    # moving statistics updated with momentum 0.01 after the step
    n = x.numel() / 4
    torch.testing.assert_close(brn.running_mean, rm + 0.01 * (bm - rm))
    torch.testing.assert_close(brn.running_var, rv + 0.01 * (bv * n / (n - 1) - rv))
    # eval: (x - mu) / sigma with the moving statistics
    brn.eval()
    torch.testing.assert_close(
        brn(x), _bn_ref(x, brn.running_mean, brn.running_var, brn.weight, brn.bias, eps)
    )


def test_brn_relaxation_schedule_and_state_dict():
    brn = build_norm("brn", 2, r_max=3.0, d_max=5.0, relax_unit="steps", relax_start=2, r_relax=4, d_relax=2).train()
    x = torch.randn(2, 2, 3, 3)
    seen = []
    for _ in range(7):
        r, d = brn.current_limits()
        seen.append((round(float(r), 6), round(float(d), 6)))
        brn(x)
    assert seen == [(1, 0), (1, 0), (1, 0), (1.5, 2.5), (2, 5), (2.5, 5), (3, 5)]
    assert int(brn.num_steps) == 7
    brn.eval()(x)  # eval does not count
    assert int(brn.num_steps) == 7
    fresh = build_norm("brn", 2, r_max=3.0, d_max=5.0, relax_unit="steps", relax_start=2, r_relax=4, d_relax=2)
    fresh.load_state_dict(brn.state_dict())
    assert int(fresh.num_steps) == 7 and float(fresh.current_limits()[0]) == 3.0


def test_brn_no_gradient_through_r_and_d():
    torch.manual_seed(0)
    x0 = structured_input(n=4, c=3)
    bm, bv = x0.mean((0, 2, 3)), x0.var((0, 2, 3), unbiased=False)
    rm, rv = bm + torch.tensor([0.5, -0.3, 0.2]), bv * torch.tensor([2.0, 0.6, 1.3])  # r != 1, d != 0, unclipped
    brn = build_norm("brn", 3, r_max=10.0, d_max=10.0, relax_unit="steps", relax_start=0, r_relax=0, d_relax=0).train()
    _set_stats(brn, rm, rv)
    upstream = torch.randn_like(x0)

    x = x0.clone().requires_grad_()
    (brn(x) * upstream).sum().backward()
    grad_layer = x.grad

    def manual(detach: bool):
        x = x0.clone().requires_grad_()
        mean = x.mean((0, 2, 3), keepdim=True)
        std_b = (x.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5).sqrt()
        sig = (rv.view(1, -1, 1, 1) + 1e-5).sqrt()
        r, d = std_b / sig, (mean - rm.view(1, -1, 1, 1)) / sig
        if detach:
            r, d = r.detach(), d.detach()
        ((((x - mean) / std_b * r + d)) * upstream).sum().backward()
        return x.grad

    torch.testing.assert_close(grad_layer, manual(detach=True))
    assert (grad_layer - manual(detach=False)).abs().max() > 1e-2  # the test can tell the difference


# ------------------------------------------------------------------------------------------
# Batch-independent layers against their formulas
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("learnable_eps", [False, True])
def test_frn_formula(learnable_eps):
    torch.manual_seed(0)
    x = structured_input(n=2, c=4)
    m = build_norm("frn", 4, apply_act=True, eps=1e-6, learnable_eps=learnable_eps)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([1.5, 0.5, 2.0, 1.0]))
        m.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        m.tau.copy_(torch.tensor([-0.5, 0.0, 0.2, -2.0]))
    eps = 1e-6 + (abs(m.eps_learned.item()) if learnable_eps else 0.0)
    if learnable_eps:
        assert m.eps_learned.item() == pytest.approx(1e-4)
    s = (1, -1, 1, 1)
    nu2 = (x**2).mean(dim=(2, 3), keepdim=True)
    y = m.weight.view(s) * x / torch.sqrt(nu2 + eps) + m.bias.view(s)
    expected = torch.max(y, m.tau.view(s))
    torch.testing.assert_close(m(x), expected)
    assert (m(x) == m.tau.view(s).expand_as(x)).any()  # TLU active somewhere


def test_evonorm_s0_formula():
    torch.manual_seed(0)
    x = structured_input(n=3, c=8)
    m = build_norm("evonorm_s0", 8, apply_act=True, groups=4)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(8))
    n, c, h, w = x.shape
    xg = x.reshape(n, 4, c // 4, h, w)
    std = torch.sqrt(xg.var(dim=(2, 3, 4), unbiased=False, keepdim=True) + 1e-5)
    std = std.expand_as(xg).reshape(n, c, h, w)
    s = (1, -1, 1, 1)
    expected = x * torch.sigmoid(m.v.view(s) * x) / std * m.weight.view(s) + m.bias.view(s)
    torch.testing.assert_close(m(x), expected)
    torch.testing.assert_close(m(x[:1]), expected[:1])  # batch independent


def test_ln_is_layer_norm_over_chw():
    x = structured_input(n=3, c=8)
    m = build_norm("ln", 8, affine=False)
    torch.testing.assert_close(m(x), F.layer_norm(x, x.shape[1:], eps=1e-5))


def test_in_has_no_running_stats():
    x = structured_input(n=3, c=8)
    m = build_norm("in", 8)
    assert not list(m.buffers())
    y_train = m.train()(x)
    torch.testing.assert_close(m.eval()(x), y_train)
    torch.testing.assert_close(y_train, F.instance_norm(x, eps=1e-5))


def test_lrn_alexnet_formula():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 3, 3) * 20
    m = build_norm("lrn", 9, affine=False)
    expected = torch.empty_like(x)
    for c in range(9):  # AlexNet: sum over channels max(0, c-n/2) .. min(C-1, c+n/2), alpha not / n
        lo, hi = max(0, c - 2), min(8, c + 2)
        s = (x[:, lo : hi + 1] ** 2).sum(1)
        expected[:, c] = x[:, c] / (2.0 + 1e-4 * s) ** 0.75
    torch.testing.assert_close(m(x), expected)


# ------------------------------------------------------------------------------------------
# Weight reparametrizations
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exp_g", [False, True])
def test_wn_effective_weight_norm_is_g(exp_g):
    torch.manual_seed(0)
    model = apply_weight_reparam(nn.Sequential(nn.Conv2d(3, 5, 3, bias=False), nn.Flatten(), nn.Linear(20, 4)),
                                 "wn", exp_g=exp_g)
    for mod in (model[0], model[2]):
        param = mod.parametrizations.weight
        with torch.no_grad():
            param.original0.copy_(torch.rand_like(param.original0) + 0.5)
            param.original1.mul_(3.0)
        g = param.original0.flatten()
        g = g.exp() if exp_g else g
        norms = mod.weight.flatten(1).norm(dim=1)
        torch.testing.assert_close(norms, g)
        assert mod.bias is not None  # wn layers get a bias (slot is Identity)
    assert model[0].bias.abs().sum() == 0


@pytest.mark.parametrize("exp_g", [False, True])
def test_wn_data_dependent_init(exp_g):
    torch.manual_seed(0)

    def make():
        return apply_weight_reparam(
            nn.Sequential(
                nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.ReLU(),
                nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 5 * 5, 4),
            ),
            "wn", init="data", exp_g=exp_g,
        )

    model = make()
    x = torch.randn(16, 3, 5, 5) * 3 + 1
    layers = [model[0], model[2], model[5]]
    outs = {}
    hooks = [m.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o.detach())) for i, m in enumerate(layers)]
    with torch.no_grad():
        model(x)
    assert (outs[1].std(dim=(0, 2, 3)) - 1).abs().max() > 0.1  # not already standardized
    data_dependent_init(model, x)
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for i, o in outs.items():
        dims = (0, 2, 3) if o.ndim == 4 else (0,)
        torch.testing.assert_close(o.mean(dims), torch.zeros(o.shape[1]), atol=1e-4, rtol=0)
        torch.testing.assert_close(o.std(dims, unbiased=False), torch.ones(o.shape[1]), atol=1e-4, rtol=0)
    assert all(bool(m.wn_init_done) for m in layers)
    # idempotent: a second call (other data) and a resumed model do nothing
    sd = copy.deepcopy(model.state_dict())
    data_dependent_init(model, torch.randn(16, 3, 5, 5))
    resumed = make()
    resumed.load_state_dict(sd)
    data_dependent_init(resumed, torch.randn(16, 3, 5, 5))
    for k, v in sd.items():
        assert torch.equal(model.state_dict()[k], v) and torch.equal(resumed.state_dict()[k], v), k
    with pytest.raises(ValueError, match="larger init batch"):  # Linear layer: 1 value per channel
        data_dependent_init(make(), x[:1])
    # nothing to init: no-op
    plain = apply_weight_reparam(nn.Sequential(nn.Conv2d(3, 4, 1)), "wn")
    sd = copy.deepcopy(plain.state_dict())
    data_dependent_init(plain, x)
    assert all(torch.equal(v, sd[k]) for k, v in plain.state_dict().items())


def test_sn_largest_singular_value_is_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3), nn.Flatten(), nn.Linear(6 * 3 * 3, 5))
    with torch.no_grad():
        model[0].weight.mul_(5)
        model[2].weight.mul_(5)
    sig0 = torch.linalg.matrix_norm(model[0].weight.reshape(6, -1), ord=2)
    assert sig0 > 1.5
    apply_weight_reparam(model, "sn", n_power_iterations=1).train()
    x = torch.randn(2, 4, 5, 5)
    for _ in range(50):  # power iteration runs in training forwards
        model(x)
    model.eval()
    for mod in (model[0], model[2]):
        w = mod.weight
        sigma = torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2)
        assert abs(sigma.item() - 1.0) < 1e-3


def test_gn_ws_standardizes_conv_weights_only():
    torch.manual_seed(0)
    model = small_convnet("gn_ws")
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            w = mod.weight.flatten(1)
            v = mod.parametrizations.weight.original.flatten(1).var(1, unbiased=False)
            torch.testing.assert_close(w.mean(1), torch.zeros(w.shape[0]), atol=1e-5, rtol=0)
            # (w - mean) / sqrt(var + eps): standardized variance is var / (var + eps)
            torch.testing.assert_close(w.var(1, unbiased=False), v / (v + 1e-5))
            assert (w.var(1, unbiased=False) - 1).abs().max() < 0.01
    assert not hasattr(model[-1], "parametrizations")  # Linear untouched
    n_params = len(list(model.parameters()))
    apply_weight_reparam(model, "gn_ws")  # idempotent
    assert len(list(model.parameters())) == n_params
    conv = nn.Conv2d(2, 2, 1)
    assert apply_weight_reparam(conv, "bn") is conv and not hasattr(conv, "parametrizations")


# ------------------------------------------------------------------------------------------
# Recording batch statistics
# ------------------------------------------------------------------------------------------


def test_recording_batch_stats_and_gaps():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), build_norm("bn", 4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), build_norm("bn", 4, virtual_batch=2), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), build_norm("brn", 4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), build_norm("wn", 4, mean_only_bn=True),
    ).train()
    set_training_length(model, 100)
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    model(x)
    assert batch_stat_gaps(model) == {}  # nothing recorded outside the context
    rm0, rv0 = model[1].running_mean.clone(), model[1].running_var.clone()
    with recording_batch_stats(model):
        model(x)
    gaps = batch_stat_gaps(model)
    assert set(gaps) == {"1", "4", "7", "10"}
    for mean_gap, var_gap in gaps.values():
        assert mean_gap.dim() == 0 and var_gap.dim() == 0
        assert torch.isfinite(mean_gap) and torch.isfinite(var_gap)
    with torch.no_grad():
        h = model[0](x)
    bm, bv = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(model[1].last_batch_mean, bm)
    torch.testing.assert_close(gaps["1"][0], (bm - rm0).abs().mean())
    torch.testing.assert_close(gaps["1"][1], ((bv + 1e-5).log() - (rv0 + 1e-5).log()).abs().mean())
    assert model[4].last_batch_mean.shape == (2, 4)  # one row per ghost batch
    assert gaps["1"][0] > 0 and gaps["10"][1] == 0
    # eval forwards record nothing
    with recording_batch_stats(model.eval()):
        model(x)
    assert batch_stat_gaps(model) == {}


@pytest.mark.parametrize("name,opts", [("bn", {}), ("bn", {"virtual_batch": 2}), ("brn", {"relax_start": 0.0}),
                                       ("wn", {"mean_only_bn": True})])
def test_batch_stat_layers_under_autocast(name, opts):
    torch.manual_seed(0)
    model = small_convnet(name, **opts).train()
    x = torch.randn(4, 3, 4, 4)
    with recording_batch_stats(model), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().square().mean()
    loss.backward()
    assert torch.isfinite(loss)
    for m in model.modules():
        if hasattr(m, "running_mean"):
            assert m.running_mean.dtype == torch.float32 and torch.isfinite(m.running_mean).all()
    assert len(batch_stat_gaps(model)) == 2


# ------------------------------------------------------------------------------------------
# Options that a broken layer would silently ignore (each test fails if the option is dropped)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", GROUPED)
def test_group_size_means_channels_per_group(name):
    """group_size=4 on 24 channels is 6 groups of 4 channels (not 4 groups of 6)."""
    m = build_norm(name, 24, group_size=4)
    assert (m.num_groups if hasattr(m, "num_groups") else m.groups) == 6
    if name != "evonorm_s0":
        y = m(structured_input(c=24)).detach()
        per_group = y.reshape(4 * 6, -1)  # (sample, group of 4 channels)
        assert per_group.mean(1).abs().max() < 1e-4 and (per_group.var(1, unbiased=False) - 1).abs().max() < 1e-3


def test_ghost_brn_equals_brn_group_by_group():
    torch.manual_seed(0)
    x = structured_input(n=6, c=3)
    opts = dict(r_max=1.5, d_max=0.5, relax_unit="steps", relax_start=0, r_relax=0, d_relax=0)
    rm, rv = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([4.0, 0.5, 9.0])
    ghost = build_norm("brn", 3, virtual_batch=2, **opts).train()
    _set_stats(ghost, rm, rv)
    singles = []
    for g in range(3):
        layer = build_norm("brn", 3, **opts).train()
        _set_stats(layer, rm, rv)
        singles.append((layer, layer(x[2 * g:2 * g + 2])))
    torch.testing.assert_close(ghost(x), torch.cat([out for _, out in singles]))
    # running statistics: the average of the three groups' updates from the same start
    torch.testing.assert_close(ghost.running_mean, torch.stack([m.running_mean for m, _ in singles]).mean(0))
    torch.testing.assert_close(ghost.running_var, torch.stack([m.running_var for m, _ in singles]).mean(0))
    plain = build_norm("brn", 3, **opts).train()
    _set_stats(plain, rm, rv)
    assert not torch.allclose(plain(x), ghost.eval().train()(x))  # the grouping matters for this input


@pytest.mark.parametrize("n_iter", [1, 4])
def test_spectral_norm_runs_its_power_iterations(n_iter):
    """One training forward does exactly n_power_iterations steps from the stored (u, v)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3)
    apply_weight_reparam(conv, "sn", n_power_iterations=n_iter)
    sn = conv.parametrizations.weight[0]
    w = conv.parametrizations.weight.original.detach().flatten(1)
    g = torch.Generator().manual_seed(1)
    u0, v0 = F.normalize(torch.randn(5, generator=g), dim=0), F.normalize(torch.randn(27, generator=g), dim=0)
    sn._u.copy_(u0)
    sn._v.copy_(v0)
    conv.train()
    got = conv.weight.detach().flatten(1)
    u, v = u0, v0
    for _ in range(n_iter):  # torch's order: u from v, then v from u
        u = F.normalize(w @ v, dim=0)
        v = F.normalize(w.T @ u, dim=0)
    sigma = u @ w @ v
    torch.testing.assert_close(got, w / sigma)
    u1 = F.normalize(w @ v0, dim=0)
    sigma_one_step = u1 @ w @ F.normalize(w.T @ u1, dim=0)
    assert (n_iter == 1) == torch.allclose(got, w / sigma_one_step)


def test_weight_norm_with_exp_g_starts_at_the_original_weight():
    torch.manual_seed(0)
    for opts in ({"exp_g": True}, {"exp_g": False}):
        conv = nn.Conv2d(3, 4, 3)
        original = conv.weight.detach().clone()
        apply_weight_reparam(conv, "wn", **opts)
        torch.testing.assert_close(conv.weight, original)
        if opts["exp_g"]:  # the trained parameter is s = log ||v||
            torch.testing.assert_close(conv.parametrizations.weight.original0.exp().flatten(),
                                       original.flatten(1).norm(dim=1))


def test_frn_learnable_eps_stays_positive():
    """eps_total = eps + |eps_l|: a negative learned eps_l must not make the denominator negative."""
    m = build_norm("frn", 2, apply_act=True, learnable_eps=True)
    with torch.no_grad():
        m.eps_learned.fill_(-1e-3)
        m.weight.fill_(1.0)
    x = torch.zeros(1, 2, 3, 3)
    x[0, 0] = 0.01  # a tiny response: nu2 = 1e-4, so the sign of eps decides the result
    out = m(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 0], torch.full((3, 3), 0.01 / math.sqrt(1e-4 + 1e-6 + 1e-3)))


def test_frn_and_evonorm_without_activation():
    """apply_act=False: FRN without its TLU (no tau), EvoNorm-S0 without its gate (gamma x + beta)."""
    x = structured_input(n=2, c=8)
    frn = build_norm("frn", 8)
    assert frn.tau is None and (frn(x) < 0).any()
    evo = build_norm("evonorm_s0", 8)
    with torch.no_grad():
        evo.weight.copy_(torch.linspace(0.5, 2, 8))
        evo.bias.fill_(0.3)
    assert evo.v is None
    torch.testing.assert_close(evo(x), x * evo.weight.view(1, -1, 1, 1) + 0.3)


def test_brn_relaxes_within_a_short_run():
    """Fractions of the run: a 100-step run keeps (1, 0) for 20 steps, d_max reaches 5 at step 40
    and r_max reaches 3 at step 60."""
    brn = set_training_length(build_norm("brn", 2).train(), 100)
    x = torch.randn(4, 2, 3, 3)
    limits = {}
    for step in range(80):
        limits[step] = tuple(round(float(v), 4) for v in brn.current_limits())
        brn(x)
    assert limits[0] == limits[20] == (1.0, 0.0)
    assert limits[30] == (1.5, 2.5)
    assert limits[40][1] == 5.0 and limits[40][0] < 3
    assert limits[60] == (3.0, 5.0) == limits[79]
    assert schedule_scalars(brn) == {"brn/r_max": torch.tensor(3.0), "brn/d_max": torch.tensor(5.0)}
    sn = build_norm("switchnorm", 4)
    with torch.no_grad():
        sn.mean_weight.copy_(torch.tensor([0.0, 0.0, math.log(2.0)]))  # softmax: 1/4, 1/4, 1/2
    reported = schedule_scalars(nn.Sequential(sn, build_norm("switchnorm", 4)))  # the mean over its layers
    assert reported["switchnorm/mean_bn"] == pytest.approx((0.5 + 1 / 3) / 2)
    assert reported["switchnorm/var_in"] == pytest.approx(1 / 3) and len(reported) == 6
    with pytest.raises(RuntimeError, match="set_training_length"):
        build_norm("brn", 2).train()(x)  # a fraction of an unknown length is refused, not guessed
    with pytest.raises(NormConfigError, match="fraction"):
        build_norm("brn", 2, r_relax=2.0)
    with pytest.raises(NormConfigError, match="^norm 'brn': option relax_unit must be one of fraction, steps"):
        build_norm("brn", 2, relax_unit="epochs")


# ------------------------------------------------------------------------------------------
# Written-out gradients and fused paths (issue 13): the same function as the plain formula
# ------------------------------------------------------------------------------------------


def _grads(fn, x, upstream, params=()):
    x = x.clone().requires_grad_()
    out = fn(x)
    return (out, *torch.autograd.grad(out, [x, *params], upstream))


@pytest.mark.parametrize("size, beta, alpha, k", [(5, 0.75, 1e-4, 2.0), (5, 0.75, 0.5, 1.0), (4, 0.6, 0.3, 1.0),
                                                  (1, 0.75, 0.2, 1.0)])
def test_lrn_values_and_gradients_equal_torch(size, beta, alpha, k):
    """The hand-written backward (and the sqrt form of D^-3/4) against autograd of torch's LRN; a large
    alpha makes the cross-channel term of the gradient matter."""
    torch.manual_seed(0)
    x = torch.randn(3, 7, 4, 5, dtype=torch.double) * 3
    upstream = torch.randn_like(x)
    m = build_norm("lrn", 7, size=size, alpha=alpha, beta=beta, k=k, affine=False).double()
    ours = _grads(m, x, upstream)
    ref = _grads(lambda t: F.local_response_norm(t, size, alpha * size, beta, k), x, upstream)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)
    assert (ref[1] - upstream * (k + alpha * x**2) ** -beta).abs().max() > 1e-3  # the coupling term is there


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("size, beta, alpha, k", [(5, 0.75, 1e-4, 2.0), (5, 0.75, 0.5, 1.0), (4, 0.6, 0.3, 1.0)])
def test_lrn_low_precision_path_is_the_formula(size, beta, alpha, k, memory_format, affine):
    """The float32 function a bf16 input goes through (window sums as a matrix product, the affine inside)
    is LRN's formula: on a float32 input, values and every gradient within float32 rounding of the exact
    path in float64, the input's layout kept, the input untouched."""
    from normbench.norms.layers import _local_response_norm_float32

    torch.manual_seed(0)
    m = build_norm("lrn", 10, size=size, alpha=alpha, beta=beta, k=k, affine=affine)
    if affine:
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_()
    x = (2 * torch.randn(3, 10, 5, 6)).contiguous(memory_format=memory_format)
    upstream = torch.randn_like(x)
    x_in = x.clone().requires_grad_()
    out = _local_response_norm_float32(x_in, m.weight, m.bias, size, alpha, beta, k)  # float32: eager
    ours = (out, *torch.autograd.grad(out, [x_in, *m.parameters()], upstream))
    exact = copy.deepcopy(m).double()
    ref = _grads(exact, x.double(), upstream.double(), list(exact.parameters()))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    assert out.is_contiguous(memory_format=memory_format) and torch.equal(x_in.detach(), x)


def test_evonorm_s0_gradients_equal_autograd_of_formula():
    torch.manual_seed(0)
    x = structured_input(n=3, c=8).double()
    m = build_norm("evonorm_s0", 8, apply_act=True, groups=4).double()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(8))
    upstream = torch.randn_like(x)

    def formula(t):
        n, c, h, w = t.shape
        std = (t.reshape(n, 4, -1).var(-1, unbiased=False) + 1e-5).sqrt().repeat_interleave(2, 1).view(n, c, 1, 1)
        s = (1, -1, 1, 1)
        return t * torch.sigmoid(m.v.view(s) * t) / std * m.weight.view(s) + m.bias.view(s)

    params = list(m.parameters())
    for a, b in zip(_grads(m, x, upstream, params), _grads(formula, x, upstream, params)):
        torch.testing.assert_close(a, b)


def test_frn_gradients_equal_autograd_of_formula():
    torch.manual_seed(0)
    x = structured_input(n=2, c=4).double()
    m = build_norm("frn", 4, apply_act=True, learnable_eps=True).double()
    with torch.no_grad():
        for p in (m.weight, m.bias, m.tau):
            p.copy_(torch.randn(4))
    upstream = torch.randn_like(x)

    def formula(t):
        s = (1, -1, 1, 1)
        nu2 = t.square().mean((2, 3), keepdim=True)
        y = m.weight.view(s) * t / (nu2 + 1e-6 + m.eps_learned.abs()).sqrt() + m.bias.view(s)
        return torch.maximum(y, m.tau.view(s))

    params = list(m.parameters())
    ours, ref = _grads(m, x, upstream, params), _grads(formula, x, upstream, params)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)
    assert (ref[0] == m.tau.view(1, -1, 1, 1)).any()  # the TLU clips somewhere


@pytest.mark.parametrize("virtual_batch", [None, 2])
def test_brn_fused_path_equals_batch_stats_path(virtual_batch):
    """BRN's fused forward (torch's batch-norm kernel with r gamma, d gamma + beta) against the same layer
    through ``_batch_stats`` and autograd (its synchronized path, here in one process): outputs, every
    gradient, running statistics and step count, with r and d away from (1, 0)."""
    torch.manual_seed(0)
    x = structured_input(n=4, c=3).double()
    upstream = torch.randn_like(x)
    layers = []
    for _ in range(2):
        brn = build_norm("brn", 3, r_max=1.3, d_max=0.4, relax_unit="steps", relax_start=0, r_relax=0, d_relax=0,
                         virtual_batch=virtual_batch).double().train()
        _set_stats(brn, torch.tensor([0.5, -1.0, 0.2]), torch.tensor([2.0, 0.5, 9.0]),
                   torch.tensor([1.5, 0.5, 2.0]), torch.tensor([0.1, -0.2, 0.3]))
        layers.append(brn)
    fused, reference = layers
    groups = 1 if virtual_batch is None else 4 // virtual_batch
    params = [fused.weight, fused.bias]
    out_f, gx_f, gw_f, gb_f = _grads(fused, x, upstream, params)
    out_r, gx_r, gw_r, gb_r = _grads(lambda t: reference._renormalize_with_batch_stats(t, groups, True), x, upstream,
                                     [reference.weight, reference.bias])
    for a, b in ((out_f, out_r), (gx_f, gx_r), (gw_f, gw_r), (gb_f, gb_r),
                 (fused.running_mean, reference.running_mean), (fused.running_var, reference.running_var)):
        torch.testing.assert_close(a, b)
    assert int(fused.num_steps) == 1 and fused._steps == 1


@pytest.mark.parametrize("virtual_batch", [None, 2])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
def test_batch_statistics_without_gradients_are_the_fused_kernels_bit_for_bit(virtual_batch, memory_format):
    """The statistics BRN corrects with (and recording reads), taken without the kernel's output, are those
    of torch's training-mode batch-norm kernel on what it normalizes, bit for bit: its mean, and
    var = 1/invstd^2 - eps from its invstd, as float32 runs have always computed them (inputs of every
    scale and offset, both layouts)."""
    layer = build_norm("brn", 6, virtual_batch=virtual_batch, eps=1e-3)
    g = torch.Generator().manual_seed(0)
    for scale, offset in [(1e-3, 0.0), (1.0, 0.0), (3.0, 100.0), (1e3, -5.0)]:
        x = (offset + scale * torch.randn(8, 6, 5, 7, generator=g)).contiguous(memory_format=memory_format)
        groups = 1 if virtual_batch is None else 8 // virtual_batch
        stats = layer._batch_stats_no_grad(x, groups)
        k = 8 // groups
        # what the fused training forward normalizes: x itself, or the groups folded into channels (a copy)
        folded = x if groups == 1 else x.reshape(groups, k, 6, -1).transpose(0, 1).reshape(k, groups * 6, -1)
        _, mean, invstd = torch.native_batch_norm(folded, None, None, None, None, True, 0.0, 1e-3)
        assert torch.equal(stats.mean, mean.view(groups, 6))
        assert torch.equal(stats.var, (invstd.square().reciprocal() - 1e-3).view(groups, 6))


def test_the_readme_tables_are_the_registry():
    """README.md's norm table and "what each remedy is for" are `normbench-norms --markdown`, so a norm added to
    the registry (or a description changed there) shows in the README only through the registry
    (`normbench-norms --update-readme README.md` puts them in place)."""
    from normbench.norms.registry import README_BEGIN, README_END, norms_markdown, update_readme

    path = Path(__file__).resolve().parents[1] / "README.md"
    readme = path.read_text()
    assert readme[readme.index(README_BEGIN) + len(README_BEGIN):readme.index(README_END)] == norms_markdown()
    for name, info in NORMS.items():
        assert f"| `{name}` | {info.description.replace('|', chr(92) + '|')} |" in norms_markdown()
    assert {f"| `{name}` |" for name, info in NORMS.items() if info.remedy} <= set(
        line[:line.index("|", 2) + 1] for line in norms_markdown().split("What each remedy")[1].splitlines()
        if line.startswith("| `"))
