"""Online Normalization (Chiley et al. 2019) against the authors' reference, in float64.

The reference (github.com/Cerebras/online-normalization) is transcribed below as plain loops over the
samples: the norm's forward and backward of its CPU kernel (online-norm/pytorch/online_norm_pytorch/csrc/
norm/norm_cpu.cpp, ``norm_fwd_cpu`` / ``norm_bwd_cpu``; the numpy version online-norm/numpy_on/
online_norm_2d.py computes the same), and ``OnlineNorm2d``'s composition (online_norm_2d.py): the norm, the
per-channel affine, then layer scaling over (C, H, W) per sample or activation clamping, which the reference
differentiates with autograd. Training steps carry the state (streaming mean and variance, the backward's
accumulators u and v) across steps and batches; evaluation uses the frozen streaming statistics. A test
per option fails if the option is ignored (each is checked against the reference at a value other than the
default).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from normbench.norms import NORMS, build_norm, is_batch_dependent
from normbench.norms.batch_stat import BatchStatNorm
from normbench.norms.online import OnlineNorm, _ema, _scan

torch.set_num_threads(1)


# ---- the reference, transcribed ----------------------------------------------------------------


def reference_norm_forward(x, s_mu, s_var, afwd, eps):
    """norm_fwd_cpu: returns (out, scale, s_mu, s_var)."""
    n, c = x.shape[:2]
    xs = x.reshape(n, c, -1)
    mu = xs.mean(2)
    var = (xs - mu.unsqueeze(2)).pow(2).mean(2)
    mu_b, var_b = torch.empty_like(mu), torch.empty_like(mu)
    s_mu, s_var = s_mu.clone(), s_var.clone()
    for i in range(n):
        mu_b[i] = s_mu
        var_b[i] = s_var
        delta = mu[i] - s_mu
        s_var = afwd * s_var + (1. - afwd) * var[i] + afwd * (1. - afwd) * delta.pow(2)
        s_mu = s_mu + (1. - afwd) * delta
    scale = (var_b + eps).sqrt()
    return ((xs - mu_b.unsqueeze(2)) / scale.unsqueeze(2)).view(x.shape), scale, s_mu, s_var


def reference_norm_backward(grad_out, u, v, out, scale, abwd):
    """norm_bwd_cpu: returns (grad_in, u, v)."""
    n, c = grad_out.shape[:2]
    grad_outputs, outputs = grad_out.reshape(n, c, -1), out.reshape(n, c, -1)
    grad_in = torch.empty_like(grad_outputs)
    u, v = u.clone(), v.clone()
    for i in range(n):
        grad_tmp = grad_outputs[i] - (1 - abwd) * v.unsqueeze(1) * outputs[i]
        v = v + (grad_tmp * outputs[i]).mean(1)
        grad_tmp = grad_tmp / scale[i].unsqueeze(1)
        grad_in[i] = grad_tmp - (1 - abwd) * u.unsqueeze(1)
        u = u + grad_in[i].mean(1)
    return grad_in.view(grad_out.shape), u, v


def reference_tail(out, weight, bias, ecm, ls_eps, clamp_val):
    """OnlineNorm2d.forward after the norm: affine, then LayerScaling (group_size=-1) or ActivationClamp."""
    shape = (1, -1, 1, 1)
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    if ecm == "ls":
        moment2 = out.pow(2).mean(dim=(1, 2, 3), keepdim=True)
        return out / torch.sqrt(moment2 + ls_eps)
    if ecm == "ac":
        return torch.clamp(out, -clamp_val, clamp_val)
    return out


class Reference:
    """OnlineNorm2d (Norm2d, not the deprecated batched variant) in float64: state and parameters."""

    def __init__(self, channels, weight, bias, alpha_fwd=1023 / 1024, alpha_bkw=127 / 128, eps=1e-5, ecm="ls",
                 ls_eps=1e-5, clamp_value=5.0):
        self.m, self.var = torch.zeros(channels, dtype=torch.double), torch.ones(channels, dtype=torch.double)
        self.u, self.v = torch.zeros(channels, dtype=torch.double), torch.zeros(channels, dtype=torch.double)
        self.weight = None if weight is None else weight.detach().clone().requires_grad_()
        self.bias = None if bias is None else bias.detach().clone().requires_grad_()
        self.afwd, self.abkw, self.eps = alpha_fwd, alpha_bkw, eps
        self.ecm, self.ls_eps, self.clamp_value = ecm, ls_eps, clamp_value

    def train_step(self, x, upstream):
        """Forward and backward of one batch: (output, grad_in); weight/bias .grad accumulate."""
        out, scale, self.m, self.var = reference_norm_forward(x, self.m, self.var, self.afwd, self.eps)
        normed = out.clone().requires_grad_()  # the boundary of the reference's autograd.Function
        y = reference_tail(normed, self.weight, self.bias, self.ecm, self.ls_eps, self.clamp_value)
        y.backward(upstream)
        grad_in, self.u, self.v = reference_norm_backward(normed.grad, self.u, self.v, out, scale, self.abkw)
        return y.detach(), grad_in

    def evaluate(self, x):
        """Norm2d.forward in eval mode, then the same tail."""
        shape = (1, -1, 1, 1)
        out = (x - self.m.view(shape)) / torch.sqrt(self.var.view(shape) + self.eps)
        return reference_tail(out, self.weight, self.bias, self.ecm, self.ls_eps, self.clamp_value).detach()


# ---- helpers ------------------------------------------------------------------------------------


def _layer(channels=5, **opts):
    torch.manual_seed(0)
    layer = build_norm("online", channels, **opts).double()
    with torch.no_grad():
        for p in layer.parameters():  # off their initial values, so that ignoring gamma or beta shows
            p.add_(0.3 * torch.randn_like(p))
    return layer


def _reference_for(layer, affine=True, **opts):
    """The reference with the layer's parameters (none without ``affine``) and these options."""
    weight, bias = (layer.weight, layer.bias) if affine else (None, None)
    return Reference(layer.num_features, weight, bias, **opts)


