"""Cross-Iteration Batch Normalization (Yao et al. 2021) against the authors' CBatchNorm2d, in float64.

``reference_cbn`` below is CBatchNorm2d.forward of github.com/Howal/Cross-iterationBatchNorm
(mmdet/models/utils/CBN.py) written out, with the state it keeps in lists: statistics pooled over the current and
``buffer_num`` past iterations, each past mean and E[x^2] moved to the current conv weight through the gradients
that ``torch.autograd.grad`` gives, entries with a negative compensated variance left out. The layer is checked
against it over several steps with the conv's weights changing between them (so that the compensation matters),
for its forward, every gradient, the running statistics and the evaluation; then a test per option, ghost
batches, checkpoint/resume, the placement rule and the model-wide modes.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from normbench.models import build_model
from normbench.norms import (
    NormConfigError,
    apply_weight_reparam,
    batch_stats_mode,
    build_norm,
    freeze_batch_stats,
    precise_bn_update,
    recording_batch_stats,
)

torch.set_num_threads(1)

C_IN, C = 3, 4


class ReferenceCBN:
    """The authors' CBatchNorm2d (two_stage=True, track_running_stats=True, affine) with its forward written out;
    ``forward(input, weight)`` is theirs line for line, the state in attributes. Two switches name the places
    where the layer follows the paper and BN instead of the reference's defaults: ``out_p=True`` (the reference's
    own option: eps inside the square root) and ``unbiased_plain`` (the reference's un-pooled branch normalizes
    with the unbiased variance; BN, which the paper's burn-in is, with the biased one)."""

    def __init__(self, gamma, beta, buffer_num, burnin=0, momentum=0.1, eps=1e-5, rho=1.0, out_p=True,
                 unbiased_plain=True):
        self.weight, self.bias = gamma, beta
        self.buffer_num = self.max_buffer_num = buffer_num
        self.burnin, self.momentum, self.eps, self.rho, self.out_p = burnin, momentum, eps, rho, out_p
        self.unbiased_plain = unbiased_plain
        self.iter_count = 0
        self.pre_mu, self.pre_meanx2, self.pre_dmudw, self.pre_dmeanx2dw, self.pre_weight = [], [], [], [], []
        self.running_mean = torch.zeros(gamma.shape[0], dtype=gamma.dtype)
        self.running_var = torch.ones(gamma.shape[0], dtype=gamma.dtype)
        self.ones = torch.ones(gamma.shape[0], dtype=gamma.dtype)
        self.last_count = None  # entries pooled per channel at the last pooled forward (for the tests)

    def forward(self, input, weight, training=True):
        y = input.transpose(0, 1)
        return_shape = y.shape
        y = y.contiguous().view(input.size(1), -1)
        if training and self.burnin > 0:
            self.iter_count += 1
            self.buffer_num = self.max_buffer_num if self.iter_count > self.burnin else 0
        if self.buffer_num > 0 and training and input.requires_grad:
            cur_mu = y.mean(dim=1)
            cur_meanx2 = torch.pow(y, 2).mean(dim=1)
            cur_sigma2 = y.var(dim=1)
            dmudw = torch.autograd.grad(cur_mu, weight, self.ones, retain_graph=True)[0]
            dmeanx2dw = torch.autograd.grad(cur_meanx2, weight, self.ones, retain_graph=True)[0]
            mu_all = torch.stack([cur_mu] + [tmp_mu + (self.rho * tmp_d * (weight.data - tmp_w)).sum(1).sum(1).sum(1)
                                             for tmp_mu, tmp_d, tmp_w in zip(self.pre_mu, self.pre_dmudw,
                                                                             self.pre_weight)])
            meanx2_all = torch.stack([cur_meanx2] + [tmp_meanx2 + (self.rho * tmp_d * (weight.data - tmp_w)).sum(1)
                                                     .sum(1).sum(1) for tmp_meanx2, tmp_d, tmp_w in
                                                     zip(self.pre_meanx2, self.pre_dmeanx2dw, self.pre_weight)])
            sigma2_all = meanx2_all - torch.pow(mu_all, 2)
            re_mu_all = mu_all.clone()
            re_meanx2_all = meanx2_all.clone()
            re_mu_all[sigma2_all < 0] = 0
            re_meanx2_all[sigma2_all < 0] = 0
            count = (sigma2_all >= 0).sum(dim=0).to(y.dtype)  # the reference: .float() (its runs are float32)
            self.last_count = count
            mu = re_mu_all.sum(dim=0) / count
            sigma2 = re_meanx2_all.sum(dim=0) / count - torch.pow(mu, 2)
            self.pre_mu = [cur_mu.detach()] + self.pre_mu[:(self.buffer_num - 1)]
            self.pre_meanx2 = [cur_meanx2.detach()] + self.pre_meanx2[:(self.buffer_num - 1)]
            self.pre_dmudw = [dmudw.detach()] + self.pre_dmudw[:(self.buffer_num - 1)]
            self.pre_dmeanx2dw = [dmeanx2dw.detach()] + self.pre_dmeanx2dw[:(self.buffer_num - 1)]
            tmp_weight = torch.zeros_like(weight.data)
            tmp_weight.copy_(weight.data)
            self.pre_weight = [tmp_weight.detach()] + self.pre_weight[:(self.buffer_num - 1)]
        else:
            x = y
            mu = x.mean(dim=1)
            cur_mu = mu
            cur_sigma2 = x.var(dim=1)
            sigma2 = cur_sigma2 if self.unbiased_plain else x.var(dim=1, unbiased=False)
        if not training:
            y = y - self.running_mean.view(-1, 1)
            y = y / ((self.running_var.view(-1, 1) + self.eps) ** .5 if self.out_p
                     else self.running_var.view(-1, 1) ** .5 + self.eps)
        else:
            with torch.no_grad():
                self.running_mean = (1 - self.momentum) * self.running_mean + self.momentum * cur_mu
                self.running_var = (1 - self.momentum) * self.running_var + self.momentum * cur_sigma2
            y = y - mu.view(-1, 1)
            y = y / ((sigma2.view(-1, 1) + self.eps) ** .5 if self.out_p else sigma2.view(-1, 1) ** .5 + self.eps)
        y = self.weight.view(-1, 1) * y + self.bias.view(-1, 1)
        return y.view(return_shape).transpose(0, 1)


def _conv(seed=0, bias=False, **kwargs):
    torch.manual_seed(seed)
    return nn.Conv2d(C_IN, C, 3, bias=bias, **{"padding": 1, **kwargs}).double()


def _model(conv, **opts):
    """conv -> cbn, its conv hooked by the registry's reparam, gamma and beta off their initial values."""
    cbn = build_norm("cbn", C, **{"burnin": 0, "burnin_unit": "steps", **opts}).double()
    if cbn.weight is not None:
        with torch.no_grad():
            cbn.weight.uniform_(0.5, 1.5)
            cbn.bias.normal_()
    return apply_weight_reparam(nn.Sequential(conv, cbn), "cbn", **opts).train()


def _input(step, n=4, h=6):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, C_IN, h, h, generator=g, dtype=torch.double) * 2 + 0.5


