"""Weight reparametrizations (wn, sn, gn_ws) through ``torch.nn.utils.parametrize``.

Each weight norm is one reparametrization function here, ``fn(layer, **options)`` applied by
the registry's ``apply_weight_reparam(model, name, **options)`` to every ``nn.Conv2d`` and
``nn.Linear`` after the model is built (and before the optimizer is); its signature declares
the options it reads and their defaults:

* wn: w = g * v / ||v|| per output channel. torch's own
  ``torch.nn.utils.parametrizations.weight_norm`` (g = ``original0``, v = ``original1``), or,
  with ``exp_g=True``, ``ExpGainWeightNorm`` (g = exp(s), s = ``original0`` trained).
* sn: w / sigma_max(w), torch's ``spectral_norm`` (one persistent u per layer, power iteration
  in training forwards).
* gn_ws: ``WeightStandardization``: (w - mean) / sqrt(var + eps) per output channel over
  (in_ch, kh, kw) (biased variance, eps inside the square root, as in Qiao et al.).

wn (without mean-only BN) and sn leave the norm slot as Identity, so a bias-free layer would have
no per-channel shift at all (the replaced norm's beta is gone); such layers get a zero-initialised
bias, which is also the bias b of Salimans & Kingma's t = w.x + b that data-dependent init sets.

Every reparametrization computes the weight (and its norm, sigma or mean and variance) from the
float32 parameters with autocast off, so a bf16 run reparametrizes in float32 too (CUDA's autocast
would run spectral norm's ``torch.mv`` in bf16; the convolution then casts the weight itself).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm, _WeightNorm

from normbench.norms.batch_stat import MeanOnlyBatchNorm
from normbench.norms.layers import float32_at_least

_INIT_FLAG = "wn_init_done"


def _out_channel_norm(w: torch.Tensor) -> torch.Tensor:
    """||w|| per output channel (dim 0), shaped to broadcast against w."""
    return w.flatten(1).norm(dim=1).view(-1, *([1] * (w.ndim - 1)))


def _autocast_off(forward):
    """A parametrization's forward with autocast off: in float32 from the float32 parameters."""

    @functools.wraps(forward)
    def in_float32(self, *tensors: torch.Tensor) -> torch.Tensor:
        device = tensors[0].device.type
        if not torch.is_autocast_enabled(device):
            return forward(self, *tensors)
        with torch.autocast(device, enabled=False):
            return forward(self, *tensors)

    return in_float32


class Float32WeightNorm(_WeightNorm):
    """torch's weight_norm parametrization (w = g * v / ||v||, g = original0, v = original1), autocast off."""

    forward = _autocast_off(_WeightNorm.forward)


class Float32SpectralNorm(_SpectralNorm):
    """torch's spectral_norm parametrization (w / sigma, its u and v buffers), autocast off."""

    forward = _autocast_off(_SpectralNorm.forward)


