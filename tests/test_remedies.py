"""The published remedies for BatchNorm's small-batch failure (issue 28), against their papers' equations
and the authors' / timm's reference formulas, in float64.

EvoNorm-B0 (Liu et al. 2020; timm's ``EvoNorm2dB0``, transcribed below): training forward and backward,
the running variance it moves, evaluation with that variance, ghost batches, the affine-only slot, and a
test per option that fails if the option is ignored.
"""

from __future__ import annotations

import copy

import pytest
import torch

from normbench.norms import build_norm
from tests.conftest import assert_same_forward_backward, assert_same_parameter_gradients

torch.set_num_threads(1)


def timm_evonorm_b0(x, running_var, weight, bias, v, momentum, eps, training):
    """timm's EvoNorm2dB0.forward (pytorch-image-models, timm/layers/evo_norm.py), written out: returns the
    output and the new running variance."""
    shape = (1, -1, 1, 1)
    if training:
        var = x.var(dim=(0, 2, 3), unbiased=False)
        n = x.numel() / x.shape[1]
        running_var = running_var * (1 - momentum) + var.detach() * momentum * (n / (n - 1))
    else:
        var = running_var
    left = (var + eps).sqrt().view(shape).expand_as(x)
    instance_std = x.var(dim=(2, 3), unbiased=False, keepdim=True).add(eps).sqrt().expand(x.shape)
    right = x * v.view(shape) + instance_std
    return x / left.max(right) * weight.view(shape) + bias.view(shape), running_var


def _layer(eps=1e-5, momentum=0.1, channels=6, **opts):
    torch.manual_seed(0)
    layer = build_norm("evonorm_b0", channels, apply_act=True, eps=eps, momentum=momentum, **opts).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
        layer.v.uniform_(-1.0, 1.5)
    return layer


@pytest.mark.parametrize("eps, momentum", [(1e-5, 0.1), (1e-3, 0.3)])
@pytest.mark.parametrize("batch", [1, 2, 8])
def test_evonorm_b0_trains_and_evaluates_as_timms_formula(eps, momentum, batch):
    """Three training steps (output, the input's and every parameter's gradient, the running variance), then
    an evaluation forward with the running variance: equal to timm's EvoNorm2dB0 in float64. Ignoring eps,
    momentum or v would fail it (each parametrized value is checked against the formula with that value)."""
    layer = _layer(eps, momentum)
    ref = {name: p.detach().clone().requires_grad_() for name, p in layer.named_parameters()}
    running_var = torch.ones(6, dtype=torch.double)
    for step in range(3):
        x = (torch.randn(batch, 6, 5, 4, dtype=torch.double, generator=torch.Generator().manual_seed(step)) * 2 + 0.5)
        upstream = torch.randn_like(x)
        running_var, = assert_same_forward_backward(
            layer, lambda x_ref: timm_evonorm_b0(x_ref, running_var, ref["weight"], ref["bias"], ref["v"], momentum,
                                                 eps, training=True), x, upstream)
        assert_same_parameter_gradients(layer, ref)
        for name, p in layer.named_parameters():
            p.grad = ref[name].grad = None
        torch.testing.assert_close(layer.running_var, running_var)
    layer.eval()
    x = torch.randn(3, 6, 5, 4, dtype=torch.double)
    expected, _ = timm_evonorm_b0(x, running_var, ref["weight"], ref["bias"], ref["v"], momentum, eps, training=False)
    torch.testing.assert_close(layer(x), expected)


def test_evonorm_b0_ghost_batches_normalize_each_group_by_its_own_variance():
    """virtual_batch=2 on a batch of 6: each pair of samples through the layer alone (statistics and output),
    and the running variance moved by the mean of the three groups' updates; without the option it differs."""
    ghost, whole = _layer(virtual_batch=2), _layer()
    alone = [copy.deepcopy(ghost) for _ in range(3)]
    x = torch.randn(6, 6, 4, 4, dtype=torch.double) * 3
    out = ghost(x)
    expected = torch.cat([m(x[2 * g:2 * g + 2]) for g, m in enumerate(alone)])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(ghost.running_var, torch.stack([m.running_var for m in alone]).mean(0))
    assert (whole(x) - out).abs().max() > 1e-3


def test_evonorm_b0_without_its_activation_is_the_affine_alone():
    torch.manual_seed(0)
    layer = build_norm("evonorm_b0", 4, apply_act=False).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    x = torch.randn(2, 4, 3, 3, dtype=torch.double)
    expected = x * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), expected)
    layer.eval()
    torch.testing.assert_close(layer(x), expected)
    assert layer.v is None


def test_evonorm_b0_depends_on_the_batch_in_training_only():
    """A sample's training output changes with the rest of its batch (var_B), its evaluation output does not."""
    layer = _layer()
    a, b = torch.randn(2, 6, 4, 4, dtype=torch.double), torch.randn(2, 6, 4, 4, dtype=torch.double) * 5
    first = layer(torch.cat([a, b[:1]]))[:2]
    second = layer(torch.cat([a, b[1:]]))[:2]
    assert (first - second).abs().max() > 1e-3
    layer.eval()
    torch.testing.assert_close(layer(torch.cat([a, b[:1]]))[:2], layer(torch.cat([a, b[1:]]))[:2])
