"""Moving Average Batch Normalization (Yan et al. 2020) against the authors' layer, transcribed below in float64:
``BatchNormFunction`` of github.com/megvii-model/MABN ``MABN.py`` (forward and its own backward, the buffers
carried over the steps), its evaluation, its ``CenConv2d`` weight centring; ghost batches as separate layers,
exact resume, what the model-wide modes do with it, and a test per option that fails if the option is ignored.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.utils import parametrize

from normbench.models import build_model
from normbench.norms import (
    NormConfigError,
    apply_weight_reparam,
    batch_stat_gaps,
    batch_stats_mode,
    build_norm,
    freeze_batch_stats,
    precise_bn_update,
    recording_batch_stats,
)

torch.set_num_threads(1)


def reference_forward(x, weight, bias, running_var, eps, keep, buffer_x2, t, buffer_size, warmup_iters,
                      renorm_start=1000, r_max=5.0):
    """MABN.py's BatchNormFunction.forward at iteration t (its ``iters``, counted from 1), written out: updates
    ``buffer_x2`` (buffer_size, C) and ``running_var`` (C,) in place and returns the output and what its backward
    saves. The reference's constants, r = 1 until iteration max(1000, warmup_iters) and the clip limit 5, are
    the arguments renorm_start and r_max; ``keep`` is its momentum (the weight of the old value)."""
    c = x.shape[1]
    x2 = (x * x).mean(dim=3).mean(dim=2).mean(dim=0)
    buffer_x2[t % buffer_size].copy_(x2)
    if t <= buffer_size or t < warmup_iters:
        var = x2.view(1, c, 1, 1)
    else:
        var = buffer_x2.mean(dim=0).view(1, c, 1, 1)
    z = x / (var + eps).sqrt()
    r = (var + eps).sqrt() / (running_var.view(1, c, 1, 1) + eps).sqrt()
    if t <= max(renorm_start, warmup_iters):
        r = torch.clamp(r, 1, 1)
    else:
        r = torch.clamp(r, 1 / r_max, r_max)
    y = r * z
    running_var.copy_(keep * running_var + (1 - keep) * var.view(-1))
    return weight.view(1, c, 1, 1) * y + bias.view(1, c, 1, 1), (z, var, r)


def reference_backward(grad_output, saved, weight, eps, buffer_gz, t, buffer_size, warmup_iters):
    """MABN.py's BatchNormFunction.backward, written out: updates ``buffer_gz`` in place; returns the gradients of
    x, weight and bias."""
    z, var, r = saved
    c = grad_output.shape[1]
    y = r * z
    g = grad_output * weight.view(1, c, 1, 1)
    g = g * r
    gz = (g * z).mean(dim=3).mean(dim=2).mean(dim=0)
    buffer_gz[t % buffer_size].copy_(gz)
    if t <= buffer_size or t < warmup_iters:
        mean_gz = gz.view(1, c, 1, 1)
    else:
        mean_gz = buffer_gz.mean(dim=0).view(1, c, 1, 1)
    gx = 1.0 / torch.sqrt(var + eps) * (g - z * mean_gz)
    return gx, (grad_output * y).sum(dim=3).sum(dim=2).sum(dim=0), grad_output.sum(dim=3).sum(dim=2).sum(dim=0)


def reference_eval(x, weight, bias, running_var, eps):
    """MABN2d.forward in evaluation."""
    shape = (1, -1, 1, 1)
    return weight.view(shape) * (x / (running_var.view(shape) + eps).sqrt()) + bias.view(shape)


def _layer(channels=5, **opts):
    torch.manual_seed(0)
    layer = build_norm("mabn", channels, **opts).double()
    if layer.weight is not None:
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.normal_()
    return layer


def _input(step, batch=2, channels=5, seed=0):
    """A map whose scale differs per channel and per step (so the moving averages differ from the batch's own)."""
    g = torch.Generator().manual_seed(1000 * seed + step)
    scale = 0.5 + 3 * torch.rand(1, channels, 1, 1, generator=g, dtype=torch.double)
    return 0.3 + scale * torch.randn(batch, channels, 4, 3, generator=g, dtype=torch.double)


# window, warm-up, renorm start, r_max, momentum, eps: A averages from step 4 (past its window of 3), renormalizes
# from step 6 with r clipped at 1.5; B's warm-up (5) outlasts its window (2), renormalizes from 6 within r_max 5.
CASES = {"A": dict(sma_window=3, sma_warmup=4, renorm_start=5, r_max=1.5, momentum=0.02, eps=1e-5),
         "B": dict(sma_window=2, sma_warmup=5, renorm_start=0, r_max=5.0, momentum=0.3, eps=0.1)}


@pytest.mark.parametrize("batch", [1, 2, 8])
@pytest.mark.parametrize("case", CASES)
def test_trains_and_evaluates_as_the_authors_function(case, batch):
    """Nine training steps (output, the gradients of the input, gamma and beta, the running statistic and both
    windows), then an evaluation forward: equal to the authors' MABN in float64. Each option differs from its
    default in a case whose steps its value decides (the warm-up, the moving averages, r and its clipping), so
    dropping any of them fails it."""
    opts = CASES[case]
    layer = _layer(**opts)
    window, warmup = opts["sma_window"], opts["sma_warmup"]
    buffer_x2, buffer_gz = torch.zeros(window, 5, dtype=torch.double), torch.zeros(window, 5, dtype=torch.double)
    running_var = torch.ones(5, dtype=torch.double)
    weight, bias = layer.weight.detach(), layer.bias.detach()
    rs = []
    for t in range(1, 10):
        x = _input(t, batch)
        upstream = torch.randn(x.shape, dtype=torch.double, generator=torch.Generator().manual_seed(50 + t))
        x_ours = x.clone().requires_grad_()
        out = layer(x_ours)
        expected, saved = reference_forward(x, weight, bias, running_var, opts["eps"], 1 - opts["momentum"], buffer_x2,
                                            t, window, warmup, opts["renorm_start"], opts["r_max"])
        torch.testing.assert_close(out, expected)
        out.backward(upstream)
        gx, gw, gb = reference_backward(upstream, saved, weight, opts["eps"], buffer_gz, t, window, warmup)
        torch.testing.assert_close(x_ours.grad, gx)
        torch.testing.assert_close(layer.weight.grad, gw)
        torch.testing.assert_close(layer.bias.grad, gb)
        layer.weight.grad = layer.bias.grad = None
        torch.testing.assert_close(layer.running_var, running_var)
        torch.testing.assert_close(layer.window_x2.squeeze(1), buffer_x2)
        torch.testing.assert_close(layer.window_psi.squeeze(1), buffer_gz)
        rs.append(saved[2].flatten())
        assert int(layer.num_steps) == t
    rs = torch.stack(rs)
    assert (rs[:5] == 1).all() and (rs[6:] != 1).any()  # r engaged where the case says
    if opts["r_max"] == 1.5:
        assert (rs == 1.5).any() and ((rs > 1 / 1.5) & (rs < 1.5)).any()  # clipped in some channels, not all
    layer.eval()
    x = _input(20, 3)
    torch.testing.assert_close(layer(x), reference_eval(x, weight, bias, running_var, opts["eps"]))
    assert int(layer.num_steps) == 9  # evaluation counts no step


def test_without_affine_it_is_the_authors_layer_with_gamma_1_and_beta_0():
    layer = _layer(affine=False, sma_window=2, sma_warmup=0, renorm_start=3)
    assert layer.weight is None and not list(layer.parameters())
    ones, zeros = torch.ones(5, dtype=torch.double), torch.zeros(5, dtype=torch.double)
    buffer_x2, buffer_gz, running_var = torch.zeros(2, 5).double(), torch.zeros(2, 5).double(), torch.ones(5).double()
    for t in range(1, 6):
        x = _input(t).requires_grad_()
        upstream = torch.randn_like(x)
        out = layer(x)
        expected, saved = reference_forward(x.detach(), ones, zeros, running_var, 1e-5, 0.98, buffer_x2, t, 2, 0, 3)
        torch.testing.assert_close(out, expected)
        out.backward(upstream)
        torch.testing.assert_close(x.grad, reference_backward(upstream, saved, ones, 1e-5, buffer_gz, t, 2, 0)[0])
    layer.eval()
    x = _input(9)
    torch.testing.assert_close(layer(x), reference_eval(x, ones, zeros, running_var, 1e-5))


def test_the_backward_is_the_true_gradient_in_the_warm_up_only():
    """Before the moving averages (and without r) the authors' backward is the gradient of gamma * x /
    sqrt(E_NHW[x^2] + eps) + beta: gradcheck of the forward that normalizes by the current batch (the one that
    keeps the layer's state), and the training steps of the warm-up against autograd of that formula. After
    it, psi's moving average makes it differ (so the comparison can tell)."""
    layer = _layer(channels=3, sma_window=2, sma_warmup=3, renorm_start=100, virtual_batch=2)
    still = copy.deepcopy(layer).train()
    still._keep_running_stats = True  # what batch_stats_mode and PreciseBN set: no buffer moves

    def current_batch(x, weight, bias):
        return functional_call(still, {"weight": weight, "bias": bias}, (x,))

    inputs = (_input(0, 4, 3).requires_grad_(), layer.weight.detach().clone().requires_grad_(),
              layer.bias.detach().clone().requires_grad_())
    assert torch.autograd.gradcheck(current_batch, inputs)

    def formula(x):
        xs = x.view(2, 2, 3, -1)
        out = xs / (xs.square().mean(dim=(1, 3), keepdim=True) + 1e-5).sqrt()
        return out.view(x.shape) * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)

    differences = []
    for step in range(1, 6):
        x = _input(step, 4, 3).requires_grad_()
        upstream = torch.randn_like(x)
        layer(x).backward(upstream)
        x_formula = x.detach().clone().requires_grad_()
        formula(x_formula).backward(upstream)
        differences.append((x.grad - x_formula.grad).abs().max().item())
    assert max(differences[:2]) < 1e-12 and min(differences[3:]) > 1e-3  # steps 1, 2 exact; 4, 5 averaged


