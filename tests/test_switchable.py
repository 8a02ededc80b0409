"""Switchable Normalization (Luo et al., ICLR 2019) against the authors' SwitchNorm2d, transcribed below in
float64: training forward and autograd's gradients (input, gamma, beta, both switch weights), the running
statistics it moves, evaluation with them, for both choices of statistics; ghost batches, PreciseBN,
batch-statistics evaluation, the FrozenBN tail, the stat gaps; exact resume; a test per option."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

from normbench.norms import (
    NormConfigError,
    batch_stat_gaps,
    batch_stats_mode,
    build_norm,
    freeze_batch_stats,
    is_batch_dependent,
    precise_bn_update,
    recording_batch_stats,
)
from normbench.norms.batch_stat import BatchStatNorm
from normbench.norms.switchable import SwitchNorm, SwitchNormPerSample
from tests.conftest import assert_same_forward_backward, assert_same_parameter_gradients

torch.set_num_threads(1)

C = 6


def reference_switch_norm_2d(x, running_mean, running_var, weight, bias, mean_weight, var_weight, keep, eps, training,
                             using_bn=True):
    """SwitchNorm2d.forward (switchablenorms/Switchable-Normalization, devkit/ops/switchable_norm.py,
    using_moving_average=True), written out: its ``momentum`` is ``keep`` (the weight of the old value), its
    buffers (1, C, 1) are passed and returned; returns the output and the new running mean and variance."""
    n, c, h, w = x.shape
    x = x.view(n, c, -1)
    mean_in = x.mean(-1, keepdim=True)
    var_in = x.var(-1, keepdim=True)
    mean_ln = mean_in.mean(1, keepdim=True)
    temp = var_in + mean_in ** 2
    var_ln = temp.mean(1, keepdim=True) - mean_ln ** 2
    if using_bn:
        if training:
            mean_bn = mean_in.mean(0, keepdim=True)
            var_bn = temp.mean(0, keepdim=True) - mean_bn ** 2
            running_mean = running_mean * keep + (1 - keep) * mean_bn.detach()
            running_var = running_var * keep + (1 - keep) * var_bn.detach()
        else:
            mean_bn, var_bn = running_mean, running_var
    mean_weight, var_weight = torch.softmax(mean_weight, 0), torch.softmax(var_weight, 0)
    if using_bn:
        mean = mean_weight[0] * mean_in + mean_weight[1] * mean_ln + mean_weight[2] * mean_bn
        var = var_weight[0] * var_in + var_weight[1] * var_ln + var_weight[2] * var_bn
    else:
        mean = mean_weight[0] * mean_in + mean_weight[1] * mean_ln
        var = var_weight[0] * var_in + var_weight[1] * var_ln
    x = (x - mean) / (var + eps).sqrt()
    x = x.view(n, c, h, w)
    return x * weight.view(1, c, 1, 1) + bias.view(1, c, 1, 1), running_mean, running_var


def _layer(statistics="in_ln_bn", **opts):
    """The layer in float64 with its parameters off their initial values."""
    torch.manual_seed(0)
    layer = build_norm("switchnorm", C, statistics=statistics, **opts).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
        layer.mean_weight.normal_()
        layer.var_weight.normal_()
    return layer


def _input(batch, seed, size=(5, 4)):
    g = torch.Generator().manual_seed(seed)
    # channels and samples with their own means and scales: IN's, LN's and BN's statistics all differ
    scale = torch.rand(batch, C, 1, 1, generator=g, dtype=torch.double) * 2 + 0.5
    shift = torch.randn(batch, C, 1, 1, generator=g, dtype=torch.double)
    return torch.randn(batch, C, *size, generator=g, dtype=torch.double) * scale + shift


def _reference(layer, x, running, training, using_bn=True, momentum=0.1, eps=1e-5):
    """The reference on ``layer``'s current parameters (detached copies with gradients) and ``running``, with
    the option values given (not read from the layer)."""
    params = {k: p.detach().clone().requires_grad_() for k, p in layer.named_parameters()}
    out, rm, rv = reference_switch_norm_2d(x, *running, params["weight"], params["bias"], params["mean_weight"],
                                           params["var_weight"], 1 - momentum, eps, training, using_bn)
    return out, (rm, rv), params


def _zero_running():
    return torch.zeros(1, C, 1, dtype=torch.double), torch.zeros(1, C, 1, dtype=torch.double)


@pytest.mark.parametrize("eps, momentum", [(1e-5, 0.1), (0.1, 0.3)])
@pytest.mark.parametrize("batch", [1, 2, 8])
@pytest.mark.parametrize("statistics", ["in_ln_bn", "in_ln"])
def test_switchnorm_trains_and_evaluates_as_the_reference(statistics, batch, eps, momentum):
    """Three training steps (output, the input's and every parameter's gradient, the running statistics from
    the reference's zero init), then an evaluation forward: equal to SwitchNorm2d in float64. Each option's
    value is the reference's (using_bn = BN among the statistics, keep = 1 - momentum, eps): ignoring
    statistics, eps or momentum fails it."""
    using_bn = statistics == "in_ln_bn"
    layer = _layer(statistics, eps=eps, momentum=momentum)
    running = _zero_running()
    for step in range(3):
        x = _input(batch, step)
        upstream = torch.randn_like(x)
        running, ref = assert_same_forward_backward(
            layer, lambda x_ref: _reference(layer, x_ref, running, True, using_bn, momentum, eps), x, upstream)
        assert_same_parameter_gradients(layer, ref)
        for p in layer.parameters():
            with torch.no_grad():  # an SGD step, so that later steps see other switch weights
                p.sub_(0.1 * p.grad)
            p.grad = None
        if using_bn:
            torch.testing.assert_close(layer.running_mean, running[0].flatten())
            torch.testing.assert_close(layer.running_var, running[1].flatten())
    layer.eval()
    x = _input(3, 9)
    torch.testing.assert_close(layer(x), _reference(layer, x, running, False, using_bn, momentum, eps)[0])
    assert isinstance(layer, SwitchNorm if using_bn else SwitchNormPerSample)
    assert layer.mean_weight.shape == layer.var_weight.shape == (3 if using_bn else 2,)


def test_initial_values_are_the_references_and_importance_weights_are_the_softmax():
    layer = build_norm("switchnorm", C)
    assert torch.equal(layer.weight, torch.ones(C)) and torch.equal(layer.bias, torch.zeros(C))
    assert torch.equal(layer.running_mean, torch.zeros(C)) and torch.equal(layer.running_var, torch.zeros(C))
    assert all(abs(w.item() - 1 / 3) < 1e-7 for w in layer.importance_weights().values())
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([0.0, 1.0, 2.0]))
        layer.var_weight.copy_(torch.tensor([2.0, 0.0, -1.0]))
    w = layer.importance_weights()
    assert list(w) == ["mean_in", "mean_ln", "mean_bn", "var_in", "var_ln", "var_bn"]
    torch.testing.assert_close(torch.stack([w["mean_in"], w["mean_ln"], w["mean_bn"]]),
                               torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0))
    torch.testing.assert_close(w["var_bn"], torch.softmax(torch.tensor([2.0, 0.0, -1.0]), 0)[2])
    assert list(build_norm("switchnorm", C, statistics="in_ln").importance_weights()) == [
        "mean_in", "mean_ln", "var_in", "var_ln"]


@pytest.mark.parametrize("statistics", ["in_ln_bn", "in_ln"])
def test_statistics_decide_batch_dependence(statistics):
    """With BN among the statistics a sample's training output changes with the rest of its batch and the
    layer is a BatchStatNorm with running statistics; without, neither (and it is declared so)."""
    layer = _layer(statistics)
    a, b = _input(2, 0), _input(2, 1) * 3
    first, second = layer(torch.cat([a, b[:1]]))[:2], layer(torch.cat([a, b[1:]]))[:2]
    dependent = statistics == "in_ln_bn"
    assert is_batch_dependent("switchnorm", statistics=statistics) == dependent
    assert isinstance(layer, BatchStatNorm) == dependent
    assert ((first - second).abs().max() > 1e-3) == dependent
    assert bool(dict(layer.named_buffers())) == dependent


def test_ghost_batches_take_bn_statistics_per_group():
    """virtual_batch=2 on a batch of 6: each pair through its own copy of the layer (output, gradients), the
    running statistics moved by the mean of the three copies' updates; without the option it differs."""
    ghost, whole = _layer(virtual_batch=2), _layer()
    alone = [copy.deepcopy(ghost) for _ in range(3)]
    x = _input(6, 0)
    upstream = torch.randn_like(x)
    out = ghost(x)
    expected = torch.cat([m(x[2 * g:2 * g + 2]) for g, m in enumerate(alone)])
    torch.testing.assert_close(out, expected)
    out.backward(upstream)
    expected.backward(upstream)
    for name, p in ghost.named_parameters():
        torch.testing.assert_close(p.grad, sum(dict(m.named_parameters())[name].grad for m in alone), msg=name)
    for key in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(ghost, key), torch.stack([getattr(m, key) for m in alone]).mean(0))
    assert (whole(x) - out).abs().max() > 1e-3