def _batch(n, channels=5, step=0, hw=(4, 3)):
    """Per-channel offsets and scales (the statistics must matter), different per step."""
    g = torch.Generator().manual_seed(100 + step)
    off = 2 * torch.randn(1, channels, 1, 1, generator=g, dtype=torch.double)
    scale = 0.5 + 2 * torch.rand(1, channels, 1, 1, generator=g, dtype=torch.double)
    x = off + scale * torch.randn(n, channels, *hw, generator=g, dtype=torch.double)
    return x, torch.randn(x.shape, generator=g, dtype=torch.double)


def _train_and_compare(layer, ref, batches):
    for step, (x, upstream) in enumerate(batches):
        x_ours = x.clone().requires_grad_()
        out = layer(x_ours)
        expected, grad_expected = ref.train_step(x, upstream)
        out.backward(upstream)
        torch.testing.assert_close(out, expected, msg=f"output, step {step}")
        torch.testing.assert_close(x_ours.grad, grad_expected, msg=f"input gradient, step {step}")
        for name in ("weight", "bias"):
            p, p_ref = getattr(layer, name), getattr(ref, name)
            assert (p is None) == (p_ref is None)
            if p is not None:
                torch.testing.assert_close(p.grad, p_ref.grad, msg=f"{name} gradient, step {step}")
                p.grad = p_ref.grad = None
        for buf, expected_buf in (("stream_mean", ref.m), ("stream_var", ref.var), ("error_1", ref.u),
                                  ("error_y", ref.v)):
            torch.testing.assert_close(getattr(layer, buf), expected_buf, msg=f"{buf}, step {step}")


# ---- the definition against the reference -----------------------------------------------------------

# Each option at a value other than its default (ignoring one would use the default and fail the comparison).
OPTION_CASES = {
    "defaults": {},
    "alpha_fwd": {"alpha_fwd": 0.8},
    "alpha_bkw": {"alpha_bkw": 0.6},
    "eps": {"eps": 0.5},
    "ls_eps": {"ls_eps": 2.0},
    "ecm_ac_clamp_value": {"ecm": "ac", "clamp_value": 0.7},
    "ecm_none": {"ecm": "none", "alpha_fwd": 0.9, "alpha_bkw": 0.5},
    "affine_off": {"affine": False, "alpha_fwd": 0.9},
}


@pytest.mark.parametrize("batch", [1, 2, 7])
@pytest.mark.parametrize("case", OPTION_CASES)
def test_training_steps_are_the_references(case, batch):
    """Three training steps (state carried across them): output, input gradient (the control processes),
    gamma and beta gradients and the four state buffers equal the reference's, for every option."""
    opts = OPTION_CASES[case]
    layer = _layer(**opts)
    ref = _reference_for(layer, **opts)
    batches = [_batch(batch, step=step) for step in range(3)]
    _train_and_compare(layer, ref, batches)
    if opts.get("ecm") == "ac":  # the bound was reached, so clamp_value was exercised
        assert (layer(batches[0][0]).abs() == opts["clamp_value"]).any()


