"""The layers that normalize with batch statistics in training: BN, Batch Renorm, mean-only BN.

They share a base class, ``BatchStatNorm``: the interface the model-wide modes
(``normbench.norms.modes``: PreciseBN, batch-statistics evaluation, the FrozenBN tail, stat
recording) and the sync option drive. The registry's ``NormInfo.batch_dependent`` is the one
declaration that a norm is batch-dependent; ``build_norm`` refuses a norm whose layer does not
match it (declared batch-dependent without a ``BatchStatNorm``, or the other way round), so no
mode can skip such a layer silently.

The base class computes the training statistics in one function (``_batch_stats``; unsynchronized
BN leaves them to torch's fused kernel, which computes the same), runs every training forward
through one template (``forward``: observe, then the subclass's ``_train_forward``) and adds, on
top of the plain layer:

* ghost / virtual batches (``virtual_batch=k``): statistics over consecutive groups of k
  samples; the group index is folded into the channel dimension so one kernel call does it;
  the rule (k divides the batch) is ``virtual_batches``;
* synchronized statistics (``sync=True``, bn and brn): in a data-parallel run, statistics over
  every rank's batch together (SyncBN, through ``normbench.norms.cross_rank``); the identity in a
  single process;
* what the modes read and set: the batch statistics of a recorded forward and their gap to the
  running statistics, the population statistics PreciseBN accumulates, and a switch that keeps
  the running statistics (and Batch Renorm's step count) as they are during a forward.

Under bf16 autocast (a bf16 input) every statistic is computed in float32, by torch's kernel in its
mixed precision (bf16 in, float32 arithmetic) or on the input converted to float32 in the paths
through autograd; the running statistics stay float32 and the output has the input's dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from normbench.norms.cross_rank import combine_over_ranks, data_parallel_world, sync_batch_norm_cuda
from normbench.norms.fused import compile_disabled, cpu_fused, is_low_precision
from normbench.norms.layers import NormConfigError, affine_only, float32_at_least, init_affine, per_channel


def virtual_batches(norm: str, virtual_batch: int | None, batch_size: int) -> int:
    """How many virtual batches of ``virtual_batch`` samples a batch of ``batch_size`` holds (1 without a
    virtual batch): the virtual-batch rule, that it divides the batch (checked by the layers at every
    training forward and by the run's validation on its batch size)."""
    if virtual_batch is None or virtual_batch == batch_size:
        return 1
    if batch_size % virtual_batch:
        raise NormConfigError(
            f"norm '{norm}': norm.virtual_batch={virtual_batch} does not divide batch_size={batch_size}; "
            f"set norm.virtual_batch to a divisor of every training batch size (the normalization batch is a "
            f"slice of it), or null"
        )
    return batch_size // virtual_batch


# (G, C) -> (C,) over the virtual batches: a view for one, since at batch 2 every kernel call counts.
def group_mean(t: torch.Tensor) -> torch.Tensor:
    return t[0] if t.shape[0] == 1 else t.mean(0)


def group_sum(t: torch.Tensor) -> torch.Tensor:
    return t[0] if t.shape[0] == 1 else t.sum(0)


class RunLength:
    """A layer's schedule over training (Batch Renorm's relaxation, CBN's burn-in): lengths in ``unit``, fractions
    of the run's training steps (``fraction``, the run's length set by ``set_training_length``) or absolute steps
    (``steps``); ``unit_key`` is the option that chose the unit, for messages. The one rule for such lengths."""

    def __init__(self, norm_name: str, unit: str, unit_key: str, **lengths: float):
        for key, value in lengths.items():
            if unit == "fraction" and not 0.0 <= value <= 1.0:
                raise NormConfigError(f"norm '{norm_name}': {key}={value} must be a fraction of training in [0, 1] "
                                      f"(or set norm.{unit_key}=steps)")
            if unit == "steps" and value != int(value):
                raise NormConfigError(f"norm '{norm_name}': {key}={value} must be a whole number of steps with "
                                      f"{unit_key}=steps")
        self.norm_name, self.unit, self.unit_key = norm_name, unit, unit_key
        self.total_steps: int | None = None  # set by set_training_length (unit 'fraction')

    def in_steps(self, length: float) -> float:
        if self.unit == "steps":
            return length
        if self.total_steps is None:
            raise RuntimeError(f"norm '{self.norm_name}' with {self.unit_key}='fraction' needs the run's length: call "
                               "normbench.norms.set_training_length(model, total_steps) before training")
        return length * self.total_steps


def _unbiased_divisor(count):
    """n - 1 (at least 1): what a sum of squared deviations over n values is divided by for the unbiased
    variance (n an int, or a tensor of counts)."""
    if isinstance(count, torch.Tensor):
        return (count - 1).clamp_min(1)
    return max(count - 1, 1)


def _bessel(count):
    """n / (n - 1): biased variance over n values -> unbiased (n an int, or a tensor of counts)."""
    return count / _unbiased_divisor(count)


class BatchStats(NamedTuple):
    """Training statistics of a batch-statistics layer, per group and channel (G, C)."""

    mean: torch.Tensor
    var: torch.Tensor | None  # biased; None where the layer divides by no variance
    count: int | torch.Tensor  # values behind each statistic


class BatchStatNorm(nn.Module):
    """Base of every layer that normalizes with batch statistics in training.

    Buffers: ``running_mean`` (C,) and, if the layer divides by a standard deviation,
    ``running_var`` (C,) (unbiased, like torch's BatchNorm). A subclass writes its training
    forward (``_train_forward``) and, if it differs from BN's, its evaluation (``_eval_forward``).
    """

    def __init__(
        self,
        num_features: int,
        *,
        momentum: float,
        eps: float,
        virtual_batch: int | None,
        sync: bool = False,
        track_var: bool = True,
        norm_name: str,
    ):
        super().__init__()
        self.num_features = num_features
        self.momentum = float(momentum)
        self.eps = float(eps)
        self.virtual_batch = virtual_batch
        self.sync = bool(sync)
        self.norm_name = norm_name  # the norm it was chosen as, for messages
        self.register_buffer("running_mean", torch.zeros(num_features))
        if track_var:
            self.register_buffer("running_var", torch.ones(num_features))
        else:
            self.register_buffer("running_var", None)
        # Set by the modes of normbench.norms.modes for the length of a pass (not state).
        self._recording = False  # recording_batch_stats: keep the batch statistics and their gaps
        # precise_bn_update / batch_stats_mode: normalize with batch statistics, but leave the running
        # statistics (and Batch Renorm's step count) as they are, and record nothing.
        self._keep_running_stats = False
        self._precise_acc: list | None = None  # [count, mean, m2] while accumulating population stats
        self.last_batch_mean: torch.Tensor | None = None
        self.last_gaps: tuple[torch.Tensor, torch.Tensor] | None = None

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"virtual_batch={self.virtual_batch}, sync={self.sync}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self._eval_forward(x)
        groups = virtual_batches(self.norm_name, self.virtual_batch, x.shape[0])
        if self._recording or self._precise_acc is not None:
            self._observe(x, groups)
        return self._train_forward(x, groups, not self._keep_running_stats)

    def _train_forward(self, x: torch.Tensor, groups: int, update: bool) -> torch.Tensor:
        """Normalize ``x`` with the statistics of each of its ``groups`` virtual batches; with ``update``
        move the running statistics (and any step count)."""
        raise NotImplementedError

    # -- helpers -----------------------------------------------------------------------------
    def _grouped(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        """(N, C, *S) -> (G, N/G, C, prod(S)): group g holds samples g*k .. g*k+k-1."""
        return x.reshape(groups, x.shape[0] // groups, x.shape[1], -1)

    def _syncs(self) -> bool:
        """Whether the training statistics span every rank's batch: ``sync`` in a data-parallel run,
        without a virtual batch (a virtual batch fixes the normalization batch: its statistics stay
        per group, the per-device statistics that synchronized BN is compared with)."""
        return self.sync and self.virtual_batch is None and data_parallel_world() > 1

    def _batch_stats(self, xs: torch.Tensor, with_var: bool = True) -> BatchStats:
        """The statistics this layer normalizes with in training (the one place they are computed):
        mean and biased variance per group and channel of the grouped input ``xs`` (G, k, C, S), in
        float32 at least (also under autocast), with gradients. Synchronized: the statistics of every
        rank's batch together, from every rank's count, mean and sum of squared deviations."""
        count = xs.shape[1] * xs.shape[3]
        if not self._syncs():
            if not with_var:
                return BatchStats(float32_at_least(xs).mean(dim=(1, 3)), None, count)
            if not (torch.is_grad_enabled() and xs.requires_grad):
                return self._kernel_stats(xs, count)
            var, mean = torch.var_mean(float32_at_least(xs), dim=(1, 3), unbiased=False)
            return BatchStats(mean, var, count)
        var, mean = torch.var_mean(float32_at_least(xs), dim=(1, 3), unbiased=False)
        total_count, mean, m2 = combine_over_ranks(torch.full_like(mean, count), mean, var * count)
        return BatchStats(mean, m2 / total_count, total_count)

    def _kernel_stats(self, xs: torch.Tensor, count: int) -> BatchStats:
        """Without gradients: the statistics of the fused batch-norm kernel (on a CPU 3x faster than
        var_mean) of the grouped input ``xs``, the groups folded into channels, (G, k, C, S) -> (k, G*C, S, 1):
        without a virtual batch a view of the input in its own layout (a 4-d channels-last view keeps the
        kernel's channels-last path)."""
        g, k, c = xs.shape[:3]
        return self._fused_kernel_stats(xs.transpose(0, 1).reshape(k, g * c, -1, 1), g, count)

    def _fused_kernel_stats(self, folded: torch.Tensor, groups: int, count: int) -> BatchStats:
        """The statistics of torch's training-mode batch-norm kernel on ``folded`` (k, G*C, *S), what the fused
        forward normalizes, per group and channel (G, C): its mean, and var = 1/invstd^2 - eps from its invstd,
        as float32 runs have always computed them. On a CPU through ``batch_norm_update_stats``, the statistics
        of a training-mode forward without its output (invstd from its variance as that forward computes it,
        in float64, bit for bit), a low-precision input read as it is, in float32 arithmetic (the kernel's
        mixed precision, which a float32 buffer selects); elsewhere through the forward itself, in float32."""
        if folded.device.type == "cpu":
            dtype = torch.promote_types(folded.dtype, torch.float32)
            scratch = torch.zeros(folded.shape[1], dtype=dtype, device=folded.device)
            mean, biased_var = torch.batch_norm_update_stats(folded, scratch, None, 0.0)
            invstd = biased_var.double().add_(self.eps).sqrt_().reciprocal_().to(biased_var.dtype)
        else:
            _, mean, invstd = torch.native_batch_norm(float32_at_least(folded.flatten(2)), None, None, None, None,
                                                      True, 0.0, self.eps)
        var = invstd.square().reciprocal_().sub_(self.eps)
        return BatchStats(mean.view(groups, -1), var.view(groups, -1), count)

    @torch.no_grad()
    def _update_running_stats(self, stats: BatchStats) -> None:
        """Move the running estimates towards this batch's statistics: the mean over groups of the
        group means and of the unbiased group variances."""
        self.running_mean.lerp_(group_mean(stats.mean), self.momentum)
        if self.running_var is not None:
            self.running_var.lerp_(group_mean(stats.var * _bessel(stats.count)), self.momentum)

    def _scale_and_shift(self, x: torch.Tensor, xs: torch.Tensor, stats: BatchStats, scale: torch.Tensor,
                         shift: torch.Tensor, update: bool) -> torch.Tensor:
        """The grouped input ``xs`` (G, k, C, S) of ``x`` times ``scale`` plus ``shift`` (G, C), the affine
        folded in, shaped and typed as ``x``; with ``update`` the running statistics move to ``stats``.
        The end of a forward through ``_batch_stats`` and autograd (the synchronized one)."""
        if self.weight is not None:
            scale = scale * self.weight
            shift = shift * self.weight + self.bias
        out = xs * scale.unsqueeze(1).unsqueeze(-1) + shift.unsqueeze(1).unsqueeze(-1)
        if update:
            self._update_running_stats(stats)
        return out.reshape(x.shape).to(x.dtype)

    @torch.no_grad()
    def _observe(self, x: torch.Tensor, groups: int) -> None:
        """Record batch stats / accumulate population stats. Called in training before any update."""
        x = x.detach().float()
        if self._recording and not self._keep_running_stats:
            stats = self._batch_stats(self._grouped(x, groups), with_var=self.running_var is not None)
            mean, var = stats.mean, stats.var  # (G, C), the stats used
            self.last_batch_mean = mean.squeeze(0) if groups == 1 else mean
            mean_gap = (mean - self.running_mean).abs().mean()
            if self.running_var is None:
                var_gap = torch.zeros((), device=x.device, dtype=mean_gap.dtype)
            else:
                var_gap = ((var + self.eps).log() - (self.running_var + self.eps).log()).abs().mean()
            self.last_gaps = (mean_gap, var_gap)
        acc = self._precise_acc
        if acc is not None:
            # Chan et al. parallel update of (count, mean, M2) over the whole batch, per channel.
            xs = x.transpose(0, 1).reshape(x.shape[1], -1)
            n_b = xs.shape[1]
            var_b, mean_b = torch.var_mean(xs, dim=1, unbiased=False)
            m2_b = var_b * n_b
            n_a, mean_a, m2_a = acc
            if n_a == 0:
                acc[:] = [n_b, mean_b, m2_b]
            else:
                n = n_a + n_b
                delta = mean_b - mean_a
                acc[:] = [n, mean_a + delta * (n_b / n), m2_a + m2_b + delta.square() * (n_a * n_b / n)]

    def _fused_batch_norm(self, x: torch.Tensor, groups: int, weight: torch.Tensor | None,
                          bias: torch.Tensor | None, update: bool) -> torch.Tensor:
        """Unsynchronized training forward through torch's fused kernel, which computes the statistics
        of ``_batch_stats`` and applies them in one call (through ``_batch_stats`` and autograd, a
        ResNet-20 step at batch 128 on a CPU took 13% longer with virtual batches of 32, 38% with
        virtual batches of 2): x_hat * weight + bias, the affine per channel (C,) or per group and
        channel (G, C). Ghost batches are folded into the channels, (N, C, *S) -> (k, G*C, *S), so one
        call normalizes every group. With ``update`` the running statistics move as
        ``_update_running_stats`` moves them (the mean over groups of each group's update). The kernel
        computes a low-precision input's statistics in float32 when a float32 tensor comes with it
        (weight, bias or running statistics); without any (no affine and no update) it is converted."""
        if weight is None and not update and is_low_precision(x):
            return self._fused_batch_norm(x.float(), groups, weight, bias, update).to(x.dtype)
        if groups == 1:
            rm, rv = (self.running_mean, self.running_var) if update else (None, None)
            flat = lambda p: p if p is None or p.ndim == 1 else p.reshape(-1)  # noqa: E731
            return F.batch_norm(x, rm, rv, flat(weight), flat(bias), True, self.momentum, self.eps)
        n, c, spatial = x.shape[0], x.shape[1], x.shape[2:]
        k = n // groups
        xf = x.reshape(groups, k, c, *spatial).transpose(0, 1).reshape(k, groups * c, *spatial)
        per_group = lambda p: None if p is None else (p.repeat(groups) if p.ndim == 1 else p.reshape(-1))  # noqa: E731
        rm, rv = (self.running_mean.repeat(groups), self.running_var.repeat(groups)) if update else (None, None)
        out = F.batch_norm(xf, rm, rv, per_group(weight), per_group(bias), True, self.momentum, self.eps)
        if update:
            with torch.no_grad():
                self.running_mean.copy_(rm.view(groups, c).mean(0))
                self.running_var.copy_(rv.view(groups, c).mean(0))
        return out.reshape(k, groups, c, *spatial).transpose(0, 1).reshape(x.shape)

    def _eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluation: normalize with the running estimates."""
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def _set_population_stats(self, acc: list) -> None:
        n, mean, m2 = acc
        if n == 0:
            return
        with torch.no_grad():
            if self._syncs():  # the population of every rank's batches
                n, mean, m2 = combine_over_ranks(torch.full_like(mean, n), mean, m2)
            self.running_mean.copy_(mean)
            if self.running_var is not None:
                self.running_var.copy_(m2 / _unbiased_divisor(n))


class _RenormalizedBatchNorm(torch.autograd.Function):
    """Batch Renorm's training forward without a virtual batch, in one autograd node: torch's fused
    batch-norm kernel with weight r * gamma and bias d * gamma + beta (r, d constants), its backward, and
    the gradients to gamma and beta that autograd of those two products would give, r * dL/dw + d * dL/db
    and dL/db, the same float32 operations (at batch 2 on a CPU, three autograd nodes and their inputs
    were a tenth of the layer's time). Without affine the kernel's weight and bias are r and d."""

    @staticmethod
    def forward(ctx, x, weight, bias, r, d, running_mean, running_var, momentum: float, eps: float):
        w, b = (r, d) if weight is None else (r * weight, torch.addcmul(bias, d, weight))
        out, save_mean, save_invstd = torch.native_batch_norm(x, w, b, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(x, w, running_mean, running_var, save_mean, save_invstd, r, d)
        ctx.eps, ctx.affine = eps, weight is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w, running_mean, running_var, save_mean, save_invstd, r, d = ctx.saved_tensors
        grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad, x, w, running_mean, running_var, save_mean, save_invstd, True, ctx.eps,
            [ctx.needs_input_grad[0], ctx.affine, ctx.affine])
        if not ctx.affine:
            return grad_x, None, None, None, None, None, None, None, None
        return grad_x, grad_w * r + grad_b * d, grad_b, None, None, None, None, None, None


class BatchNorm(BatchStatNorm):
    """Batch normalization (Ioffe & Szegedy 2015) with ghost batches and PreciseBN.

    Training: per-channel statistics over (N, H, W) (biased variance, as in the paper and torch);
    eval: running estimates. With ``virtual_batch=k`` the statistics are taken over each group of
    k consecutive samples. Running statistics are then updated with the *mean of the per-group
    statistics* (mean of group means, mean of unbiased group variances), i.e. exactly the average
    of the G updates torch's BatchNorm would make if it saw the groups one after another from the
    same starting point. With ``sync=True`` in a data-parallel run the statistics (and so the
    running estimates, the same on every rank) are those of every rank's batch together
    (SyncBatchNorm); on GPUs through torch.nn.SyncBatchNorm's kernels.
    """

    def __init__(self, num_features: int, *, momentum: float = 0.1, eps: float = 1e-5, affine: bool = True,
                 virtual_batch: int | None = None, sync: bool = False, norm_name: str = "bn"):
        super().__init__(num_features, momentum=momentum, eps=eps, virtual_batch=virtual_batch, sync=sync,
                         norm_name=norm_name)
        init_affine(self, num_features, affine)

    def _train_forward(self, x: torch.Tensor, groups: int, update: bool) -> torch.Tensor:
        if self._syncs():
            if x.is_cuda:
                rm, rv = (self.running_mean, self.running_var) if update else (None, None)
                return sync_batch_norm_cuda(x, self.weight, self.bias, rm, rv, self.eps, self.momentum)
            return self._normalize_with_batch_stats(x, update)
        return self._fused_batch_norm(x, groups, self.weight, self.bias, update)

    def _normalize_with_batch_stats(self, x: torch.Tensor, update: bool) -> torch.Tensor:
        """BN with the statistics of ``_batch_stats`` (the synchronized ones: no virtual batch here)."""
        xs = float32_at_least(self._grouped(x, 1))  # (1, N, C, S)
        stats = self._batch_stats(xs)
        scale = torch.rsqrt(stats.var + self.eps)  # (1, C)
        return self._scale_and_shift(x, xs, stats, scale, -stats.mean * scale, update)


class BatchRenorm(BatchStatNorm):
    """Batch renormalization (Ioffe 2017).

    Training: y = ((x - mu_B) / sigma_B * r + d) * gamma + beta with
    r = clip(sigma_B / sigma, 1/r_max, r_max), d = clip((mu_B - mu) / sigma, -d_max, d_max),
    r and d treated as constants (no gradient), sigma_B = sqrt(var_B + eps) (biased batch variance),
    sigma = sqrt(running_var + eps). Eval: (x - mu) / sigma * gamma + beta.

    The moving statistics are kept as mean and (unbiased) variance like BatchNorm, and updated
    every training step with ``momentum``: mu += momentum * (mu_B - mu), var += momentum * (var_B - var).

    Clipping limits follow the paper's shape: r_max = 1, d_max = 0 for the first ``relax_start``
    training steps, then linear ramps reaching ``r_max`` after ``r_relax`` more steps and ``d_max``
    after ``d_relax`` more steps (d before r). With ``relax_unit='fraction'`` (default) the three
    lengths are fractions of the run's training steps, which the trainer sets with
    ``set_training_length``: by default the limits stay at (1, 0) for the first 20% of training,
    d reaches 5 at 40% and r reaches 3 at 60%, whatever the run's length. With
    ``relax_unit='steps'`` they are absolute steps (paper: 5000 / 35000 / 20000, with momentum 0.01).
    (Which units there are is the registry's rule for the option; the lengths' rule, which depends
    on the unit, is this layer's.)

    Why not the paper's proportions (5k of ~160k steps, alpha = 0.01): its warm period was about six
    ImageNet epochs (50 workers x 32 images x 5k steps), so the network was past its fast early
    changes and the moving averages (time constant 1/alpha = 100 steps) had converged before any
    correction. In a short run 5% falls inside the LR warmup and 100 steps is half the run:
    measured here (plain CNN, 8,000 CIFAR-10 images, 3 epochs, batch 128, 186 steps) BRN reached
    14% test accuracy with 5% / alpha=0.01 against BN's 53%, and 47% with a 20% warm period and
    alpha = 0.1 (torch's BN default, time constant 10 steps), the defaults here.
    Steps are counted in the buffer ``num_steps`` (one per training forward), so the schedule
    survives state_dict save/load. The limits are computed on-device (no sync). With ``sync=True``
    in a data-parallel run mu_B and sigma_B are the statistics of every rank's batch together.
    """

    def __init__(self, num_features: int, *, momentum: float = 0.1, eps: float = 1e-5, affine: bool = True,
                 r_max: float = 3.0, d_max: float = 5.0, relax_unit: str = "fraction", relax_start: float = 0.2,
                 r_relax: float = 0.4, d_relax: float = 0.2, virtual_batch: int | None = None, sync: bool = False,
                 norm_name: str = "brn"):
        super().__init__(num_features, momentum=momentum, eps=eps, virtual_batch=virtual_batch, sync=sync,
                         norm_name=norm_name)
        self.schedule = RunLength(norm_name, relax_unit, "relax_unit", relax_start=relax_start, r_relax=r_relax,
                                  d_relax=d_relax)
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.relax_unit = relax_unit
        self.relax_start, self.r_relax, self.d_relax = float(relax_start), float(r_relax), float(d_relax)
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        self._steps = 0  # == num_steps, kept on the host (set again when a state_dict is loaded)
        init_affine(self, num_features, affine)

    def set_training_length(self, total_steps: int) -> None:
        self.schedule.total_steps = int(total_steps)

    def _in_steps(self, length: float) -> float:
        return self.schedule.in_steps(length)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._steps = int(self.num_steps)

    def _ramp(self, length: float) -> float:
        t = self._steps - self._in_steps(self.relax_start)
        length = self._in_steps(length)
        if length <= 0:
            return float(t >= 0)
        return min(max(t / length, 0.0), 1.0)

    def current_limits(self) -> tuple[float, float]:
        """(r_max, d_max) in force at the current step. Computed from ``_steps``, the host's copy of the
        ``num_steps`` buffer (no device sync, and a dozen fewer tensor ops per layer and step)."""
        r_lim = 1.0 + (self.r_max - 1.0) * self._ramp(self.r_relax)
        d_lim = self.d_max * self._ramp(self.d_relax)
        return r_lim, d_lim

    def _train_forward(self, x: torch.Tensor, groups: int, update: bool) -> torch.Tensor:
        if self._syncs():
            out = self._renormalize_with_batch_stats(x, groups, update)
        else:
            # ((x - mu_B) / sigma_B * r + d) * gamma + beta == x_hat * (r gamma) + (d gamma + beta): torch's
            # fused batch norm with that affine, r and d constants (the statistics for them computed once
            # more without gradients: per training step at batch 2 on a CPU, 1.4x faster than through
            # autograd of every elementwise op).
            r, d = self._corrections(self._batch_stats_no_grad(x, groups))
            if groups == 1:
                rm, rv = (self.running_mean, self.running_var) if update else (None, None)
                out = _RenormalizedBatchNorm.apply(x, self.weight, self.bias, r.view(-1), d.view(-1), rm, rv,
                                                   self.momentum, self.eps)
            else:
                weight, bias = ((r, d) if self.weight is None
                                else (r * self.weight, torch.addcmul(self.bias, d, self.weight)))
                out = self._fused_batch_norm(x, groups, weight, bias, update)
        if update:
            self._count_step()
        return out

    @torch.no_grad()
    def _batch_stats_no_grad(self, x: torch.Tensor, groups: int) -> BatchStats:
        if groups == 1:  # what the fused forward normalizes is x itself
            return self._fused_kernel_stats(x, 1, x.numel() // x.shape[1])
        return self._batch_stats(self._grouped(x.detach(), groups))

    # The step count and the limits it sets live on the host (a Python int read every forward): kept out
    # of torch.compile's graphs, which would otherwise be specialized on it and recompiled every step.
    @compile_disabled
    def _count_step(self) -> None:
        self.num_steps.add_(1)
        self._steps += 1

    @compile_disabled
    @torch.no_grad()
    def _corrections(self, stats: BatchStats) -> tuple[torch.Tensor, torch.Tensor]:
        """r = clip(sigma_B / sigma, 1/r_max, r_max), d = clip((mu_B - mu) / sigma, -d_max, d_max), (G, C),
        with the running statistics before this step's update."""
        std = self.running_var.add(self.eps).sqrt_()
        r_lim, d_lim = self.current_limits()
        r = stats.var.add(self.eps).sqrt_().div_(std).clamp_(min=1.0 / r_lim, max=r_lim)
        d = torch.sub(stats.mean, self.running_mean).div_(std).clamp_(min=-d_lim, max=d_lim)
        return r, d

    def _renormalize_with_batch_stats(self, x: torch.Tensor, groups: int, update: bool) -> torch.Tensor:
        """The forward with the statistics of ``_batch_stats`` through autograd (the synchronized ones)."""
        xs = float32_at_least(self._grouped(x, groups))  # (G, k, C, S)
        stats = self._batch_stats(xs)
        r, d = self._corrections(stats)
        # (x - mu_B) / sigma_B * r + d  ==  x * scale + shift, gradients through mu_B, sigma_B only.
        scale = r / (stats.var + self.eps).sqrt()
        return self._scale_and_shift(x, xs, stats, scale, d - stats.mean * scale, update)

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", r_max={self.r_max}, d_max={self.d_max}, relax_unit={self.relax_unit}, "
            f"relax_start={self.relax_start}, r_relax={self.r_relax}, d_relax={self.d_relax}"
        )


class MeanOnlyBatchNorm(BatchStatNorm):
    """Mean-only batch norm (Salimans & Kingma 2016), used with weight normalization.

    Training: y = x - mu_B + beta (per-channel batch mean over (N, H, W), no division by a
    standard deviation); eval: y = x - running_mean + beta. Learned bias beta (C,), init 0.
    """

    def __init__(self, num_features: int, *, momentum: float = 0.1, virtual_batch: int | None = None,
                 norm_name: str = "wn"):
        super().__init__(num_features, momentum=momentum, eps=0.0, virtual_batch=virtual_batch, track_var=False,
                         norm_name=norm_name)
        self.bias = nn.Parameter(torch.zeros(num_features))

    def _eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        return (float32_at_least(x) - per_channel(self.running_mean - self.bias, x.ndim)).to(x.dtype)

    def _train_forward(self, x: torch.Tensor, groups: int, update: bool) -> torch.Tensor:
        xs = float32_at_least(self._grouped(x, groups))
        stats = self._batch_stats(xs, with_var=False)
        out = xs - stats.mean.unsqueeze(1).unsqueeze(-1) + self.bias.view(1, 1, -1, 1)
        if update:
            self._update_running_stats(stats)
        return out.reshape(x.shape).to(x.dtype)


def _evonorm_b0(x: torch.Tensor, batch_std: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                eps: float) -> torch.Tensor:
    """x / max(batch_std, v x + instance_std(x)) * gamma + beta on a float32 grouped map ``x`` (G, k, C, S),
    ``batch_std`` (G, 1, C, 1)."""
    instance_std = torch.sqrt(x.var(dim=-1, unbiased=False, keepdim=True) + eps)
    per_channel_ = lambda p: p.view(1, 1, -1, 1)  # noqa: E731
    den = torch.maximum(batch_std, torch.addcmul(instance_std, x, per_channel_(v)))
    return torch.addcmul(per_channel_(bias), x / den, per_channel_(weight))


@cpu_fused(float32=True)
def _evonorm_b0_train(xs: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EvoNorm-B0's training forward on the grouped map ``xs`` (G, k, C, S) in float32 at least, with its batch
    statistics (``BatchStatNorm._batch_stats``'s, unsynchronized: biased var and mean per group and channel,
    (G, C)); statistics and normalization fused on a CPU, in float32 runs too (``cpu_fused(float32=True)``)."""
    x = float32_at_least(xs)
    var, mean = torch.var_mean(x, dim=(1, 3), unbiased=False, keepdim=True)
    # The statistics go to the running ones only: detached, autograd asks no gradient of them (no zero tangents).
    return (_evonorm_b0(x, torch.sqrt(var + eps), v, weight, bias, eps), mean.detach().flatten(1),
            var.detach().flatten(1))


@cpu_fused(float32=True)
def _evonorm_b0_apply(xs: torch.Tensor, batch_std: torch.Tensor, v: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor, eps: float) -> torch.Tensor:
    """EvoNorm-B0 with a given batch std (the running one in evaluation, the synchronized one)."""
    return _evonorm_b0(float32_at_least(xs), batch_std, v, weight, bias, eps)


class EvoNormB0(BatchStatNorm):
    """EvoNorm-B0 (Liu et al. 2020), the batch-dependent EvoNorm, a norm-*activation* layer.

    With ``apply_act`` (where BN+ReLU stood): y = x / max(sqrt(var_B + eps), v * x + sqrt(var_I + eps))
    * gamma + beta, var_B the biased variance per channel over (N, H, W) (over each virtual batch, or
    every rank's batch with sync), var_I the biased variance per sample and channel over (H, W); no
    mean is subtracted. In evaluation var_B is the running variance (unbiased, moved with ``momentum``
    as BN's). v, gamma init 1, beta init 0, all per channel; gradients flow through var_B and var_I
    (the paper's and timm's ``EvoNorm2dB0``). Without ``apply_act`` (before a residual add, in a
    shortcut): y = x * gamma + beta, as in the paper's code and timm.

    eps: the paper's code uses 1e-5; timm defaults to 1e-3. The modes act on its running variance:
    PreciseBN replaces it with the population variance, batch-statistics evaluation uses var_B of each
    group, the FrozenBN tail normalizes training with the running variance. The running mean that the
    base class keeps (and PreciseBN sets) is not used.
    """

    def __init__(self, num_features: int, *, apply_act: bool = True, momentum: float = 0.1, eps: float = 1e-5,
                 virtual_batch: int | None = None, sync: bool = False, norm_name: str = "evonorm_b0"):
        super().__init__(num_features, momentum=momentum, eps=eps, virtual_batch=virtual_batch, sync=sync,
                         norm_name=norm_name)
        init_affine(self, num_features, True)
        self.v = nn.Parameter(torch.ones(num_features)) if apply_act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.v is None:  # no statistics: the affine alone, in training and evaluation
            return affine_only(x, self.weight, self.bias)
        return super().forward(x)

    def _train_forward(self, x: torch.Tensor, groups: int, update: bool) -> torch.Tensor:
        xs = self._grouped(x, groups)  # (G, k, C, S)
        if self._syncs():
            xs = float32_at_least(xs)
            stats = self._batch_stats(xs)
            out = _evonorm_b0_apply(xs, torch.sqrt(stats.var + self.eps).view(groups, 1, -1, 1), self.v,
                                    self.weight, self.bias, self.eps)
        else:
            out, mean, var = _evonorm_b0_train(xs, self.v, self.weight, self.bias, self.eps)
            stats = BatchStats(mean, var, xs.shape[1] * xs.shape[3])
        if update:
            self._update_running_stats(stats)
        return out.reshape(x.shape).to(x.dtype)

    def _eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_std = torch.sqrt(self.running_var + self.eps).view(1, 1, -1, 1)
        out = _evonorm_b0_apply(self._grouped(x, 1), batch_std, self.v, self.weight, self.bias, self.eps)
        return out.reshape(x.shape).to(x.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", apply_act={self.v is not None}"