@pytest.mark.parametrize("virtual_batch", [None, 2])
def test_precise_bn_sets_the_population_statistics_in_the_running_form(virtual_batch):
    """PreciseBN over three batches: running_mean and running_var become the reference's mu_bn and var_bn of
    all the samples together (mean of the unbiased IN variances plus the biased variance of the IN means),
    whatever the ghost batches; the parameters stay."""
    layer = _layer(virtual_batch=virtual_batch)
    params = copy.deepcopy(dict(layer.named_parameters()))
    batches = [_input(4, seed) for seed in range(3)]
    precise_bn_update(layer, batches, 3)
    _, mean, var = reference_switch_norm_2d(torch.cat(batches), *_zero_running(), params["weight"],
                                          params["bias"], params["mean_weight"], params["var_weight"], 0.0, 1e-5, True)
    torch.testing.assert_close(layer.running_mean, mean.flatten())
    torch.testing.assert_close(layer.running_var, var.flatten())
    assert all(torch.equal(p, params[k]) for k, p in layer.named_parameters())


def test_batch_statistics_evaluation_uses_each_groups_bn_statistics():
    """Evaluation with batch statistics in groups of 2: each group as the reference's training forward alone;
    no running statistic moves."""
    layer = _layer()
    x = _input(6, 0)
    with torch.no_grad(), batch_stats_mode(layer, 2):
        out = layer(x)
    expected = torch.cat([_reference(layer, x[g:g + 2], _zero_running(), True)[0] for g in (0, 2, 4)])
    torch.testing.assert_close(out, expected)
    assert not layer.running_mean.any() and not layer.running_var.any() and layer.training


