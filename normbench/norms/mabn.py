"""Moving Average Batch Normalization (Yan et al., ICLR 2020, "Towards Stabilizing Batch Statistics in Backward
Propagation of Batch Normalization"; the authors' code: github.com/megvii-model/MABN, ``MABN.py``), with its
weight centring (the authors' ``CenConv2d``).

BN's training forward divides by a batch statistic and its backward subtracts two more (the batch means of
the gradient and of gradient x normalized input); at a batch of 2 all of them are noise. MABN keeps one of each
pass and averages it over the last ``sma_window`` training steps: the forward divides by the simple moving
average of the per-channel second moment E[x^2] (no mean is subtracted; centred conv weights keep the
pre-activations' mean near 0 instead), the backward subtracts the simple moving average of E[g z]. It replaces
BN where the normalization batch is small (one MABN per device).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from normbench.norms.batch_stat import BatchStatNorm, group_mean, group_sum
from normbench.norms import native
from normbench.norms.fused import compile_disabled, cpu_fused
from normbench.norms.layers import NormConfigError, affine_only, float32_at_least, init_affine, per_channel
from normbench.norms.weight import _autocast_off


def _fold(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, C, *S) -> (N/G, G*C, *S): virtual batch g's channels become channels g*C .. g*C+C-1, so that one
    per-channel kernel call treats every group (x itself, a view, without virtual batches)."""
    if groups == 1:
        return x
    n, c, spatial = x.shape[0], x.shape[1], x.shape[2:]
    return x.reshape(groups, n // groups, c, *spatial).transpose(0, 1).reshape(n // groups, groups * c, *spatial)


def _unfold(t: torch.Tensor, groups: int, shape: torch.Size) -> torch.Tensor:
    """The inverse of ``_fold``: (N/G, G*C, *S) -> ``shape`` (N, C, *S)."""
    if groups == 1:
        return t
    k, c = t.shape[0], shape[1]
    return t.reshape(k, groups, c, *shape[2:]).transpose(0, 1).reshape(shape)


def _input_gradient(grad: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dL/dy * a - x * b, the per-channel ``a`` and ``b`` broadcast, in float32 at least and returned in ``x``'s
    dtype."""
    return torch.addcmul(float32_at_least(grad) * a, float32_at_least(x), b, value=-1.0).to(x.dtype)


# The same in one fused loop for a bf16 map on a CPU, where eagerly it is five passes over the map (two
# conversions, two products, the rounding). Used from FUSED_FROM values on: a compiled call costs a fixed
# time that the passes it saves outweigh only on larger maps (measured on a ResNet-20 stage-1 map, one
# thread: at batch 2, 32k values, eager was faster; at batch 64, 2M values, fused took half the time).
_input_gradient_fused = cpu_fused(_input_gradient)
FUSED_FROM = 1 << 18


def _port(xf: torch.Tensor):
    """The C++ port of the training step (mabn_step.cpp) where it serves this map (float32 on a CPU), else None."""
    if xf.dtype != torch.float32 or xf.device.type != "cpu":
        return None
    return native.extension("mabn_step")


class _MovingAverageBatchNorm(torch.autograd.Function):
    """y = x * r gamma / sqrt(chi + eps) + beta per folded channel, chi and r (None: 1) constants (G, C); backward
    (the paper's Algorithm 1, the authors' ``BatchNormFunction.backward``), with z = x / sqrt(chi + eps) and
    g = dL/dy * gamma * r:

        psi = mean over (N, H, W) of g * z                       per group and channel (G, C)
        dL/dx = (g - z * psi_bar) / sqrt(chi + eps),   psi_bar = psi, or the mean of ``psi_window`` (the last
                                                         steps' psi, this one's written at ``slot``) if use_sma
        dL/dgamma = sum of dL/dy * r z,   dL/dbeta = sum of dL/dy

    With chi the current batch's E[x^2], r = 1 and psi_bar = psi this is the exact gradient of x / sqrt(E[x^2]
    + eps); with the moving averages it is the paper's approximation (the history is constant). ``psi_window``
    None: nothing is written (a pass that keeps the layer's state). On the folded map (N/G, G*C, *S) through
    torch's batch-norm kernels in evaluation mode (mean 0, variance chi), which read a bf16 map in float32
    arithmetic: the output and the two sums of the backward each one kernel call."""

    @staticmethod
    def forward(ctx, xf, weight, bias, chi, r, psi_window, slot: int, use_sma: bool, eps: float):
        groups = chi.shape[0]
        if r is not None:
            scale = r if weight is None else r * weight
        else:
            scale = torch.ones_like(chi) if weight is None else weight.expand_as(chi)
        scale = scale.reshape(-1)  # (G*C), a view of the weight without virtual batches
        bias = None if bias is None else bias if groups == 1 else bias.repeat(groups)
        zeros = torch.zeros_like(scale)
        out = F.batch_norm(xf, zeros, chi.view(-1), scale, bias, False, 0.0, eps)
        ctx.save_for_backward(xf, chi, r, scale, zeros)
        ctx.psi_window, ctx.slot, ctx.use_sma, ctx.eps = psi_window, slot, use_sma, eps
        ctx.affine = weight is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        xf, chi, r, scale, zeros = ctx.saved_tensors
        groups, channels = chi.shape
        # The sums of dL/dy * x / sqrt(chi + eps) and of dL/dy per folded channel (in float32 at least): what an
        # evaluation-mode batch-norm backward with mean 0 and variance chi returns for its weight and bias.
        _, dot, grad_sum = torch.ops.aten.native_batch_norm_backward(
            grad, xf, scale, zeros, chi.view(-1), None, None, False, ctx.eps, [False, True, True])
        dot, grad_sum, scale = dot.view(groups, channels), grad_sum.view(groups, channels), scale.view(groups, channels)
        psi = scale * dot / (xf.numel() // xf.shape[1])
        psi_bar = psi
        if ctx.psi_window is not None:
            ctx.psi_window[ctx.slot].copy_(psi)
            if ctx.use_sma:
                psi_bar = ctx.psi_window.mean(0)
        var = chi + ctx.eps
        # (g - z psi_bar) / sqrt(chi + eps) = dL/dy * r gamma / sqrt(chi + eps) - x * psi_bar / (chi + eps)
        a, b = (per_channel(t.reshape(-1), xf.ndim) for t in (scale * var.rsqrt(), psi_bar / var))
        grad_x = (_input_gradient_fused if xf.numel() >= FUSED_FROM else _input_gradient)(grad, xf, a, b)
        if not ctx.affine:
            return grad_x, None, None, None, None, None, None, None, None
        grad_weight = group_sum(dot if r is None else dot * r)
        return grad_x, grad_weight, group_sum(grad_sum), None, None, None, None, None, None


class MovingAverageBatchNorm(BatchStatNorm):
    """Moving Average Batch Normalization (Yan et al. 2020), the authors' ``MABN2d`` (``MABN.py``).

    Training step t (1, 2, ... counted in the buffer ``num_steps``), per channel and virtual batch, L =
    ``sma_window``:

        chi_t   = mean over (N, H, W) of x^2                       the batch's second moment
        chi_bar = (chi_t + chi_{t-1} + ... + chi_{t-L+1}) / L      if t > L and t >= sma_warmup, else chi_t
        r       = clip(sqrt((chi_bar + eps) / (chi_ema + eps)), 1/r_max, r_max)
                                                                   if t > max(renorm_start, sma_warmup), else 1
        y       = gamma * r * x / sqrt(chi_bar + eps) + beta       r constant
        chi_ema <- chi_ema + momentum * (chi_bar - chi_ema)        after r (``running_var``, init 1)

    no mean subtracted. The backward is the paper's, with psi = E[g z] averaged the same way
    (``_MovingAverageBatchNorm``): the true gradient during the warm-up, the approximation after it. Evaluation:
    y = gamma * x / sqrt(chi_ema + eps) + beta. The windows of chi and psi are the buffers ``window_x2`` and
    ``window_psi`` (L, G, C), the slot of step t at t mod L as in the authors' code.

    Defaults: the authors'. ``sma_window=16``: their small-batch setting (``real_B / B`` = 32 / 2, normalization
    batch 2, averages over 32 images); ``sma_warmup=100`` steps (``warmup_iters``), ``renorm_start=1000`` and
    ``r_max=5`` (their constants: r = 1 for max(1000, warmup_iters) steps, then clipped to [1/5, 5]),
    ``momentum=0.02`` (their keep factor 0.98, torch's convention here: the weight of the new value), eps 1e-5.
    The lengths are steps, not fractions of the run: the warm-up covers the first steps, when the weights
    change too fast for statistics of the last L steps to describe the current ones, and the renormalization
    waits for chi_ema, whose time constant is 1/momentum = 50 steps, to have converged. So they scale with the
    steps of fast change (the lr warm-up's, if it is longer) and with 1/momentum, not with the run's length:
    a warm-up of at most L steps changes nothing (the averages start after the first window anyway), a
    renorm_start below a few 1/momentum compares chi_bar with an unconverged chi_ema. (The authors' ImageNet
    code, ``cls/networks/MABN.py``, averages from the second step and renormalizes from the 100th, of 600k.)
    In a run shorter than ``renorm_start`` steps r stays 1.

    Ghost batches (``virtual_batch=k``): the paper's small-batch setting is one MABN per device, each with its
    own statistics; here each of the G = N/k groups keeps its own windows (G, C) and is normalized by its own
    chi_bar and psi_bar, as G separate layers would. The groups share chi_ema (moved by the mean of their
    chi_bar: exactly the mean of G separate layers' running statistics, the EMA being linear), so r of each
    group renormalizes towards that shared statistic where separate devices would each use their own. G is
    fixed at the first training step: the trainer drops the last partial batch (``normbench.data``), so every
    training step has the same G; a training step with another G is refused (NormConfigError), the windows
    holding the history of G other groups.

    What the model-wide modes mean for MABN:

    * PreciseBN (``modes.precise_bn_update``): what evaluation divides by is the second moment, so chi_ema
      (``running_var``) becomes the population E[x^2] per channel over every sample and position of the
      batches, not their variance. During that pass each batch (or virtual batch) is normalized by its own
      current chi, no window, counter or running statistic moving (the batch-statistics forward of BN's
      PreciseBN).
    * batch-statistics evaluation (``modes.batch_stats_mode``): each group of the evaluation batch is
      normalized by its own current second moment (r = 1, no moving average), touching no buffer.
    * the FrozenBN tail (``modes.freeze_batch_stats``): the evaluation forward in training, gradients
      through gamma, beta and the fixed scale 1 / sqrt(chi_ema + eps); no buffer moves, no step counted.
    * the statistic gaps (``modes.recording_batch_stats``): mean gap 0 (no mean is used), log-variance gap
      mean |log(chi_bar + eps) - log(chi_ema + eps)|, the statistic a training step divides by against the
      one evaluation would (before the step's update); ``last_batch_mean`` is the batch mean, for the record.
    * sync: not offered. MABN's statistics are per device by design: its answer to a small per-device batch
      is the history of that device's steps, not the other devices' batches.

    ``running_mean``, which the base class keeps (and PreciseBN would set), is not used: MABN subtracts no
    mean. Weight centring of every convolution (``centre_conv_weights``) is the norm's reparametrization.

    A float32 training step on a CPU (not recording gaps) runs as C++ (``mabn_step.cpp``, built on first use by
    ``normbench.norms.native``): the calls of ``_train_forward`` and ``_MovingAverageBatchNorm`` below, in their
    order, so the same values bit for bit; measured at ResNet-20 batch 2, 0.72x BN's steps/s against 0.62x for
    the Python path (one thread, process time, paired with BN, in the bench's steady state, another job running).
    """

    def __init__(self, num_features: int, *, sma_window: int = 16, sma_warmup: int = 100, renorm_start: int = 1000,
                 r_max: float = 5.0, momentum: float = 0.02, eps: float = 1e-5, affine: bool = True,
                 virtual_batch: int | None = None, norm_name: str = "mabn"):
        super().__init__(num_features, momentum=momentum, eps=eps, virtual_batch=virtual_batch, norm_name=norm_name)
        self.sma_window, self.sma_warmup, self.renorm_start = int(sma_window), int(sma_warmup), int(renorm_start)
        self.r_max = float(r_max)
        self.register_buffer("window_x2", torch.zeros(self.sma_window, 1, num_features))
        self.register_buffer("window_psi", torch.zeros(self.sma_window, 1, num_features))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        self._steps = 0  # == num_steps, kept on the host (set again when a state_dict is loaded): no sync
        init_affine(self, num_features, affine)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", sma_window={self.sma_window}, sma_warmup={self.sma_warmup}, "
                f"renorm_start={self.renorm_start}, r_max={self.r_max}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # The windows' group count is that of the run that saved them (fixed at its first step).
        for name in ("window_x2", "window_psi"):
            saved, own = state_dict.get(prefix + name), getattr(self, name)
            if saved is not None and saved.ndim == 3 and saved.shape[::2] == own.shape[::2]:
                setattr(self, name, own.new_zeros(saved.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._steps = int(self.num_steps)

    def _second_moment(self, xf: torch.Tensor) -> torch.Tensor:
        """E[x^2] per channel of the folded map (N/G, G*C, *S), as var + mean^2 from torch's batch-norm statistics
        kernel (one pass, a bf16 map read in float32 arithmetic, which its float32 buffer selects)."""
        scratch = torch.zeros(xf.shape[1], dtype=torch.promote_types(xf.dtype, torch.float32), device=xf.device)
        with torch.no_grad():
            mean, var = torch.batch_norm_update_stats(xf, scratch, None, 0.0)
            return torch.addcmul(var, mean, mean)

    def _windows_for(self, groups: int) -> None:
        if self.window_x2.shape[1] == groups:
            return
        if self._steps:
            raise NormConfigError(
                f"norm '{self.norm_name}': a training batch of {groups} virtual batches after "
                f"{self.window_x2.shape[1]} in the earlier steps; each virtual batch keeps its own moving averages, "
                f"so every training batch must hold the same number of them (train with one batch size)")
        self.window_x2 = self.window_x2.new_zeros(self.sma_window, groups, self.num_features)
        self.window_psi = self.window_psi.new_zeros(self.sma_window, groups, self.num_features)

    def averages_at(self, step: int) -> bool:
        """Whether training step ``step`` (1, 2, ...) normalizes with the moving averages, not the batch's own."""
        return step > self.sma_window and step >= self.sma_warmup

    def renormalizes_at(self, step: int) -> bool:
        """Whether training step ``step`` renormalizes towards the running statistic (r computed, not 1)."""
        return step > max(self.renorm_start, self.sma_warmup)

    # The step count and what it selects live on the host: kept out of torch.compile's graphs, which would
    # otherwise be specialized on it and recompiled every step.
    @compile_disabled
    def _train_forward(self, x: torch.Tensor, groups: int, update: bool) -> torch.Tensor:
        xf = _fold(x, groups)
        port = _port(xf) if update and not self._recording else None
        if port is not None:  # this step's calls below, made from C++ (the same values, ``normbench.norms.native``)
            self._windows_for(groups)
            step = self._steps + 1
            out = port.train_step(xf, groups, self.weight, self.bias, self.window_x2, self.window_psi,
                                  self.running_var, self.num_steps, step, self.sma_window, self.sma_warmup,
                                  self.renorm_start, self.r_max, self.momentum, self.eps)
            self._steps = step
            return _unfold(out, groups, x.shape)
        chi = self._second_moment(xf).view(groups, -1)
        r, psi_window, slot, use_sma = None, None, 0, False
        if update:
            self._windows_for(groups)
            step = self._steps + 1
            slot = step % self.sma_window
            self.window_x2[slot].copy_(chi)
            use_sma = self.averages_at(step)
            with torch.no_grad():
                if use_sma:
                    chi = self.window_x2.mean(0)
                if self.renormalizes_at(step):
                    r = ((chi + self.eps) / (self.running_var + self.eps)).sqrt_().clamp_(1.0 / self.r_max, self.r_max)
                if self._recording:
                    self._record(x, groups, chi)
                self.running_var.lerp_(group_mean(chi), self.momentum)
            psi_window = self.window_psi
            self.num_steps.add_(1)
            self._steps = step
        out = _MovingAverageBatchNorm.apply(xf, self.weight, self.bias, chi, r, psi_window, slot, use_sma, self.eps)
        return _unfold(out, groups, x.shape)

    def _record(self, x: torch.Tensor, groups: int, chi: torch.Tensor) -> None:
        mean = self._grouped(float32_at_least(x.detach()), groups).mean(dim=(1, 3))
        self.last_batch_mean = mean.squeeze(0) if groups == 1 else mean
        log_gap = ((chi + self.eps).log() - (self.running_var + self.eps).log()).abs().mean()
        self.last_gaps = (torch.zeros_like(log_gap), log_gap)

    @torch.no_grad()
    def _observe(self, x: torch.Tensor, groups: int) -> None:
        """PreciseBN's accumulation, [count, E[x^2] per channel] over every batch (the gaps are recorded by the
        training forward, which knows the statistic it divides by)."""
        acc = self._precise_acc
        if acc is None:
            return
        second_moment = self._second_moment(x.detach())
        count, new = acc[0], x.numel() // x.shape[1]
        acc[1] = second_moment if count == 0 else acc[1].lerp(second_moment, new / (count + new))
        acc[0] = count + new

    def _set_population_stats(self, acc: list) -> None:
        if acc[0]:
            with torch.no_grad():
                self.running_var.copy_(acc[1])

    def _eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.rsqrt(self.running_var + self.eps)
        if self.weight is None:
            return (float32_at_least(x) * per_channel(scale, x.ndim)).to(x.dtype)
        return affine_only(x, scale * self.weight, self.bias)


class CentredWeight(nn.Module):
    """w - mean(w) per output channel (over input channels and kernel positions): the authors' CenConv2d."""

    @_autocast_off
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w - w.mean(dim=tuple(range(1, w.ndim)), keepdim=True)


def centre_conv_weights(layer: nn.Module) -> None:
    """MABN's weight centring of every convolution (the authors' CenConv2d; linear layers are left alone)."""
    if isinstance(layer, nn.Conv2d):
        parametrize.register_parametrization(layer, "weight", CentredWeight())