def _perturbation(step, weight):
    """A weight change between steps; at step 2 the first channel shrinks to 0.2x, which makes the first-order
    variance of the earlier entries negative there (they are left out)."""
    g = torch.Generator().manual_seed(200 + step)
    delta = 0.15 * torch.randn(weight.shape, generator=g, dtype=weight.dtype) * weight.abs().mean()
    if step == 2:
        delta[0] -= 0.8 * weight[0]
    return delta


def _run_against_reference(steps, opts, ref_opts, n=4):
    """``steps`` training steps of our conv->cbn and of the reference on the same weights and inputs; each step's
    output and every gradient compared, then the weights changed by the same perturbation."""
    conv = _conv()
    ours = _model(conv, **opts)
    ref_conv = copy.deepcopy(conv)
    gamma = ours[1].weight.detach().clone().requires_grad_()
    beta = ours[1].bias.detach().clone().requires_grad_()
    ref = ReferenceCBN(gamma, beta, **ref_opts)
    counts = []
    for step in range(steps):
        x = _input(step, n)
        x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
        out = ours(x_ours)
        expected = ref.forward(ref_conv(x_ref), ref_conv.weight)
        torch.testing.assert_close(out, expected, msg=f"output, step {step}")
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(step), dtype=out.dtype)
        out.backward(upstream)
        expected.backward(upstream)
        for a, b, what in ((x_ours.grad, x_ref.grad, "input"), (conv.weight.grad, ref_conv.weight.grad, "conv"),
                           (ours[1].weight.grad, gamma.grad, "gamma"), (ours[1].bias.grad, beta.grad, "beta")):
            torch.testing.assert_close(a, b, msg=f"{what} gradient, step {step}")
        torch.testing.assert_close(ours[1].running_mean, ref.running_mean)
        torch.testing.assert_close(ours[1].running_var, ref.running_var)
        counts.append(ref.last_count)
        with torch.no_grad():
            delta = _perturbation(step, conv.weight)
            conv.weight += delta
            ref_conv.weight += delta
        for p in (conv.weight, ref_conv.weight, ours[1].weight, ours[1].bias, gamma, beta):
            p.grad = None
    ours.eval()
    x = _input(99, n)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref.forward(ref_conv(x), ref_conv.weight, training=False))
    return ours, counts