def test_frozen_tail_normalizes_with_the_running_statistics_and_trains_the_switch():
    """The FrozenBN tail: the reference's evaluation forward (BN's branch from the running statistics, which
    stay), with its gradients to the input and every parameter, the switch weights included."""
    layer = _layer()
    for seed in range(2):
        layer(_input(4, seed))
    running = (layer.running_mean.clone().view(1, C, 1), layer.running_var.clone().view(1, C, 1))
    freeze_batch_stats(layer)
    x = _input(4, 5)
    upstream = torch.randn_like(x)
    _, ref = assert_same_forward_backward(layer, lambda x_ref: _reference(layer, x_ref, running, False), x, upstream)
    assert_same_parameter_gradients(layer, ref)
    assert layer.mean_weight.grad[2].abs() > 0
    assert torch.equal(layer.running_mean, running[0].flatten()) and torch.equal(layer.running_var,
                                                                                 running[1].flatten())


def test_recorded_gaps_are_those_of_the_bn_branch():
    layer = _layer()
    layer(_input(4, 0))
    running = layer.running_mean.clone(), layer.running_var.clone()
    x = _input(4, 1)
    with torch.no_grad(), recording_batch_stats(layer):
        layer(x)
    x = x.float()  # the base class records in float32
    mean_in, var_in = x.flatten(2).mean(-1), x.flatten(2).var(-1)
    mean_bn = mean_in.mean(0)
    var_bn = (var_in + mean_in ** 2).mean(0) - mean_bn ** 2
    torch.testing.assert_close(layer.last_batch_mean, mean_bn)
    mean_gap, var_gap = batch_stat_gaps(layer)[""]
    torch.testing.assert_close(mean_gap, (mean_bn - running[0]).abs().mean())
    torch.testing.assert_close(var_gap, ((var_bn + 1e-5).log() - (running[1] + 1e-5).log()).abs().mean())