def test_a_long_batch_is_the_per_sample_loop():
    """Batch 128, where the vectorized recurrences (scans over the samples) replace the reference's loop: equal
    to it in float64, with a_b small enough that the accumulator's decay 1 - (1 - a_b) <y^2> changes sign."""
    opts = {"alpha_fwd": 0.9, "alpha_bkw": 0.5}
    layer = _layer(3, **opts)
    ref = _reference_for(layer, **opts)
    _train_and_compare(layer, ref, [_batch(128, channels=3, step=step, hw=(2, 2)) for step in range(2)])


def test_the_vectorized_recurrences_are_the_sequential_loop():
    """``_scan`` (any per-sample coefficient, zero and negative ones included) and ``_ema`` (a constant decay, 0 and
    1 included; by ``_decay_matrix`` up to 256 steps, by the scan beyond): the states before each step and the last
    one, as a loop computes them."""
    g = torch.Generator().manual_seed(0)

    def loop(h, coefs, adds):
        before = []
        for coef, add in zip(coefs, adds):
            before.append(h)
            h = coef * h + add
        return torch.stack(before), h

    for n in (1, 2, 3, 8, 37, 300):
        h0 = torch.randn(4, generator=g, dtype=torch.double)
        coef, add = (torch.randn(n, 4, generator=g, dtype=torch.double) for _ in range(2))
        coef[0, 0] = 0.0
        for got, expected in zip(_scan(h0, coef, add), loop(h0, coef, add)):
            torch.testing.assert_close(got, expected)
        for alpha, weight in ((0.9, 0.1), (0.0, 1.0), (1.0, 0.5)):
            got = _ema(h0, add, alpha, weight)
            for got_part, expected in zip(got, loop(h0, [alpha] * n, weight * add)):
                torch.testing.assert_close(got_part, expected)


def test_the_stream_does_not_depend_on_the_batch_partition():
    """One batch of 6 or three batches of 2 in turn (forward then backward each): the same outputs, input and
    parameter gradients and state; the first sample of a batch is normalized with the state before it alone."""
    whole, parts = _layer(), _layer()
    x, upstream = _batch(6)
    x_whole = x.clone().requires_grad_()
    out_whole = whole(x_whole)
    out_whole.backward(upstream)
    outs, grads = [], []
    for k in range(3):
        xk = x[2 * k:2 * k + 2].clone().requires_grad_()
        out = parts(xk)
        out.backward(upstream[2 * k:2 * k + 2])
        outs.append(out.detach())
        grads.append(xk.grad)
    torch.testing.assert_close(out_whole.detach(), torch.cat(outs))
    torch.testing.assert_close(x_whole.grad, torch.cat(grads))
    for (name, a), b in zip(whole.state_dict().items(), parts.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    torch.testing.assert_close(whole.weight.grad, parts.weight.grad)
    fresh = _layer()
    torch.testing.assert_close(fresh(x[:1]), _layer()(x)[:1])


@pytest.mark.parametrize("case", ["defaults", "ecm_ac_clamp_value", "affine_off", "eps"])
def test_evaluation_uses_the_frozen_streaming_statistics(case):
    """After training steps, evaluation is the reference's: (x - mu) / sqrt(sigma^2 + eps), the affine and the
    error compensation, every sample alone; no buffer moves."""
    opts = OPTION_CASES[case]
    layer = _layer(**opts)
    ref = _reference_for(layer, **opts)
    _train_and_compare(layer, ref, [_batch(4, step=step) for step in range(2)])
    layer.eval()
    before = copy.deepcopy(layer.state_dict())
    x, _ = _batch(3, step=9)
    out = layer(x)
    torch.testing.assert_close(out, ref.evaluate(x))
    torch.testing.assert_close(layer(x[1:2]), out[1:2])
    for name, value in layer.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_training_moves_the_statistics_and_the_accumulators():
    """The forward moves the streaming mean and variance (not the accumulators), the backward the accumulators."""
    layer = _layer()
    x, upstream = _batch(3)
    x = x.requires_grad_()
    out = layer(x)
    assert (layer.stream_mean != 0).all() and (layer.stream_var != 1).all()
    assert (layer.error_y == 0).all() and (layer.error_1 == 0).all()
    out.backward(upstream)
    assert (layer.error_y != 0).all() and (layer.error_1 != 0).all()


# ---- true gradients -------------------------------------------------------------------------------


def test_gamma_and_beta_get_their_true_gradients_in_training():
    """The affine and layer scaling are differentiated exactly (gradcheck on gamma and beta, the state reset
    before every forward so each sees the same streaming statistics); the input's gradient is the control
    processes' (not the forward's gradient), checked against the reference above."""
    layer = _layer(alpha_fwd=0.7)
    x, _ = _batch(3)
    state = copy.deepcopy({k: v for k, v in layer.state_dict().items() if k.startswith("stream")})

    def forward(weight, bias):
        layer.load_state_dict(state, strict=False)
        layer.weight, layer.bias = weight, bias
        return layer(x)

    w, b = (nn.Parameter(p.detach().clone()) for p in (layer.weight, layer.bias))
    assert torch.autograd.gradcheck(forward, (w, b))


@pytest.mark.parametrize("ecm", ["ls", "ac", "none"])
def test_evaluation_gradient_is_the_true_gradient(ecm):
    layer = _layer(ecm=ecm, clamp_value=0.9)
    _train_and_compare(layer, _reference_for(layer, ecm=ecm, clamp_value=0.9), [_batch(4)])
    layer.eval()
    x = _batch(2, step=5)[0].requires_grad_()

    def forward(x, weight, bias):
        layer.weight, layer.bias = weight, bias
        return layer(x)

    w, b = (nn.Parameter(p.detach().clone()) for p in (layer.weight, layer.bias))
    assert torch.autograd.gradcheck(forward, (x, w, b))


# ---- state, options, the registry -------------------------------------------------------------------------


def _small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), build_norm("online", 6, apply_act=True),
                         nn.Conv2d(6, 6, 3, padding=1, bias=False), build_norm("online", 6),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))