class ExpGainWeightNorm(nn.Module):
    """Weight norm with log-parametrized gain: w = exp(s) * v / ||v|| (per output channel)."""

    @_autocast_off
    def forward(self, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return v * (s.exp() / _out_channel_norm(v))

    def right_inverse(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _out_channel_norm(w).log(), w


class WeightStandardization(nn.Module):
    """w_hat = (w - mean) / sqrt(var + eps) per output channel over all other dims (biased var)."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps

    @_autocast_off
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        # Per output channel over the rest is a training-mode batch norm of w as (1, out, rest): one
        # fused kernel forward and backward (as timm's StdConv2d), recomputed every forward.
        return F.batch_norm(w.reshape(1, w.shape[0], -1), None, None, training=True, momentum=0.0,
                            eps=self.eps).reshape_as(w)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


def _ensure_bias(mod: nn.Module) -> None:
    if mod.bias is None:
        w = mod.weight
        mod.bias = nn.Parameter(torch.zeros(w.shape[0], device=w.device, dtype=w.dtype))


def weight_norm_slot(num_features: int, *, mean_only_bn: bool = False, momentum: float = 0.1,
                     virtual_batch: int | None = None, norm_name: str = "wn") -> nn.Module:
    """wn's norm slot: mean-only batch norm (Salimans & Kingma's combination), or nothing."""
    if mean_only_bn:
        return MeanOnlyBatchNorm(num_features, momentum=momentum, virtual_batch=virtual_batch, norm_name=norm_name)
    return nn.Identity()


def weight_norm_reparam(layer: nn.Module, *, exp_g: bool = False, init: str = "none", mean_only_bn: bool = False) -> None:
    """w = g * v / ||v|| per output channel (g = exp(s) with exp_g). With init='data' the layer gets
    a bool buffer ``wn_init_done`` (in its state_dict) that ``data_dependent_init`` checks and sets."""
    if not mean_only_bn:
        _ensure_bias(layer)
    if init == "data":
        layer.register_buffer(_INIT_FLAG, torch.zeros((), dtype=torch.bool, device=layer.weight.device))
    if exp_g:
        parametrize.register_parametrization(layer, "weight", ExpGainWeightNorm())
    else:  # what torch.nn.utils.parametrizations.weight_norm(layer, "weight", dim=0) registers
        parametrize.register_parametrization(layer, "weight", Float32WeightNorm(0), unsafe=True)


def spectral_norm_reparam(layer: nn.Module, *, n_power_iterations: int = 1) -> None:
    """w / sigma_max(w), torch's spectral_norm (one persistent u, power iteration in training forwards)."""
    _ensure_bias(layer)
    # what torch.nn.utils.parametrizations.spectral_norm(layer, "weight", n_power_iterations) registers
    parametrize.register_parametrization(layer, "weight", Float32SpectralNorm(layer.weight, n_power_iterations, 0, 1e-12))


def standardize_weights(layer: nn.Module, *, ws_eps: float = 1e-5) -> None:
    """Weight standardization of convolutions (linear layers are left alone, as in Qiao et al.)."""
    if isinstance(layer, nn.Conv2d):
        parametrize.register_parametrization(layer, "weight", WeightStandardization(ws_eps))


def _wn_init_hook(mod: nn.Module, args, out: torch.Tensor):
    flag = getattr(mod, _INIT_FLAG)
    if bool(flag):  # layer called twice in one forward: already initialised
        return None
    out, dtype = float32_at_least(out), out.dtype  # the statistics in float32 (an init under autocast)
    param = mod.parametrizations.weight
    g_raw = param.original0
    exp_g = isinstance(param[0], ExpGainWeightNorm)
    g = g_raw.exp() if exp_g else g_raw
    cdim = out.ndim - 1 if isinstance(mod, nn.Linear) else 1
    shape = [1] * out.ndim
    shape[cdim] = -1
    u = out if mod.bias is None else out - mod.bias.view(shape)
    u = u / g.reshape(shape)  # u = (v / ||v||) . x, the pre-activation with g = 1, b = 0
    dims = tuple(d for d in range(out.ndim) if d != cdim)
    if out.numel() // out.shape[cdim] < 2:
        raise ValueError(
            "data_dependent_init: a weight-normalized layer sees only one value per output channel in this "
            f"batch (output shape {tuple(out.shape)}); pass a larger init batch (e.g. 128 training samples)"
        )
    var, mean = torch.var_mean(u, dim=dims, unbiased=False)
    inv_std = torch.rsqrt(var + 1e-10)
    g_raw.copy_((inv_std.log() if exp_g else inv_std).view_as(g_raw))
    new = u * inv_std.view(shape)
    if mod.bias is not None:
        mod.bias.copy_(-mean * inv_std)
        new = new - (mean * inv_std).view(shape)
    flag.fill_(True)
    return new.to(dtype)


def mark_initialized(layer: nn.Module) -> None:
    """Exclude a wn layer from data-dependent init (e.g. a residual branch deliberately started at zero)."""
    flag = getattr(layer, _INIT_FLAG, None)
    if isinstance(flag, torch.Tensor):
        flag.fill_(True)


def data_dependent_init(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Salimans & Kingma's data-dependent init of weight-normalized layers (wn, init='data').

    One forward of batch ``x`` (no gradients, current train/eval mode): as each not-yet-initialised
    WN layer runs, its pre-activations t = g * (v/||v||).x + b are measured on the batch, and
    g = 1/std (s = log(1/std) with exp_g), b = -mean/std are set per output channel, so that t has
    mean 0 and std 1; the layer then passes the *initialised* output on, so later layers are
    initialised on activations of the already-initialised earlier ones. Layers without a bias
    (wn with mean_only_bn, whose BN removes the mean) get only g. Each layer's ``wn_init_done``
    buffer is set, so calling again, or after loading a state_dict, does nothing. No-op when the
    model has no such layer. The batch need not be a training batch of the run's batch size: with
    batch size 1 a Linear layer sees one value per channel (std 0), so pass a larger init batch
    (ValueError if a layer sees fewer than 2 values per output channel).
    """
    todo = [m for m in model.modules() if isinstance(getattr(m, _INIT_FLAG, None), torch.Tensor)]
    todo = [m for m in todo if not bool(getattr(m, _INIT_FLAG))]
    if not todo:
        return model
    handles = [m.register_forward_hook(_wn_init_hook) for m in todo]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return model