@pytest.mark.parametrize("window, momentum, eps", [(4, 0.1, 1e-5), (2, 0.3, 0.5)])
def test_cbn_trains_and_evaluates_as_the_reference(window, momentum, eps):
    """Six steps with the weights moving between them: output, the input's, conv's, gamma's and beta's
    gradients and the running statistics equal the reference's (window k = buffer_num + 1), then the evaluation
    forward. A past entry is left out somewhere (the exclusion is exercised), and the naive pool differs (the
    compensation is exercised); each parametrized window / momentum / eps is checked with that value."""
    ours, counts = _run_against_reference(6, {"window": window, "momentum": momentum, "eps": eps},
                                          {"buffer_num": window - 1, "momentum": momentum, "eps": eps})
    if window > 2:  # some channel of some step left an entry out
        assert any((c < min(step, window - 1) + 1).any() for step, c in enumerate(counts))
    naive, _ = _run_against_reference(6, {"window": window, "momentum": momentum, "eps": eps, "compensate": False},
                                      {"buffer_num": window - 1, "momentum": momentum, "eps": eps, "rho": 0.0})
    x = _input(5)
    ours.train(), naive.train()
    with torch.no_grad():
        assert (ours(x) - naive(x)).abs().max() > 1e-2


def test_burnin_is_bn_then_pooling_starts_from_an_empty_pool():
    """burnin=3 steps: three BN steps (biased variance), no entry kept, then the reference's pooled steps."""
    _run_against_reference(6, {"window": 3, "burnin": 3}, {"buffer_num": 2, "burnin": 3, "unbiased_plain": False})


def test_burnin_as_a_fraction_of_the_run():
    """burnin=0.3 of a 10-step run is 3 steps, bit for bit; the fraction needs the run's length."""
    fraction, steps = _model(_conv(), window=3, burnin=0.3, burnin_unit="fraction"), _model(_conv(), window=3, burnin=3)
    fraction[1].set_training_length(10)
    for step in range(5):
        assert torch.equal(fraction(_input(step)), steps(_input(step)))
    assert int(fraction[1].num_steps) == 5 and int(fraction[1].num_stored) == 2
    with pytest.raises(RuntimeError, match="set_training_length"):
        _model(_conv(), burnin=0.3, burnin_unit="fraction")(_input(0))
    with pytest.raises(NormConfigError, match="^norm 'cbn': burnin=1.5 must be a fraction"):
        build_norm("cbn", C, burnin=1.5)
    with pytest.raises(NormConfigError, match="whole number"):
        build_norm("cbn", C, burnin=2.5, burnin_unit="steps")
    with pytest.raises(NormConfigError, match="burnin_unit must be one of fraction, steps"):
        build_norm("cbn", C, burnin_unit="epochs")


def test_window_one_is_batch_norm():
    torch.manual_seed(0)
    model, bn = _model(_conv(), window=1), build_norm("bn", C).double()
    bn.load_state_dict({k: v for k, v in model[1].state_dict().items() if k in bn.state_dict()})
    for step in range(3):
        x = model[0](_input(step)).detach()
        torch.testing.assert_close(model[1](x), bn(x))
    torch.testing.assert_close(model[1].running_var, bn.running_var)


def test_without_affine_there_are_no_parameters():
    """affine=false: the reference's output with gamma = 1, beta = 0, and the layer has no parameters."""
    conv = _conv()
    model, ref_conv = _model(conv, window=3, affine=False), copy.deepcopy(conv)
    assert not list(model[1].parameters())
    ref = ReferenceCBN(torch.ones(C, dtype=torch.double), torch.zeros(C, dtype=torch.double), buffer_num=2)
    for step in range(4):
        x = _input(step)
        torch.testing.assert_close(model(x), ref.forward(ref_conv(x), ref_conv.weight))
        with torch.no_grad():
            delta = _perturbation(step, conv.weight)
            conv.weight += delta
            ref_conv.weight += delta


