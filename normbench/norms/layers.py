"""The normalization layers that use no batch statistics, the thin builders of the norms torch has,
and what every layer shares: the error type of a bad norm option and the group-count rule.

Every layer takes feature maps of shape (N, C, *spatial) (the models use (N, C, H, W)) and is
vectorised: no Python loop over samples, channels or groups. Written by hand where torch has no
exact equivalent (FRN+TLU, EvoNorm-S0, AlexNet's LRN, with written-out gradients where autograd of
the formula was slow); GN, LN, IN and "no norm" are builders around torch's modules whose keyword
parameters declare the norm's options (the registry reads them). The layers that normalize with
batch statistics are in ``normbench.norms.batch_stat``.

A builder that can refuse an option value takes ``norm_name``, the name the norm was chosen by
(the registry passes it: gn and gn_ws share ``group_norm``), so that its message names that norm.

Precision: under bf16 autocast a convolution hands its norm a bf16 feature map. Every layer computes
its statistics and its normalization in float32 and returns the input's dtype (as timm's norm
layers do), through ``float32_at_least``, which leaves float32 tensors as they are: a float32 run
computes exactly the formula. torch's GN / LN / IN kernels accumulate in float32 themselves.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from normbench.errors import UserError
from normbench.norms.fused import cpu_fused, is_low_precision


class NormConfigError(UserError, ValueError):
    """A bad normalization option (name, option, group count, virtual batch). One-line message."""


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def check_groups(norm: str, num_channels: int, groups: int, group_size: int | None) -> int:
    """Number of groups for a grouped norm; ``group_size`` (when set) takes precedence over ``groups``."""
    if group_size is not None:
        if group_size > num_channels or num_channels % group_size:
            raise NormConfigError(
                f"norm '{norm}': a layer with {num_channels} channels cannot be split into groups of "
                f"group_size={group_size}; set norm.group_size to a divisor of {num_channels} "
                f"({_divisors(num_channels)}) or set norm.group_size=null and use norm.groups"
            )
        return num_channels // group_size
    if groups > num_channels or num_channels % groups:
        raise NormConfigError(
            f"norm '{norm}': a layer with {num_channels} channels cannot be split into groups={groups} "
            f"(channels must be a multiple of groups); set norm.groups to a divisor of {num_channels} "
            f"({_divisors(num_channels)}) or set norm.group_size"
        )
    return groups


def float32_at_least(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or as it is if float32 or float64: what every layer computes its statistics and
    its normalization in (a bf16 map under autocast converted once, explicitly, which on a CPU is also
    5-10x faster than the mixed-dtype elementwise ops that type promotion would run)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def per_channel(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """(C,) -> (1, C, 1, ...) to broadcast against an (N, C, *spatial) tensor."""
    return v.view(1, -1, *([1] * (ndim - 2)))


def affine_only(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gamma * x + beta per channel in float32 at least, in ``x``'s dtype: a norm-activation layer's slot
    without its activation (EvoNorm-S0 and -B0 there, as in the paper's code and timm)."""
    return torch.addcmul(per_channel(bias, x.ndim), float32_at_least(x), per_channel(weight, x.ndim)).to(x.dtype)


def init_affine(module: nn.Module, num_channels: int, affine: bool) -> None:
    """Per-channel gamma (ones) and beta (zeros) as module.weight / module.bias, or None."""
    if affine:
        module.weight = nn.Parameter(torch.ones(num_channels))
        module.bias = nn.Parameter(torch.zeros(num_channels))
    else:
        module.register_parameter("weight", None)
        module.register_parameter("bias", None)


def _spatial_dims(x: torch.Tensor, layer: str) -> tuple[int, ...]:
    if x.ndim < 3:
        raise ValueError(f"{layer} expects (N, C, *spatial) feature maps, got shape {tuple(x.shape)}")
    return tuple(range(2, x.ndim))


# --------------------------------------------------------------------------------------------
# Batch-independent layers
# --------------------------------------------------------------------------------------------