def test_ghost_batches_are_separate_layers_each_with_its_own_windows():
    """virtual_batch=2 on a batch of 6 for seven steps (the moving averages from step 3): each pair of samples
    through a layer of its own (output, gradients, windows), the running statistic the mean of theirs; before
    renorm_start, where r would renormalize towards that shared statistic. The whole batch differs."""
    opts = dict(sma_window=2, sma_warmup=0, renorm_start=100)
    ghost, whole = _layer(virtual_batch=2, **opts), _layer(**opts)
    alone = [_layer(**opts) for _ in range(3)]
    for step in range(1, 8):
        x = _input(step, 6).requires_grad_()
        upstream = torch.randn_like(x)
        out = ghost(x)
        out.backward(upstream)
        parts = [x[2 * g:2 * g + 2].detach().clone().requires_grad_() for g in range(3)]
        for g, (m, part) in enumerate(zip(alone, parts)):
            expected = m(part)
            torch.testing.assert_close(out[2 * g:2 * g + 2], expected)
            expected.backward(upstream[2 * g:2 * g + 2])
            torch.testing.assert_close(x.grad[2 * g:2 * g + 2], part.grad)
            torch.testing.assert_close(ghost.window_x2[:, g], m.window_x2[:, 0])
            torch.testing.assert_close(ghost.window_psi[:, g], m.window_psi[:, 0])
        torch.testing.assert_close(ghost.running_var, torch.stack([m.running_var for m in alone]).mean(0))
        torch.testing.assert_close(ghost.weight.grad, sum(m.weight.grad for m in alone))
        torch.testing.assert_close(ghost.bias.grad, sum(m.bias.grad for m in alone))
        for m in (ghost, *alone):
            m.weight.grad = m.bias.grad = None
        assert (whole(x) - out).abs().max() > 1e-2
    assert ghost.window_x2.shape == (2, 3, 5)