def test_the_reparam_hooks_each_conv_once_and_none_without_compensation():
    """Naive pooling (compensate=false, checked against the reference above) needs no conv: no hook then; a
    grouped conv is refused (the closed-form derivatives are written for groups=1), a linear layer left alone."""
    plain, hooked = _conv(), _conv()
    _model(plain, compensate=False)
    apply_weight_reparam(_model(hooked), "cbn")  # a second application adds no hook
    assert not plain._forward_hooks and len(hooked._forward_hooks) == 1
    linear = apply_weight_reparam(nn.Linear(3, 2), "cbn")
    assert not linear._forward_hooks
    with pytest.raises(NormConfigError, match="groups=1"):
        apply_weight_reparam(nn.Conv2d(4, 4, 3, groups=2), "cbn")


@pytest.mark.parametrize("bias, stride, groups, geometry", [
    (False, 1, 1, {}), (True, 2, 2, {}),
    (False, (2, 1), 1, {"padding": (2, 0), "dilation": (2, 1)})])  # each axis its own stride, padding, dilation
def test_closed_form_derivatives_are_autograds(bias, stride, groups, geometry):
    """The kept d mu / d(W, b) and d var / d(W, b) of each virtual batch equal torch.autograd.grad's (what the
    reference computes), for a strided conv with a bias and two ghost groups too, and a dilated one with unequal
    padding, stride and dilation per axis."""
    conv = _conv(bias=bias, stride=stride, **geometry)
    model = _model(conv, window=2, virtual_batch=None if groups == 1 else 2)
    x = _input(0, n=2 * groups, h=7)
    model(x)
    cbn = model[1]
    for g, xg in enumerate(x.split(x.shape[0] // groups)):
        y = conv(xg)
        mean, var = y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False)
        params = [conv.weight] + ([conv.bias] if bias else [])
        # row c: d mu_c / d(W_c, b_c) (mu_c depends on W_c alone), the same for var
        dmean = torch.cat([t.reshape(C, -1) for t in torch.autograd.grad(mean.sum(), params, retain_graph=True)], 1)
        dvar = torch.cat([t.reshape(C, -1) for t in torch.autograd.grad(var.sum(), params)], 1)
        torch.testing.assert_close(cbn.past_dmean[0, g].expand_as(dmean), dmean)
        torch.testing.assert_close(cbn.past_dvar[0, :, :, g], dvar)
        torch.testing.assert_close(cbn.past_mean[0, g], mean)
        torch.testing.assert_close(cbn.past_var[0, g], var)


def test_ghost_batches_keep_a_pool_per_group():
    """virtual_batch=2 on a batch of 4 for five steps with the weights moving: each pair of samples through
    conv -> cbn alone (outputs and input gradients), the running statistics the mean of the two layers'; a batch
    of another number of groups is refused (the pools were kept per group)."""
    conv = _conv()
    ghost = _model(conv, window=3, virtual_batch=2)
    alone = [copy.deepcopy(ghost) for _ in range(2)]
    for m in alone:
        m[1].virtual_batch = None
    for step in range(5):
        x = _input(step).requires_grad_()
        out = ghost(x)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(step), dtype=out.dtype)
        out.backward(upstream)
        for g, m in enumerate(alone):
            xg = x.detach()[2 * g:2 * g + 2].clone().requires_grad_()
            out_g = m(xg)
            out_g.backward(upstream[2 * g:2 * g + 2])
            torch.testing.assert_close(out[2 * g:2 * g + 2], out_g, msg=f"group {g}, step {step}")
            torch.testing.assert_close(x.grad[2 * g:2 * g + 2], xg.grad)
        for name in ("running_mean", "running_var"):
            torch.testing.assert_close(getattr(ghost[1], name),
                                       torch.stack([getattr(m[1], name) for m in alone]).mean(0))
        with torch.no_grad():
            delta = _perturbation(step, conv.weight)
            for m in (ghost, *alone):
                m[0].weight += delta
    with pytest.raises(NormConfigError, match="virtual batch"):
        ghost(_input(0, n=6))  # 3 groups: the pools were kept for 2