@cpu_fused
def _filter_response_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, tau: torch.Tensor | None,
                          eps) -> torch.Tensor:
    """FRN (+ TLU where ``tau`` is given) of ``x`` in float32 at least, returned in ``x``'s dtype."""
    x, dtype = float32_at_least(x), x.dtype
    dims = tuple(range(2, x.ndim))
    nu2 = torch.linalg.vector_norm(x, dim=dims, keepdim=True).square() / x[0, 0].numel()
    # gamma / sqrt(nu2 + eps) per sample and channel first: one multiply-add over the feature map.
    scale = torch.rsqrt(nu2 + eps) * per_channel(weight, x.ndim)
    if tau is None:
        return torch.addcmul(per_channel(bias, x.ndim), x, scale).to(dtype)
    # TLU max(y, tau) as relu(y - tau) + tau: the same values and gradients except at exact ties
    # (maximum splits the gradient there), and 3x faster in training on a CPU than torch.maximum,
    # whose backward masks and splits every element.
    tau = per_channel(tau, x.ndim)
    return (torch.relu_(torch.addcmul(per_channel(bias, x.ndim) - tau, x, scale)) + tau).to(dtype)


class FilterResponseNorm(nn.Module):
    """Filter response normalization + TLU (Singh & Krishnan 2019), a norm-*activation* layer.

    nu2 = mean(x^2 over H, W); x_hat = x / sqrt(nu2 + |eps|); y = gamma * x_hat + beta;
    with ``apply_act`` (where BN+ReLU stood) out = max(y, tau), the TLU being the layer's
    nonlinearity; without (before a residual add, in a shortcut) out = y and there is no tau.
    With ``learnable_eps`` the epsilon is eps + |eps_l|, eps_l a learned per-layer scalar
    initialised to 1e-4 (as in the paper).
    """

    def __init__(self, num_features: int, *, apply_act: bool = True, eps: float = 1e-6, learnable_eps: bool = False):
        super().__init__()
        self.num_features = num_features
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.tau = nn.Parameter(torch.zeros(num_features)) if apply_act else None
        self.eps_learned = nn.Parameter(torch.full((1,), 1e-4)) if learnable_eps else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _spatial_dims(x, "FilterResponseNorm")
        eps = abs(self.eps) if self.eps_learned is None else abs(self.eps) + self.eps_learned.abs()
        return _filter_response_norm(x, self.weight, self.bias, self.tau, eps)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, learnable_eps={self.eps_learned is not None}, "
                f"apply_act={self.tau is not None}")