def _train(model, opt, steps, start):
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(3, 3, 6, 6, generator=g), torch.randint(0, 4, (3,), generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_state_dict_resumes_exactly():
    """Train 3 steps, save model and optimizer, load both into fresh ones, train 3 more: bit for bit the
    uninterrupted run's parameters and buffers (the streams and the accumulators are buffers)."""
    model = _small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, opt, 3, 0)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    _train(model, opt, 3, 3)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = _small_model()
    resumed.load_state_dict(saved["model"])
    resumed_opt = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
    resumed_opt.load_state_dict(saved["opt"])
    _train(resumed, resumed_opt, 3, 3)
    expected = model.state_dict()
    assert {k for k in expected if "error" in k or "stream" in k}  # the state is in it
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_defaults_are_the_authors_cifar_settings_and_the_layer_is_batch_independent():
    """alpha_fwd = 1023/1024, alpha_bkw = 127/128, layer scaling (experiments/resnet/cifar10_main.py);
    no batch-statistics layer, declared batch-independent; virtual_batch has no effect."""
    options = NORMS["online"].options
    assert options["alpha_fwd"] == 1023 / 1024 and options["alpha_bkw"] == 127 / 128 and options["ecm"] == "ls"
    assert options["eps"] == 1e-5 and options["ls_eps"] == 1e-5 and options["clamp_value"] == 5.0
    slot = build_norm("online", 4, apply_act=True)
    assert not any(isinstance(m, BatchStatNorm) for m in slot.modules()) and not is_batch_dependent("online")
    assert isinstance(slot[0], OnlineNorm) and isinstance(slot[1], nn.ReLU)
    x, _ = _batch(4)
    torch.testing.assert_close(_layer(virtual_batch=2)(x), _layer()(x))


def test_bf16_input_keeps_float32_state_and_returns_bf16(monkeypatch):
    """Under CPU bf16 autocast: a bf16 output and input gradient, float32 buffers equal to a float32 run's on
    the same values (statistics in float32 at least). The eager formula (the compiled one, which bf16 runs on a
    CPU use, is checked against float32 by tests/test_bf16.py; compiling it here would take most of this file's
    time)."""
    from normbench.norms import fused

    monkeypatch.setattr(fused, "_low_precision_on_cpu", lambda x: False)
    layer32 = build_norm("online", 4, alpha_fwd=0.8)
    layer16 = copy.deepcopy(layer32)
    x = (3 + torch.randn(2, 4, 5, 5)).bfloat16()
    upstream = torch.randn(2, 4, 5, 5).bfloat16()
    x16, x32 = x.clone().requires_grad_(), x.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = layer16(x16)
    out32 = layer32(x32)
    out16.backward(upstream)
    out32.backward(upstream.float())
    assert out16.dtype == x16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), out32.detach(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(x16.grad.float(), x32.grad, rtol=1e-2, atol=1e-2)
    for (name, b16), b32 in zip(layer16.named_buffers(), layer32.buffers()):
        assert b16.dtype == torch.float32, name
        torch.testing.assert_close(b16, b32, rtol=1e-5, atol=1e-6, msg=name)


def test_only_conv_feature_maps():
    with pytest.raises(ValueError, match="norm 'online' normalizes \\(N, C, H, W\\)"):
        build_norm("online", 4)(torch.randn(2, 4, 5))