def test_a_training_step_with_another_number_of_virtual_batches_is_refused():
    layer = _layer(virtual_batch=2)
    layer(_input(0, 4))
    with pytest.raises(NormConfigError, match=r"^norm 'mabn': a training batch of 3 virtual batches after 2 "):
        layer(_input(1, 6))
    with torch.no_grad(), batch_stats_mode(layer, 2):
        layer(_input(2, 6))  # a pass that keeps the state may hold any number of groups
    layer.eval()(_input(3, 6))
    fresh = _layer(virtual_batch=2)
    fresh(_input(1, 6))  # the first training step sets the number
    assert fresh.window_x2.shape[1] == 3


def _convnet(**opts):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), build_norm("mabn", 4, **opts), nn.ReLU())
    return apply_weight_reparam(model, "mabn", **opts).double()


def _train(model, steps, first=0, lr=0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    outs = []
    for step in range(first, first + steps):
        x = torch.randn(4, 3, 6, 6, dtype=torch.double, generator=torch.Generator().manual_seed(step)) * 2
        out = model(x)
        out.square().mean().backward()
        opt.step()
        opt.zero_grad()
        outs.append(out.detach())
    return outs


def test_state_dict_resume_is_exact():
    """Three steps, save, load into a fresh model, five more (past the window, the warm-up and renorm_start):
    bit for bit the eight steps of one run, the windows' group count restored with them."""
    opts = dict(sma_window=3, sma_warmup=2, renorm_start=4, virtual_batch=2)
    straight = _convnet(**opts)
    expected = _train(straight, 8)
    first = _convnet(**opts)
    _train(first, 3)
    resumed = _convnet(**opts)
    assert resumed[1].window_x2.shape[1] == 1  # before its first step
    resumed.load_state_dict(first.state_dict())
    assert resumed[1]._steps == 3
    outs = _train(resumed, 5, first=3)
    for a, b in zip(outs, expected[3:]):
        assert torch.equal(a, b)
    for (key, a), b in zip(resumed.state_dict().items(), straight.state_dict().values()):
        assert torch.equal(a, b), key


def test_precise_bn_sets_the_population_second_moment_and_nothing_else():
    """PreciseBN: chi_ema becomes E[h^2] per channel over every sample and position of the batches (what evaluation
    divides by), not their variance; the windows and the step count stay."""
    model = _convnet(virtual_batch=2)
    model.train()
    _train(model, 3)
    offsets = torch.tensor([3.0, -2.0, 1.0], dtype=torch.double).view(1, 3, 1, 1)  # centred weights keep some mean
    batches = [torch.randn(4, 3, 6, 6, dtype=torch.double) * 3 + offsets for _ in range(4)]
    with torch.no_grad():
        h = torch.cat([model[0](b) for b in batches])
    before = copy.deepcopy(model.state_dict())
    precise_bn_update(model, batches, 4)
    second_moment = h.square().mean(dim=(0, 2, 3))
    torch.testing.assert_close(model[1].running_var, second_moment)
    assert (second_moment - h.var(dim=(0, 2, 3))).abs().min() > 0.1  # the variance would differ
    for key, value in model.state_dict().items():
        if not key.endswith("running_var"):
            assert torch.equal(value, before[key]), key


def test_batch_statistics_evaluation_normalizes_each_group_by_its_own_second_moment():
    """Even past the moving averages and renorm_start: gamma * x / sqrt(E_group[x^2] + eps) + beta per group, no
    buffer touched."""
    layer = _layer(sma_window=2, sma_warmup=0, renorm_start=2)
    for step in range(4):
        layer(_input(step, 4))
    before = copy.deepcopy(layer.state_dict())
    x = _input(9, 6)
    layer.eval()
    with torch.no_grad(), batch_stats_mode(layer, 3):
        out = layer(x)
    xs = x.view(2, 3, 5, -1)
    expected = (xs / (xs.square().mean(dim=(1, 3), keepdim=True) + 1e-5).sqrt()).view(x.shape)
    torch.testing.assert_close(out, expected * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1))
    assert not layer.training
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_the_frozen_tail_trains_with_the_evaluation_forward():
    model = _convnet(sma_window=2, sma_warmup=0, renorm_start=2)
    _train(model, 4)
    before = copy.deepcopy(model[1].state_dict())
    model.train()
    freeze_batch_stats(model)
    x = torch.randn(2, 3, 6, 6, dtype=torch.double, requires_grad=True)
    h = model[0](x)
    out = model[1](h)
    torch.testing.assert_close(out, reference_eval(h, model[1].weight, model[1].bias, model[1].running_var, 1e-5))
    out.square().sum().backward()
    assert x.grad.abs().sum() > 0 and model[1].weight.grad.abs().sum() > 0
    for key, value in model[1].state_dict().items():
        assert torch.equal(value, before[key]), key


