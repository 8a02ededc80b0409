"""Cross-Iteration Batch Normalization (Yao et al., CVPR 2021): BN statistics pooled over the last k training
iterations, each past iteration's statistics compensated for the change of the preceding conv's weights.

Checked against the authors' ``CBatchNorm2d`` (github.com/Howal/Cross-iterationBatchNorm,
mmdet/models/utils/CBN.py), transcribed in tests/test_cross_iteration.py. It replaces BN where BN's batch
statistics are too noisy (batch 1 to 8), like Batch Renorm, but keeps training on batch statistics.

The models know nothing about it (torchvision style: ``conv`` then ``norm_layer(C)``), and CBN needs the conv's
weight and input: its registry ``reparam`` (``remember_conv_inputs``, applied to every conv by
``apply_weight_reparam``) hooks each ``nn.Conv2d`` so that its training-mode output carries (conv, its input);
a CBN layer compensates through the conv whose unmodified output it receives, and refuses (NormConfigError) an
input that a conv upstream produced through something else (a residual add, an in-place ReLU).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from normbench.norms.batch_stat import BatchStatNorm, BatchStats, RunLength
from normbench.norms.fused import compile_disabled
from normbench.norms.layers import NormConfigError, init_affine

_SOURCE = "_cbn_source"  # the attribute a hooked conv sets on its training-mode output
# The per-iteration entries, (past iterations R = window - 1) first; G virtual batches, C channels, P weights of
# one output channel of the conv (C_in * kh * kw, plus 1 for its bias). Allocated at the first pooled step.
_PAST = {
    "past_mean": "mu of each past iteration, (R, G, C)",
    "past_var": "biased variance of each past iteration, (R, G, C)",
    "past_dmean": "d mu / d (W, b): the mean input patch, (R, G, P), the same for every output channel",
    "past_dvar": "d var / d (W, b) = 2 E[(y - mu) patch], (R, C, P, G)",
    # The derivatives dotted with the weights they were taken at: a shift d . (W_t - W_tau) is d . W_t minus
    # these, which spares each step the differences W_t - W_tau of every past entry (k - 1 copies of the weights).
    "past_mean_at": "d mu / d (W, b) . (W_tau, b_tau), (R, G, C)",
    "past_var_at": "d var / d (W, b) . (W_tau, b_tau), (R, C, G)",
}


class _ConvSource(NamedTuple):
    conv: nn.Conv2d
    input: torch.Tensor
    version: int  # the output's version counter when the conv returned it (an in-place op changes it)


@compile_disabled
def _remember_input(conv: nn.Conv2d, args: tuple, output: torch.Tensor) -> None:
    if conv.training:  # only training forwards pool statistics
        setattr(output, _SOURCE, _ConvSource(conv, args[0], output._version))


def remember_conv_inputs(layer: nn.Module, *, compensate: bool = True) -> None:
    """cbn's reparametrization: no weight changes; a forward hook on every conv so that the CBN after it can
    compensate its past statistics (nothing without ``compensate``: naive cross-iteration averaging)."""
    if not compensate or not isinstance(layer, nn.Conv2d) or getattr(layer, "_cbn_hooked", False):
        return
    if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        raise NormConfigError("norm 'cbn': compensation is written for convs with groups=1 and explicit zero "
                              f"padding, not {layer}; set norm.compensate=false")
    layer.register_forward_hook(_remember_input)
    layer._cbn_hooked = True


def _conv_upstream(x: torch.Tensor) -> str | None:
    """The operation that produced ``x`` if a convolution is upstream of it in the autograd graph, else None
    (also without a graph: under no_grad a misplaced layer cannot be told from a standalone one)."""
    todo, seen = [x.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__.startswith("Convolution"):
            return type(x.grad_fn).__name__
        todo.extend(f for f, _ in fn.next_functions)
    return None


def _fold(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, C, *S) -> (N/G, G*C, *S): the groups of consecutive samples as channels (a copy for G > 1)."""
    if groups == 1:
        return x
    n, c = x.shape[:2]
    return x.reshape(groups, n // groups, c, *x.shape[2:]).transpose(0, 1).reshape(n // groups, groups * c,
                                                                                 *x.shape[2:])