def test_gradient_is_the_true_gradient_of_the_pooled_forward():
    """gradcheck of a pooled training forward (three past entries kept) with respect to its input, gamma, beta."""
    layer = build_norm("cbn", C, window=4, burnin=0, burnin_unit="steps").double().train()
    for step in range(3):
        layer(torch.randn(4, C, 3, 3, dtype=torch.double) * (1 + step))
    state = copy.deepcopy(layer.state_dict())

    def forward(x, gamma, beta):  # from the same kept state every time
        layer.load_state_dict(state)
        return torch.func.functional_call(layer, {"weight": gamma, "bias": beta}, (x,))

    x = torch.randn(2, C, 3, 3, dtype=torch.double).requires_grad_()
    gamma = torch.rand(C, dtype=torch.double).add(0.5).requires_grad_()
    beta = torch.randn(C, dtype=torch.double).requires_grad_()
    assert torch.autograd.gradcheck(forward, (x, gamma, beta))


def test_a_checkpoint_resumes_bit_for_bit():
    """Train 4 SGD steps, save model and optimizer, load them into a fresh model, train 4 more: the same outputs,
    weights and state as 8 uninterrupted steps (the pool's ring wraps, burn-in ends on the way)."""

    def fresh():
        model = _model(_conv(), window=3, burnin=2, virtual_batch=2)
        return model, torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)

    def step(model, opt, i):
        out = model(_input(i))
        opt.zero_grad()
        (out * _input(50 + i)[:, :1]).sum().backward()
        opt.step()
        return out.detach()

    model, opt = fresh()
    straight = [step(model, opt, i) for i in range(8)]
    first, opt1 = fresh()
    for i in range(4):
        step(first, opt1, i)
    resumed, opt2 = fresh()
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    opt2.load_state_dict(copy.deepcopy(opt1.state_dict()))
    for i in range(4, 8):
        assert torch.equal(step(resumed, opt2, i), straight[i]), i
    for (key, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key
    assert int(resumed[1].num_stored) == 6 and resumed[1].past_dvar.shape == (2, C, C_IN * 9, 2)


class _AddAfterConv(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(C_IN, C_IN, 3, padding=1), norm

    def forward(self, x):
        return self.norm(self.conv(x) + x)


@pytest.mark.parametrize("compensate", [True, False])
def test_a_conv_must_feed_the_norm_directly(compensate):
    """An add or an in-place ReLU between conv and norm is refused in one line when compensating (and works
    without: naive pooling needs no conv); the pre-activation ResNet and the CNN with placement=after alike."""
    opts = {"compensate": compensate, "burnin": 0, "burnin_unit": "steps"}
    relu = apply_weight_reparam(nn.Sequential(nn.Conv2d(C_IN, C, 3), nn.ReLU(inplace=True),
                                              build_norm("cbn", C, **opts)), "cbn", **opts).train()
    add = apply_weight_reparam(_AddAfterConv(build_norm("cbn", C_IN, **opts)), "cbn", **opts).train()
    preact = build_model("preact_resnet18", "cbn", **opts).train()
    after = build_model("cnn", "cbn", model_options={"placement": "after"}, **opts).train()
    cases = [(relu, "an in-place operation"), (add, "AddBackward0"), (preact, "AddBackward0"),
             (after, "an in-place operation")]
    for model, between in cases:
        x = torch.randn(2, 3, 8, 8)
        if not compensate:
            assert torch.isfinite(model(x)).all()
            continue
        with pytest.raises(NormConfigError) as e:
            model(x)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("norm 'cbn': cbn compensates through the conv") and between in msg
    standalone = build_norm("cbn", C, **opts).train()
    standalone(torch.randn(2, C, 3, 3, requires_grad=True) * 2)  # no conv upstream: nothing to compensate


def _trained(**opts):
    model = _model(_conv(), window=3, **opts)
    for step in range(4):
        model(_input(step))
        with torch.no_grad():
            model[0].weight += _perturbation(step, model[0].weight)
    return model


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_batch_statistics_evaluation_is_bn_per_group_and_touches_nothing():
    model = _trained().eval()
    before = _state(model)
    x = _input(7, n=6)
    with torch.no_grad(), batch_stats_mode(model, 2):
        out = model(x)
    y = model[0](x)
    for g in range(3):
        yg = y[2 * g:2 * g + 2]
        mean, var = yg.mean((0, 2, 3), keepdim=True), yg.var((0, 2, 3), unbiased=False, keepdim=True)
        norm = model[1]
        expected = (yg - mean) / (var + norm.eps).sqrt() * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)
        torch.testing.assert_close(out[2 * g:2 * g + 2], expected)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_precise_bn_sets_population_statistics_and_keeps_the_pool():
    model = _trained()
    before = _state(model)
    batches = [_input(20 + i) for i in range(3)]
    precise_bn_update(model, batches, 3)
    with torch.no_grad():
        y = torch.cat([model[0](b) for b in batches])
    torch.testing.assert_close(model[1].running_mean, y.mean((0, 2, 3)))
    torch.testing.assert_close(model[1].running_var, y.var((0, 2, 3)))
    for k, v in model.state_dict().items():
        if "running" not in k:
            assert torch.equal(v, before[k]), k


def test_frozen_tail_normalizes_with_the_running_statistics_and_keeps_nothing():
    model = _trained()
    before = _state(model)
    freeze_batch_stats(model)
    x = _input(30)
    out = model(x)
    norm, y = model[1], model[0](x)
    expected = ((y - norm.running_mean.view(1, -1, 1, 1)) / (norm.running_var.view(1, -1, 1, 1) + norm.eps).sqrt()
                * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1))
    torch.testing.assert_close(out, expected)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_recorded_gaps_are_those_of_the_pooled_statistics():
    model = _trained()
    norm = model[1]
    x = _input(40)
    with torch.no_grad():
        mean, var, _ = norm._pooled_stats(norm._fused_kernel_stats(model[0](x), 1, 4 * 36), model[0].weight.flatten(1))
    running_mean, running_var = norm.running_mean.clone(), norm.running_var.clone()
    with recording_batch_stats(model):
        model(x)
    torch.testing.assert_close(norm.last_batch_mean, mean.squeeze(0))
    torch.testing.assert_close(norm.last_gaps[0], (mean - running_mean).abs().mean())
    log_gap = ((var + norm.eps).log() - (running_var + norm.eps).log()).abs().mean()
    torch.testing.assert_close(norm.last_gaps[1], log_gap)