def test_recorded_gaps_compare_the_training_statistic_with_the_running_one():
    layer = _layer(sma_window=2, sma_warmup=0)
    for step in range(3):
        layer(_input(step))
    running = layer.running_var.clone()
    x = _input(3)
    chi_bar = (layer.window_x2[1, 0] + x.square().mean(dim=(0, 2, 3))) / 2  # step 4 writes slot 0; slot 1 holds step 3
    model = nn.Sequential(layer)
    with recording_batch_stats(model):
        model(x)
    mean_gap, log_gap = batch_stat_gaps(model)["0"]
    assert mean_gap == 0
    torch.testing.assert_close(log_gap, ((chi_bar + 1e-5).log() - (running + 1e-5).log()).abs().mean())
    torch.testing.assert_close(layer.last_batch_mean, x.mean(dim=(0, 2, 3)))


def test_convolution_weights_are_centred_and_linear_layers_left_alone():
    """The authors' CenConv2d: the effective weight is w - mean(w) per output channel, the convolution uses it,
    and the raw weight gets the gradient through it (dL/dw - its mean per output channel)."""
    torch.manual_seed(0)
    model = apply_weight_reparam(nn.Sequential(nn.Conv2d(3, 5, 3), nn.Flatten(), nn.Linear(20, 4)), "mabn")
    conv, linear = model[0], model[2]
    assert parametrize.is_parametrized(conv, "weight") and not parametrize.is_parametrized(linear, "weight")
    raw = conv.parametrizations.weight.original
    with torch.no_grad():
        raw.add_(torch.randn(5, 1, 1, 1))  # means far from 0
    torch.testing.assert_close(conv.weight.mean(dim=(1, 2, 3)), torch.zeros(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(conv.weight, raw - raw.mean(dim=(1, 2, 3), keepdim=True))
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(conv(x), F.conv2d(x, raw - raw.mean(dim=(1, 2, 3), keepdim=True), conv.bias))
    probe = torch.randn(5, 3, 3, 3)
    (conv.weight * probe).sum().backward()
    torch.testing.assert_close(raw.grad, probe - probe.mean(dim=(1, 2, 3), keepdim=True))
    resnet = build_model("resnet20", "mabn")
    assert all(parametrize.is_parametrized(m, "weight") == isinstance(m, nn.Conv2d)
               for m in resnet.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def test_options_are_validated_and_sync_is_not_offered():
    for bad in ({"sma_window": 0}, {"sma_warmup": -1}, {"renorm_start": 1.5}, {"r_max": 0.5}):
        with pytest.raises(NormConfigError, match="^norm 'mabn': option"):
            build_norm("mabn", 4, **bad)
    with pytest.raises(NormConfigError, match="unknown option.*sync"):
        build_norm("mabn", 4, sync=True)


def test_the_fused_bf16_input_gradient_computes_what_the_eager_one_does(monkeypatch):
    """The input gradient's compiled loop (large bf16 maps on a CPU, here forced for a small one) against the eager
    formula on the same bf16 map: within float32 rounding of each other, so one bf16 rounding of the result."""
    from normbench.norms import mabn

    torch.manual_seed(0)
    x = (1.0 + torch.randn(4, 8, 6, 6)).bfloat16()
    upstream = torch.randn(4, 8, 6, 6).bfloat16()
    grads = []
    for fused_from in (0, 1 << 62):
        monkeypatch.setattr(mabn, "FUSED_FROM", fused_from)
        layer = build_norm("mabn", 8, sma_window=1, sma_warmup=0, renorm_start=0)  # moving averages and r at step 2
        for step in range(2):
            x_in = x.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = layer(x_in)
            out.backward(upstream)
        grads.append(x_in.grad)
    assert grads[0].dtype == torch.bfloat16
    torch.testing.assert_close(grads[0].float(), grads[1].float(), rtol=8e-3, atol=1e-3 * grads[1].abs().max().item())


@pytest.mark.parametrize("virtual_batch, affine", [(None, True), (2, True), (None, False)])
def test_the_cpp_step_computes_what_the_python_step_does_bit_for_bit(virtual_batch, affine, monkeypatch):
    """The C++ port of the training step (mabn_step.cpp) against the Python path, step by step through the warm-up,
    the moving averages and the renormalization: the outputs, every gradient and every buffer the same to the bit
    (so runs trained either way are the same runs); and it is the path a float32 CPU step takes."""
    from normbench.norms import mabn, native

    port = native.extension("mabn_step")
    if port is None:
        pytest.skip("the C++ port cannot be built here: MABN runs its Python path")
    assert mabn._port(torch.zeros(2, 3, 4, 4)) is port
    assert mabn._port(torch.zeros(2, 3, 4, 4, dtype=torch.bfloat16)) is None
    torch.manual_seed(0)
    options = dict(sma_window=3, sma_warmup=5, renorm_start=8, virtual_batch=virtual_batch, affine=affine)
    python, cpp = mabn.MovingAverageBatchNorm(4, **options), mabn.MovingAverageBatchNorm(4, **options)
    if affine:
        with torch.no_grad():
            for layer in (python, cpp):
                layer.weight.copy_(torch.linspace(0.5, 2.0, 4))
                layer.bias.copy_(torch.linspace(-1.0, 1.0, 4))
    ported, real_port = [], mabn._port
    monkeypatch.setattr(native, "extension", lambda name: ported.append(name) or port)
    for step in range(14):
        x, grad = torch.randn(4, 4, 5, 5) * 2 + 0.5, torch.randn(4, 4, 5, 5)
        results = []
        for layer, path in ((python, lambda xf: None), (cpp, real_port)):
            monkeypatch.setattr(mabn, "_port", path)
            xi = x.clone().requires_grad_()
            out = layer(xi)
            out.backward(grad)
            results.append([out, xi.grad, *(p.grad for p in layer.parameters()), *layer.buffers()])
            layer.zero_grad()
        assert all(torch.equal(a, b) for a, b in zip(*results)), f"step {step + 1}"
        assert python._steps == cpp._steps == step + 1
    assert len(ported) == 14  # every step of the second layer went through the port