def _unfold(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    k, gc = x.shape[:2]
    return x.reshape(k, groups, gc // groups, *x.shape[2:]).transpose(0, 1).reshape(k * groups, gc // groups,
                                                                                    *x.shape[2:])


class _PooledBatchNorm(torch.autograd.Function):
    """(x - mean) / sqrt(var + eps) * weight + bias per channel of a folded map, the pooled ``mean`` and ``var``
    given, whose gradient flows through the current batch's statistics, the share ``share`` = 1/n of the pool:
    dx = share * BN's backward (with these mean, var) + (1 - share) * weight * g / sqrt(var + eps), the past
    entries being constants. Both terms are torch's batch-norm backward kernels (training and evaluation)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, share, eps: float, pooled: bool):
        out = torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)
        ctx.save_for_backward(x, weight, mean, var, share)
        ctx.eps, ctx.pooled = eps, pooled
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, var, share = ctx.saved_tensors
        affine = weight is not None
        current = share if weight is None else share * weight
        grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad, x, current, None, None, mean, torch.rsqrt(var + ctx.eps), True, ctx.eps, [True, affine, affine])
        if ctx.pooled:  # the rest of the pool does not move with x
            rest = 1.0 - share if weight is None else (1.0 - share) * weight
            rest_x = torch.ops.aten.native_batch_norm_backward(grad, x, rest, mean, var, None, None, False, ctx.eps,
                                                               [True, False, False])[0]
            grad_x = _float32_sum(grad_x, rest_x)
        return grad_x, grad_w, grad_b, None, None, None, None, None


def _float32_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b rounded once to their dtype (summed in float32 at least)."""
    if a.dtype in (torch.float32, torch.float64):
        return a.add_(b)
    return a.float().add_(b).to(a.dtype)


class CrossIterationBatchNorm(BatchStatNorm):
    """Cross-Iteration Batch Normalization (Yao et al. 2021), in conv positions (N, C, H, W).

    Training step t (after the burn-in), per channel c (and per virtual batch): the current batch's mean mu_t and
    biased variance var_t over (N, H, W), and the last k - 1 iterations' (``window`` = k), each moved to the
    current weights of the conv y = conv(x, W) + b that produces the norm's input, by a first-order Taylor
    expansion in (W, b) (the paper's compensation; ``compensate=False``: as they are, "naive" CBN):

        mu_{t-tau}(t)  = mu_{t-tau} + dmu/dW . dW_tau,        dW_tau = (W_t - W_{t-tau}, b_t - b_{t-tau})
        nu_{t-tau}(t)  = nu_{t-tau} + dnu/dW . dW_tau,        nu = E[y^2]
        var_{t-tau}(t) = nu_{t-tau}(t) - mu_{t-tau}(t)^2
                       = var_{t-tau} + dvar/dW . dW_tau - (dmu/dW . dW_tau)^2    (the same, without cancellation)

    in closed form: dmu_c/dW_c = E[patch] (the mean input patch, the same for every output channel),
    dmu_c/db_c = 1; dvar_c/dW_c = dnu_c/dW_c - 2 mu_c dmu_c/dW_c = 2 E[(y_c - mu_c) patch] (the conv's weight
    gradient of x with grad_output 2 (y - mu) / M), dvar_c/db_c = 0. A past entry whose compensated variance is
    negative is left out (per channel, as the reference does); the n valid entries, the current one always among
    them, are pooled with equal weights:

        mu_bar = (1/n) sum mu_{t-tau}(t),   var_bar = (1/n) sum nu_{t-tau}(t) - mu_bar^2
                                                    = (1/n) sum [var_{t-tau}(t) + (mu_{t-tau}(t) - mu_bar)^2]
        y = (x - mu_bar) / sqrt(var_bar + eps) * gamma + beta

    Gradients flow through the current batch's statistics only; the past entries and their compensation are
    constants (the reference compensates with ``weight.data``). Before pooling starts, for the first ``burnin``
    training steps (``burnin_unit='fraction'``, default: a fraction of the run's steps, which the trainer sets with
    ``set_training_length``; ``'steps'``: absolute steps; the reference counts epochs), the layer is BN; its
    entries are kept from the first pooled step on, so the pool grows to k entries over k steps (the reference).
    Evaluation: the running statistics, moved every training step (``momentum``, torch's convention) towards the
    current batch's own mean and unbiased variance, as BN's (the reference).

    Where this differs from the reference: eps inside the square root (the paper's equation and BN's; the
    reference's option ``out_p=True``, its default adding eps to the standard deviation); the biased variance
    during burn-in (BN; the reference's fallback normalizes with the unbiased one); the conv's bias compensated
    too (the reference's convs have none; here a conv keeps its bias where the norm has no affine); defaults
    k = 8, burn-in a quarter of the run (the paper's ImageNet setting, 25 of 90 epochs; its COCO configs use
    k = 4 and 8 of 12 epochs).

    Which conv: the registry's reparam (``remember_conv_inputs``) hooks every conv; a layer compensates through
    the conv whose unmodified training-mode output it receives. An input that a conv upstream produced through
    another operation (the pre-activation ResNet's norms after a residual add, the CNN's placement=after with its
    in-place ReLU) is refused with NormConfigError (under no_grad only the in-place case can be seen); an input
    no conv produced (a standalone layer) has nothing upstream to compensate. The hook and this forward are
    excluded from torch.compile (``compile_disabled``: a graph break around each conv-norm pair; checked on a
    CPU: the compiled model computes what the eager one does and refuses the same placements).

    Under bf16 autocast the statistics, the derivatives and the pooling are float32, the entries float32 buffers,
    the output the input's dtype.

    State across iterations (the entries, their derivatives dotted with the weights they were taken at, the step
    count) is in buffers, so a state_dict resumes exactly; the entry buffers take their shapes at the first pooled
    step (and from a loaded state_dict). The model-wide features:
    * ghost batches (``virtual_batch``): each of the G groups stands for one device of the paper's multi-GPU
      setting, with its own entries (statistics and derivatives; G x (k - 1) x |W| floats for d var / dW);
    * PreciseBN: the population statistics of the layer's input become the running statistics, as for BN (that
      pass, like batch-statistics evaluation, normalizes with each batch's own statistics, touching no entry);
    * batch-statistics evaluation: BN's statistics of each group, no buffer touched;
    * the FrozenBN tail: the running statistics, no entry kept, no step counted;
    * sync: not offered (the paper's own multi-device CBN pools per device).
    """

    def __init__(self, num_features: int, *, window: int = 8, burnin: float = 0.25, burnin_unit: str = "fraction",
                 compensate: bool = True, momentum: float = 0.1, eps: float = 1e-5, affine: bool = True,
                 virtual_batch: int | None = None, norm_name: str = "cbn"):
        super().__init__(num_features, momentum=momentum, eps=eps, virtual_batch=virtual_batch, norm_name=norm_name)
        self.schedule = RunLength(norm_name, burnin_unit, "burnin_unit", burnin=burnin)
        self.window, self.compensate = int(window), bool(compensate)
        self.burnin, self.burnin_unit = float(burnin), burnin_unit
        init_affine(self, num_features, affine)
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))  # training steps so far
        self.register_buffer("num_stored", torch.zeros((), dtype=torch.long))  # entries written (ring: mod R)
        for name in _PAST:
            self.register_buffer(name, torch.zeros(0))
        self._steps = self._stored = 0  # host copies of the two counters (no device sync per step)

    def set_training_length(self, total_steps: int) -> None:
        self.schedule.total_steps = int(total_steps)

    def _burnin_steps(self) -> float:
        return self.schedule.in_steps(self.burnin)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for name in _PAST:  # the entries take the saved shapes (allocated lazily)
            saved = state_dict.get(prefix + name)
            if saved is not None:
                setattr(self, name, torch.empty(saved.shape, dtype=self.running_mean.dtype,
                                                device=self.running_mean.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._steps, self._stored = int(self.num_steps), int(self.num_stored)

    @compile_disabled
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)

    def _source(self, x: torch.Tensor) -> _ConvSource | None:
        """The conv whose output ``x`` is (None: no conv produced it, or no compensation); NormConfigError where a
        conv produced it through another operation."""
        if not self.compensate:
            return None
        source = getattr(x, _SOURCE, None)
        if source is not None and source.version == x._version:
            return source
        between = "an in-place operation" if source is not None else _conv_upstream(x)
        if between is not None:
            raise NormConfigError(
                f"norm '{self.norm_name}': cbn compensates through the conv that produces its input, but the model "
                f"puts {between} between them (as the pre-activation ResNet's norms after a residual add, or the "
                f"CNN with placement=after); use a conv-norm model or norm.compensate=false")
        return None

    def _train_forward(self, x: torch.Tensor, groups: int, update: bool) -> torch.Tensor:
        source = self._source(x)
        if not update or self._steps < self._burnin_steps():  # BN (PreciseBN, batch-statistics eval, burn-in)
            out = self._fused_batch_norm(x, groups, self.weight, self.bias, update)
        else:
            out = self._pooled_forward(x, groups, source)
        if update:
            self._count_step()
        return out

    def _pooled_forward(self, x: torch.Tensor, groups: int, source: _ConvSource | None) -> torch.Tensor:
        folded = _fold(x, groups)
        # The statistics and the derivatives in float32 (autocast would run the matrix products in bf16), without
        # autograd: the gradient through the current batch's statistics is _PooledBatchNorm's.
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            stats = self._fused_kernel_stats(folded, groups, folded.numel() // folded.shape[1])  # (G, C)
            weights = None if source is None else _conv_weights(source.conv)
            mean, var, share = self._pooled_stats(stats, weights)
            if self.window > 1:
                self._store(stats, weights, folded, groups, source)
        per_group = lambda p: p if p is None or groups == 1 else p.repeat(groups)  # noqa: E731
        out = _PooledBatchNorm.apply(folded, per_group(self.weight), per_group(self.bias), mean.flatten(),
                                     var.flatten(), share.flatten(), self.eps, bool(self._filled()))
        if self._recording:
            self._record_gaps(mean, var)
        self._update_running_stats(stats)
        return _unfold(out, groups)

    def _filled(self) -> int:
        return min(self._stored, self.window - 1)

    def _pooled_stats(self, stats: BatchStats, weights: torch.Tensor | None):
        """mu_bar, var_bar and the current batch's share 1/n of the pool, (G, C) each."""
        n = self._filled()
        if n == 0:
            return stats.mean, stats.var, torch.ones_like(stats.mean)
        self._check_entries(stats.mean.shape[0], weights)
        mean, var = self.past_mean[:n], self.past_var[:n]  # (n, G, C)
        if weights is not None:  # d . (W_t - W_tau) = d . W_t - d . W_tau, the second kept with the entry
            mean_shift = torch.matmul(self.past_dmean[:n], weights.T).sub_(self.past_mean_at[:n])  # (n, G, C)
            var_shift = _dot_weights(self.past_dvar[:n], weights).sub_(self.past_var_at[:n])  # (n, C, G)
            mean = mean + mean_shift
            var = var + var_shift.transpose(1, 2) - mean_shift.square()
        valid = (var >= 0).to(mean.dtype)
        count = valid.sum(0).add_(1)
        pooled_mean = (stats.mean + (mean * valid).sum(0)) / count
        spread = (var + (mean - pooled_mean).square()) * valid
        pooled_var = (stats.var + (stats.mean - pooled_mean).square() + spread.sum(0)) / count
        return pooled_mean, pooled_var, count.reciprocal()

    def _check_entries(self, groups: int, weights: torch.Tensor | None) -> None:
        """The entries were kept for the same virtual batches and the same conv as this step's."""
        p = 0 if weights is None else weights.shape[1]
        if self.past_mean.shape[1] != groups or self.past_dmean.shape[2] != p:
            raise NormConfigError(
                f"norm '{self.norm_name}': the batch holds {groups} virtual batch(es) and its input comes "
                f"{'from a conv' if p else 'from no conv'}, but the kept statistics were for "
                f"{self.past_mean.shape[1]} and {'a conv' if self.past_dmean.shape[2] else 'no conv'}; keep the "
                f"batch size (norm.virtual_batch) and the model fixed during training")

    def _store(self, stats: BatchStats, weights: torch.Tensor | None, folded: torch.Tensor, groups: int,
               source: _ConvSource | None) -> None:
        """Keep this step's entry in the ring of the last k - 1 (its slot: the oldest)."""
        c, p = self.num_features, 0 if weights is None else weights.shape[1]
        if self.past_mean.numel() == 0:
            r, like = self.window - 1, self.running_mean
            shapes = {"past_mean": (r, groups, c), "past_var": (r, groups, c), "past_dmean": (r, groups, p),
                      "past_dvar": (r, c, p, groups), "past_mean_at": (r, groups, c), "past_var_at": (r, c, groups)}
            for name, shape in shapes.items():
                setattr(self, name, like.new_zeros(shape))
        self._check_entries(groups, weights)
        slot = self._stored % (self.window - 1)
        self.past_mean[slot] = stats.mean
        self.past_var[slot] = stats.var
        if source is not None:
            dmean, dvar = _stat_derivatives(source, folded, stats.mean, groups)
            self.past_dmean[slot] = dmean
            self.past_dvar[slot] = dvar.permute(1, 2, 0)
            self.past_mean_at[slot] = dmean @ weights.T
            self.past_var_at[slot] = _dot_weights(self.past_dvar[slot], weights)
        self._count_stored()

    def _record_gaps(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        """The recorded statistics are those it normalizes with (the pooled ones), before the running update."""
        with torch.no_grad():
            self.last_batch_mean = mean.squeeze(0) if mean.shape[0] == 1 else mean
            self.last_gaps = ((mean - self.running_mean).abs().mean(),
                              ((var + self.eps).log() - (self.running_var + self.eps).log()).abs().mean())

    # The counters live on the host as well (read every forward): kept out of torch.compile's graphs.
    @compile_disabled
    def _count_step(self) -> None:
        self.num_steps.add_(1)
        self._steps += 1

    @compile_disabled
    def _count_stored(self) -> None:
        self.num_stored.add_(1)
        self._stored += 1

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, window={self.window}, "
                f"burnin={self.burnin}, burnin_unit={self.burnin_unit}, compensate={self.compensate}, "
                f"virtual_batch={self.virtual_batch}")


def _conv_weights(conv: nn.Conv2d) -> torch.Tensor:
    """The conv's current (W, b) per output channel, (C, P), in float32 at least."""
    w = conv.weight.detach().flatten(1)
    if conv.bias is not None:
        w = torch.cat([w, conv.bias.detach().unsqueeze(1)], 1)
    return w.to(torch.promote_types(w.dtype, torch.float32))


def _dot_weights(dvar: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """d var / d(W, b) . (W, b) per channel and group: (n, C, P, G) or (C, P, G) with (C, P) -> (n, C, G) or
    (C, G). Measured on this project's CPU (one thread, C = 128, P = 576, n = 7): with one group a product and a
    sum, 5x faster than C row vectors times P x 1 matrices (bmm); with G groups bmm of the weights' row vector with
    each P x G matrix, 3.7-4.2x faster than the earlier (C, G, P) layout's bmm at G = 4 to 64 (P x G keeps the
    groups' entries of a weight side by side), and 2-10x faster than a product and a sum there."""
    if dvar.shape[-1] == 1:
        return (dvar[..., 0] * weights).sum(-1, keepdim=True)
    p, g = dvar.shape[-2:]
    rows = weights.expand(*dvar.shape[:-2], p).reshape(-1, 1, p)
    return torch.bmm(rows, dvar.reshape(-1, p, g)).view(*dvar.shape[:-2], g)


@functools.lru_cache(maxsize=256)
def _tap_matrix(taps: int, size_in: int, size_out: int, stride: int, padding: int, dilation: int,
                dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(taps, size_in): entry (a, y) is 1 where kernel tap a reads input position y at some output position i
    (y = i stride - padding + a dilation), else 0 (a padded position reads nothing). Cached per conv geometry:
    read only."""
    reads = (torch.arange(taps, device=device) * dilation).unsqueeze(1) + (
        torch.arange(size_out, device=device) * stride - padding)  # (taps, size_out)
    return (reads.unsqueeze(-1) == torch.arange(size_in, device=device)).sum(1).to(dtype)


def _stat_derivatives(source: _ConvSource, folded: torch.Tensor, mean: torch.Tensor, groups: int):
    """d mu / d(W, b), (G, P), and d var / d(W, b), (G, C, P), of each group's statistics of y = conv(x, W) + b
    (``folded``: y, its groups as channels; ``mean``: their means, (G, C)): the mean input patch and the conv's
    weight gradient of x with grad_output 2 (y - mu)/M, in float32 at least (on this project's CPU also 3-20x
    faster than in bf16)."""
    conv, dtype = source.conv, mean.dtype
    c = folded.shape[1] // groups
    count = folded.numel() // folded.shape[1]
    conv_input = source.input.to(dtype)
    x = _fold(conv_input, groups)
    kernel = conv.weight.shape[1:]
    # The mean patch, what conv2d_weight with grad_output 1/M computes: entry (c_in, a, b) sums the zero-padded
    # input at (i s - p + a d, j s - p + b d) over output positions (i, j), i.e. R_a . X . C_b^T for each group's
    # sum X over its samples, with 0/1 matrices selecting the rows (columns) that kernel row a (column b) reads:
    # two small matrix products (at batch 128 on a CPU 20x faster than the weight-gradient kernel, which reads
    # every sample; on one thread a third to a quarter of the time of the same sums as a correlation with an
    # all-ones kernel at batch 2, a fifth at 64 virtual batches of 2).
    group_sums = conv_input.unflatten(0, (groups, -1)).sum(1).flatten(0, 1)  # (G C_in, H, W)
    rows, cols = (_tap_matrix(*args, dtype, x.device) for args in zip(
        kernel[1:], conv_input.shape[2:], folded.shape[2:], conv.stride, conv.padding, conv.dilation))
    dmean = torch.matmul(torch.matmul(rows, group_sums), cols.T).reshape(groups, -1).div_(count)
    centered = (folded.to(dtype) - mean.reshape(1, -1, *[1] * (folded.ndim - 2))).mul_(2.0 / count)
    dvar = torch.nn.grad.conv2d_weight(x, (groups * c, *kernel), centered, conv.stride, conv.padding, conv.dilation,
                                       groups)
    dmean, dvar = dmean.flatten(1), dvar.reshape(groups, c, -1)
    if conv.bias is not None:  # d mu / db = 1, d var / db = 0
        dmean = F.pad(dmean, (0, 1), value=1.0)
        dvar = F.pad(dvar, (0, 1))
    return dmean, dvar