@pytest.mark.parametrize("statistics", ["in_ln_bn", "in_ln"])
def test_state_dict_resumes_training_exactly(statistics):
    """Three SGD steps, save, load into a fresh layer and optimizer, three more: bit for bit the uninterrupted
    six (float32)."""

    def train(layer, opt, seeds):
        for seed in seeds:
            x = _input(4, seed).float()
            loss = (layer(x) * torch.linspace(-1, 1, x.numel()).view(x.shape)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()

    def fresh():
        torch.manual_seed(1)
        layer = build_norm("switchnorm", C, statistics=statistics, momentum=0.3)
        return layer, torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)

    straight, straight_opt = fresh()
    train(straight, straight_opt, range(6))
    first, first_opt = fresh()
    train(first, first_opt, range(3))
    buffer = io.BytesIO()
    torch.save({"layer": first.state_dict(), "opt": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed, resumed_opt = fresh()
    resumed.load_state_dict(saved["layer"])
    resumed_opt.load_state_dict(saved["opt"])
    train(resumed, resumed_opt, range(3, 6))
    final, expected = resumed.state_dict(), straight.state_dict()
    assert list(final) == list(expected) and all(torch.equal(final[k], expected[k]) for k in final)
    assert final["mean_weight"].ne(1).all()  # the switch weights trained


def test_option_values_are_checked_and_sync_is_not_offered():
    with pytest.raises(NormConfigError, match="statistics"):
        build_norm("switchnorm", C, statistics="bn")
    with pytest.raises(NormConfigError, match="unknown option"):
        build_norm("switchnorm", C, sync=True)
    with pytest.raises(NormConfigError, match="virtual_batch"):
        build_norm("switchnorm", C, virtual_batch=4)(torch.randn(6, C, 3, 3))


def test_a_one_pixel_map_is_finite():
    """At H*W = 1 the reference's unbiased var_in is NaN; here it is 0 (S - 1 taken as 1), the rest as defined."""
    layer = _layer()
    x = torch.randn(2, C, 1, 1, dtype=torch.double, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


def test_bf16_autocast_computes_in_float32_without_bn_too():
    """statistics=in_ln, which the registry-wide bf16 tests do not build (its own compiled graph): a bf16 output
    within bf16 rounding of the float32 layer's on the same values, float32 parameter gradients close to its."""
    torch.manual_seed(0)
    layer32 = build_norm("switchnorm", 8, statistics="in_ln")
    layer16 = copy.deepcopy(layer32)
    x = (torch.randn(4, 8, 6, 6) * 0.5 + 8).bfloat16()
    upstream = torch.randn(4, 8, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = layer16(x)
    out32 = layer32(x.float())
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), out32, rtol=1e-2, atol=1e-2)
    out16.float().backward(upstream)
    out32.backward(upstream.bfloat16().float())
    for (name, p16), p32 in zip(layer16.named_parameters(), layer32.parameters()):
        assert p16.grad.dtype == torch.float32, name
        torch.testing.assert_close(p16.grad, p32.grad, rtol=1e-3, atol=1e-3 * p32.grad.abs().max().item(), msg=name)


def test_trains_in_a_model_at_batch_1():
    """At batch 1 the BN branch's statistics over (N, H, W) are those of the one sample: a small CNN learns."""
    torch.manual_seed(0)
    from normbench.models import build_model

    model = build_model("cnn", "switchnorm").train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(1, 3, 16, 16), torch.tensor([3])
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("statistics, virtual_batch", [("in_ln_bn", None), ("in_ln_bn", 2), ("in_ln", None)])
def test_a_channels_last_map_stays_channels_last(statistics, virtual_batch):
    """The registry trains it channels-last under bf16: the same values (training and evaluation) and gradient
    as a contiguous map, in that layout, without a copy to contiguous in between."""
    layer = _layer(statistics, virtual_batch=virtual_batch)
    x = _input(4, 0, size=(5, 5))
    upstream = torch.randn_like(x)
    for training in (True, False):
        layer.train(training)
        x_last = x.contiguous(memory_format=torch.channels_last).requires_grad_()
        x_plain = x.clone().requires_grad_()
        out_last, out_plain = copy.deepcopy(layer)(x_last), copy.deepcopy(layer)(x_plain)
        torch.testing.assert_close(out_last, out_plain)
        assert out_last.is_contiguous(memory_format=torch.channels_last)
        out_last.backward(upstream)
        out_plain.backward(upstream)
        torch.testing.assert_close(x_last.grad, x_plain.grad)