def _groups_to_channels(t: torch.Tensor, channels: int, ndim: int) -> torch.Tensor:
    """(N, G) per-group values -> (N, C, 1, ...), each group's value on each of its C/G channels."""
    return t.repeat_interleave(channels // t.shape[1], dim=1).view(t.shape[0], channels, *([1] * (ndim - 2)))


class _GroupRstd(torch.autograd.Function):
    """1 / sqrt(var + eps) per sample and group of channels (biased variance over (C/G, *spatial)), (N, G),
    from torch's fused group-norm kernel (on a CPU 5x faster than var, whose single-pass reduction is
    slow), with its gradient written out: d/dx = -rstd^3 (x - mean) / M, M the values per group."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
        n, c = x.shape[:2]
        _, mean, rstd = torch.native_group_norm(float32_at_least(x), None, None, n, c, x[0, 0].numel(), groups, eps)
        ctx.save_for_backward(x, mean, rstd)
        ctx.groups = groups
        return rstd

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, mean, rstd = ctx.saved_tensors
        c = x.shape[1]
        coef = -grad * rstd.pow(3) / (c // ctx.groups * x[0, 0].numel())  # (N, G)
        coef, mean = _groups_to_channels(coef, c, x.ndim), _groups_to_channels(mean, c, x.ndim)
        return torch.addcmul(-mean * coef, float32_at_least(x), coef).to(x.dtype), None, None


@cpu_fused
def _evonorm_s0_float32(x: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                        eps: float) -> torch.Tensor:
    """EvoNorm-S0 with its gate (``EvoNormS0``'s formula) of a low-precision input in float32 through autograd,
    rounded once to the input's dtype; fused on a CPU (``cpu_fused``; the float32 path takes its group statistic
    from torch's group-norm kernel instead)."""
    x32 = x.float()
    grouped = x32.unflatten(1, (groups, x.shape[1] // groups))  # a view in either layout
    var = grouped.var(dim=tuple(range(2, grouped.ndim)), unbiased=False, keepdim=True)
    scale = (torch.rsqrt(var + eps) * weight.view(1, *grouped.shape[1:3], *([1] * (x.ndim - 2)))).flatten(1, 2)
    gated = x32 * torch.sigmoid(per_channel(v, x.ndim) * x32)
    return torch.addcmul(per_channel(bias, x.ndim), gated, scale).to(x.dtype)


class EvoNormS0(nn.Module):
    """EvoNorm-S0 (Liu et al. 2020), a norm-*activation* layer.

    With ``apply_act`` (where BN+ReLU stood): y = x * sigmoid(v * x) / group_std(x) * gamma + beta,
    group_std over (C/G, H, W) per sample and group, sqrt(var + eps) (biased variance).
    Without (where BN has no activation after it): y = x * gamma + beta, no v, exactly as the
    paper's reference code and timm's ``EvoNorm2dS0(apply_act=False)`` define the variant.
    v, gamma init 1, beta init 0, all per channel.
    """

    def __init__(self, num_features: int, *, apply_act: bool = True, groups: int = 8, group_size: int | None = None,
                 eps: float = 1e-5, norm_name: str = "evonorm_s0"):
        super().__init__()
        self.num_features = num_features
        self.groups = check_groups(norm_name, num_features, groups, group_size)
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.v = nn.Parameter(torch.ones(num_features)) if apply_act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _spatial_dims(x, "EvoNormS0")
        if self.v is None:
            return affine_only(x, self.weight, self.bias)
        if is_low_precision(x):
            return _evonorm_s0_float32(x, self.v, self.weight, self.bias, self.groups, self.eps)
        rstd = _GroupRstd.apply(x, self.groups, self.eps)  # (N, G), float32 at least
        # gamma / group_std per sample and channel first: the feature map is touched by the gate and one
        # multiply-add only.
        weight = per_channel(self.weight, x.ndim) * _groups_to_channels(rstd, x.shape[1], x.ndim)
        x32 = float32_at_least(x)
        gated = x32 * torch.sigmoid(per_channel(self.v, x.ndim) * x32)
        return torch.addcmul(per_channel(self.bias, x.ndim), gated, weight).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, groups={self.groups}, eps={self.eps}, apply_act={self.v is not None}"


def _channel_window_sum(t: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """out[:, c] = sum of t[:, c - before .. c + after] (channels outside are 0), without autograd."""
    c = t.shape[1]
    out = t.clone()
    for offset in range(1, min(after, c - 1) + 1):  # channel c + offset
        out[:, : c - offset] += t[:, offset:]
    for offset in range(1, min(before, c - 1) + 1):  # channel c - offset
        out[:, offset:] += t[:, : c - offset]
    return out


class _LocalResponseNorm(torch.autograd.Function):
    """y = x * D^-beta, D = k + alpha * (sum of x^2 over the channel window), with its gradient written
    out: dL/dx_c = g_c D_c^-beta - 2 alpha beta x_c * sum over the windows containing c of g y / D.
    The formula of F.local_response_norm, whose autograd graph (pad, avg_pool3d, pow in both passes)
    made a ResNet-20 training step 3x slower on a CPU."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
        before, after = size // 2, (size - 1) // 2
        denom = _channel_window_sum(x.square(), before, after).mul_(alpha).add_(k)
        if beta == 0.75:  # AlexNet's: D^-3/4 = 1 / sqrt(D sqrt(D)), 3x faster than pow on a CPU
            scale = denom.sqrt().mul_(denom).rsqrt_()
        else:
            scale = denom.pow(-beta)
        ctx.save_for_backward(x, denom, scale)
        ctx.constants = (before, after, alpha, beta)
        return x * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, denom, scale = ctx.saved_tensors
        before, after, alpha, beta = ctx.constants
        gy_over_d = grad * x * scale / denom  # g * y / D
        # The windows containing channel c are those of channels c - after .. c + before.
        spread = _channel_window_sum(gy_over_d, after, before)
        return torch.addcmul(grad * scale, x, spread, value=-2.0 * alpha * beta), None, None, None, None


def _mix_channels(t: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """out[:, c] = sum over c' of matrix[c, c'] * t[:, c'] for an (N, C, *spatial) ``t``, one matrix product in
    the layout ``t`` has: (C, C) @ (N, C, S) contiguous, (N, S, C) @ (C, C) channels-last (on a CPU 4x faster
    there than the shifted slices of ``_channel_window_sum``)."""
    last = t.movedim(1, -1)
    if last.is_contiguous() and not t.is_contiguous():
        return torch.matmul(last, matrix.t()).movedim(-1, 1)
    return torch.matmul(matrix, t.reshape(t.shape[0], t.shape[1], -1)).view(t.shape)


@cpu_fused
def _local_response_norm_float32(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, size: int,
                                 alpha: float, beta: float, k: float) -> torch.Tensor:
    """``LocalResponseNorm`` (its affine included) of a low-precision input (bf16 under autocast), in float32
    (autocast off: the window sums too) through autograd, rounded once to the input's dtype: the window sums
    one matrix product over channels in the input's layout. The formula of ``_LocalResponseNorm`` up to
    float32 rounding; fused on a CPU (``cpu_fused``)."""
    with torch.autocast(x.device.type, enabled=False):
        x32, channels = x.float(), x.shape[1]
        offset = torch.arange(channels, device=x.device)
        offset = offset.view(1, -1) - offset.view(-1, 1)  # c' - c
        windows = ((offset >= -(size // 2)) & (offset <= (size - 1) // 2)).float() * alpha
        denom = _mix_channels(x32.square(), windows) + k
        scale = torch.rsqrt(denom * torch.sqrt(denom)) if beta == 0.75 else denom.pow(-beta)
        y = x32 * scale
        if weight is not None:
            y = torch.addcmul(per_channel(bias, x.ndim), y, per_channel(weight, x.ndim))
        return y.to(x.dtype)


class LocalResponseNorm(nn.Module):
    """Local response normalization across channels as in AlexNet (Krizhevsky et al. 2012).

    b_c = a_c / (k + alpha * sum_{c' in [c - size//2, c + size//2]} a_{c'}^2) ** beta,
    with AlexNet's *un-averaged* alpha (torch's ``LocalResponseNorm`` divides alpha by size, so we
    pass alpha * size). Optional per-channel affine after it.

    A historical baseline, not a normalization in the modern sense: at AlexNet's constants
    (alpha=1e-4, k=2) and activations of a few units, as in these networks, the sum term is tiny
    and LRN(x) is within about 5e-4 of the constant scale x * 2**-0.75.

    A float32 (or float64) input goes through ``_LocalResponseNorm``, the formula as float32 runs have
    always computed it; a low-precision one (bf16 under autocast) through ``_local_response_norm_float32``,
    the same in float32, fused on a CPU, rounded once.
    """

    def __init__(
        self, num_features: int, *, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0,
        affine: bool = True,
    ):
        super().__init__()
        self.num_features = num_features
        self.size, self.alpha, self.beta, self.k = int(size), float(alpha), float(beta), float(k)
        init_affine(self, num_features, affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_low_precision(x):
            return _local_response_norm_float32(x, self.weight, self.bias, self.size, self.alpha, self.beta, self.k)
        y = _LocalResponseNorm.apply(x, self.size, self.alpha, self.beta, self.k)
        if self.weight is not None:
            y = torch.addcmul(per_channel(self.bias, x.ndim), y, per_channel(self.weight, x.ndim))
        return y

    def extra_repr(self) -> str:
        return f"{self.num_features}, size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"


# --------------------------------------------------------------------------------------------
# Norms that torch has: thin builders whose signatures declare the options and their defaults
# --------------------------------------------------------------------------------------------


class GroupNorm(nn.GroupNorm):
    """torch's GroupNorm (gn, gn_ws's slot, ln and in), with its statistics in float32 for a low-precision
    input also without affine parameters. With them (the default) torch's mixed-precision kernel does it
    itself: bf16 in, float32 statistics and arithmetic, bf16 out (measured: outputs and input gradients
    within the bf16 rounding of the float32 computation's). Without them it returns, and its backward
    reuses, a bf16 mean and rstd (input gradients 1.6x that rounding), so the input is converted."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None and is_low_precision(x):
            return super().forward(x.float()).to(x.dtype)
        return super().forward(x)


def no_norm(num_features: int) -> nn.Module:
    """No normalization: the slot is the identity."""
    return nn.Identity()


def layer_norm(num_features: int, *, eps: float = 1e-5, affine: bool = True) -> nn.Module:
    """Layer norm as the Group Norm paper defines it for conv nets: GroupNorm with one group."""
    return GroupNorm(1, num_features, eps=eps, affine=affine)


def instance_norm(num_features: int, *, eps: float = 1e-5, affine: bool = True) -> nn.Module:
    """Instance norm: per sample and channel over (H, W), which is GroupNorm with one channel per group
    (nn.InstanceNorm2d computes the same through a batch norm over N*C channels, 30% slower per
    training step at batch 2 on a CPU)."""
    return GroupNorm(num_features, num_features, eps=eps, affine=affine)


def group_norm(num_features: int, *, groups: int = 8, group_size: int | None = None, eps: float = 1e-5,
               affine: bool = True, norm_name: str = "gn") -> nn.Module:
    """Group norm (gn, and gn_ws's norm slot): per sample and group of channels over (C/G, H, W)."""
    return GroupNorm(check_groups(norm_name, num_features, groups, group_size), num_features, eps=eps,
                     affine=affine)