def test_bf16_autocast_computes_the_float32_layer():
    """conv -> cbn under CPU bf16 autocast (compensated, pooled) against the same in float32: outputs within bf16
    tolerance, gradients close, every buffer float32 and close to the float32 layer's."""
    torch.manual_seed(0)
    model32 = apply_weight_reparam(nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False),
                                                 build_norm("cbn", 16, window=3, burnin=1, burnin_unit="steps")),
                                   "cbn").train()
    model16 = copy.deepcopy(model32)
    for step in range(4):
        x = torch.randn(4, 8, 8, 8, generator=torch.Generator().manual_seed(step)).bfloat16().float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out16 = model16(x)
        out32 = model32(x)
        assert out16.dtype == torch.bfloat16
        torch.testing.assert_close(out16.float(), out32, rtol=2e-2, atol=2e-2)
        upstream = torch.randn(out32.shape, generator=torch.Generator().manual_seed(10 + step))
        out16.float().backward(upstream)
        out32.backward(upstream)
        for p16, p32 in zip(model16.parameters(), model32.parameters()):
            assert ((p16.grad - p32.grad).norm() / p32.grad.norm()) < 3e-2
            p16.grad = p32.grad = None
        with torch.no_grad():
            for m in (model16, model32):
                m[0].weight.mul_(1.05)
    for (key, b16), b32 in zip(model16[1].state_dict().items(), model32[1].state_dict().values()):
        if b16.is_floating_point():
            assert b16.dtype == torch.float32, key
            torch.testing.assert_close(b16, b32, rtol=2e-2, atol=2e-3, msg=key)


def test_a_model_without_a_conv_before_each_cbn_is_refused_before_training(tiny_data, tmp_path):
    """The run's validation makes one training forward for cbn (NormInfo.checked_by_forward): through the command
    line one line, exit 2, nothing trained (the pre-activation ResNet); the CNN with its norm after the ReLU is
    refused by the same check; with compensate=false (no conv needed) both are valid input."""
    from normbench.compose import compose
    from normbench.errors import UserError
    from normbench.validate import check_model
    from tests.conftest import TINY_OVERRIDES, run_cli

    args = [*TINY_OVERRIDES, f"data.root={tiny_data}", f"out_dir={tmp_path}", "norm=cbn"]
    refused = run_cli([*args, "model=preact_resnet18"])
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr
    assert "cannot train preact_resnet18 with norm=cbn: " in lines[0] and "compensates through" in lines[0]
    assert not list(tmp_path.glob("**/summary.json"))
    after = [*args, "model=cnn", "model.placement=after"]
    with pytest.raises(UserError, match="^cannot train cnn with norm=cbn: .*compensates through"):
        check_model(compose(after, hydra_node=False))
    for model in (["model=preact_resnet18"], after[len(args):]):
        check_model(compose([*args, *model, "norm.compensate=false"], hydra_node=False))  # no UserError
