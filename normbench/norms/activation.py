"""Activation normalization layers, written by hand where torch has no exact equivalent.

Every layer takes feature maps of shape (N, C, *spatial) (the models use (N, C, H, W)) and
is vectorised: no Python loop over samples, channels or groups.

Batch-statistics layers (``BatchNorm``, ``BatchRenorm``, ``MeanOnlyBatchNorm``) share a base
class that computes their training statistics in one function (``_batch_stats``; unsynchronized
BN leaves them to torch's fused kernel, which computes the same) and adds four things on top of
the plain layer:

* ghost / virtual batches (``virtual_batch=k``): statistics over consecutive groups of k
  samples; the group index is folded into the channel dimension so one kernel call does it;
* synchronized statistics (``sync=True``, bn and brn): in a data-parallel run, statistics over
  every rank's batch together (SyncBN); the identity in a single process;
* stat recording (``recording_batch_stats`` / ``batch_stat_gaps``): the gap between the batch
  statistics a layer used in training and the running statistics it would use in eval;
* PreciseBN (``precise_bn_update``, the trainer's ``eval_stats=precise``): re-estimate the running
  statistics as the population statistics of N training batches before evaluation;
* mini-batch-statistics evaluation (``batch_stats_mode``) and the FrozenBN tail
  (``freeze_batch_stats``), the trainer's ``eval_stats=batch`` and ``freeze_stats_epochs``.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Iterable, Iterator, NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from normbench.errors import UserError

__all__ = [
    "NormConfigError",
    "BatchNorm",
    "BatchRenorm",
    "MeanOnlyBatchNorm",
    "FilterResponseNorm",
    "EvoNormS0",
    "LocalResponseNorm",
    "check_groups",
    "no_norm",
    "layer_norm",
    "instance_norm",
    "group_norm",
    "set_training_length",
    "schedule_scalars",
    "precise_bn_update",
    "batch_stats_mode",
    "freeze_batch_stats",
    "has_batch_stats",
    "recording_batch_stats",
    "batch_stat_gaps",
]


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


def _chan(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """(C,) -> (1, C, 1, ...) to broadcast against an (N, C, *spatial) tensor."""
    return v.view(1, -1, *([1] * (ndim - 2)))


def _init_affine(module: nn.Module, num_channels: int, affine: bool) -> None:
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
# Batch-statistics layers
# --------------------------------------------------------------------------------------------


def _data_parallel_world() -> int:
    """Ranks of the initialized process group (1 outside a data-parallel run)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks of a data-parallel run, differentiable (as detectron2's NaiveSyncBatchNorm):
    every rank's loss depends on the sum, so the gradient of each rank's input is the sum over
    ranks of the gradients of the output."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _bessel(count):
    """n / (n - 1): biased variance over n values -> unbiased (n an int, or a tensor of counts)."""
    if isinstance(count, torch.Tensor):
        return count / (count - 1).clamp_min(1)
    return count / max(count - 1, 1)


def _combine_over_ranks(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor):
    """(count, mean, sum of squared deviations) of every rank's values together, from each rank's own,
    differentiable: each rank's sit in its slot of a zero tensor summed over the ranks, and combine
    as Chan et al.'s parallel variance (sum(x^2) - n mean^2 in float32 would cancel catastrophically
    wherever the mean is large against the spread)."""
    slots = mean.new_zeros(_data_parallel_world(), 3, *mean.shape)
    slots[dist.get_rank()] = torch.stack([count, mean, m2])
    counts, means, m2s = _AllReduceSum.apply(slots).unbind(1)  # each (ranks, *mean.shape)
    total_count = counts.sum(0)
    total_mean = (counts * means).sum(0) / total_count
    return total_count, total_mean, (m2s + counts * (means - total_mean).square()).sum(0)


class BatchStats(NamedTuple):
    """Training statistics of a batch-statistics layer, per group and channel (G, C)."""

    mean: torch.Tensor
    var: torch.Tensor | None  # biased; None where the layer divides by no variance
    count: int | torch.Tensor  # values behind each statistic


class _BatchStatNorm(nn.Module):
    """Base of every layer that normalizes with batch statistics in training.

    Buffers: ``running_mean`` (C,) and, if the layer divides by a standard deviation,
    ``running_var`` (C,) (unbiased, like torch's BatchNorm).
    """

    norm_name = "bn"

    def __init__(
        self,
        num_features: int,
        *,
        momentum: float,
        eps: float,
        virtual_batch: int | None,
        sync: bool = False,
        track_var: bool = True,
    ):
        super().__init__()
        self.num_features = num_features
        self.momentum = float(momentum)
        self.eps = float(eps)
        self.virtual_batch = virtual_batch
        self.sync = bool(sync)
        self.register_buffer("running_mean", torch.zeros(num_features))
        if track_var:
            self.register_buffer("running_var", torch.ones(num_features))
        else:
            self.register_buffer("running_var", None)
        # Driven by recording_batch_stats / precise_bn_update (not state).
        self._recording = False
        self._frozen = False  # PreciseBN pass: normalize with batch stats, update nothing
        self._precise_acc: list | None = None  # [count, mean, m2] while accumulating population stats
        self.last_batch_mean: torch.Tensor | None = None
        self.last_batch_var: torch.Tensor | None = None
        self.last_gaps: tuple[torch.Tensor, torch.Tensor] | None = None

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"virtual_batch={self.virtual_batch}, sync={self.sync}"
        )

    # -- helpers -----------------------------------------------------------------------------
    def _num_groups(self, x: torch.Tensor) -> int:
        n, k = x.shape[0], self.virtual_batch
        if k is None or k == n:
            return 1
        if n % k:
            raise NormConfigError(
                f"norm '{self.norm_name}': virtual_batch={k} does not divide the training batch size {n}; "
                f"set norm.virtual_batch to a divisor of every training batch size (or null), "
                f"and drop incomplete last batches"
            )
        return n // k

    def _grouped(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        """(N, C, *S) -> (G, N/G, C, prod(S)): group g holds samples g*k .. g*k+k-1."""
        return x.reshape(groups, x.shape[0] // groups, x.shape[1], -1)

    def _syncs(self) -> bool:
        """Whether the training statistics span every rank's batch: ``sync`` in a data-parallel run,
        without a virtual batch (a virtual batch fixes the normalization batch: its statistics stay
        per group, the per-device statistics that synchronized BN is compared with)."""
        return self.sync and self.virtual_batch is None and _data_parallel_world() > 1

    def _batch_stats(self, xs: torch.Tensor, with_var: bool = True) -> BatchStats:
        """The statistics this layer normalizes with in training (the one place they are computed):
        mean and biased variance per group and channel of the grouped input ``xs`` (G, k, C, S), in
        float32 at least (also under autocast), with gradients. Synchronized: the statistics of every
        rank's batch together, from every rank's count, mean and sum of squared deviations."""
        xs = xs.to(torch.promote_types(xs.dtype, torch.float32))
        count = xs.shape[1] * xs.shape[3]
        if not self._syncs():
            if not with_var:
                return BatchStats(xs.mean(dim=(1, 3)), None, count)
            if not (torch.is_grad_enabled() and xs.requires_grad):
                # Without gradients, the fused batch-norm kernel's statistics (3x faster than var_mean on a
                # CPU): the groups folded into channels, (G, k, C, S) -> (k, G*C, S); var = 1/invstd^2 - eps.
                g, k, c = xs.shape[:3]
                _, mean, invstd = torch.native_batch_norm(xs.transpose(0, 1).reshape(k, g * c, -1), None, None, None,
                                                          None, True, 0.0, self.eps)
                return BatchStats(mean.view(g, c), (invstd.square().reciprocal() - self.eps).view(g, c), count)
            var, mean = torch.var_mean(xs, dim=(1, 3), unbiased=False)
            return BatchStats(mean, var, count)
        var, mean = torch.var_mean(xs, dim=(1, 3), unbiased=False)
        total_count, mean, m2 = _combine_over_ranks(torch.full_like(mean, count), mean, var * count)
        return BatchStats(mean, m2 / total_count, total_count)

    @torch.no_grad()
    def _update_running_stats(self, stats: BatchStats) -> None:
        """Move the running estimates towards this batch's statistics: the mean over groups of the
        group means and of the unbiased group variances."""
        self.running_mean.lerp_(stats.mean.mean(0), self.momentum)
        if self.running_var is not None:
            self.running_var.lerp_((stats.var * _bessel(stats.count)).mean(0), self.momentum)

    def _sync_batch_norm_cuda(self, x: torch.Tensor, update: bool) -> torch.Tensor:
        """Synchronized BN with torch.nn.SyncBatchNorm's own function and CUDA kernels (per-rank mean,
        invstd and count all-gathered; fused backward): the semantics of ``_batch_stats``'s
        synchronized path, faster. In float32, as the other paths compute statistics."""
        from torch.nn.modules._functions import SyncBatchNorm as sync_batch_norm  # what nn.SyncBatchNorm calls

        rm, rv = (self.running_mean, self.running_var) if update else (None, None)
        out = sync_batch_norm.apply(x.float(), self.weight, self.bias, rm, rv, self.eps, self.momentum,
                                    dist.group.WORLD, _data_parallel_world())
        return out.to(x.dtype)

    @torch.no_grad()
    def _observe(self, x: torch.Tensor, groups: int) -> None:
        """Record batch stats / accumulate population stats. Called in training before any update."""
        x = x.detach().float()
        if self._recording and not self._frozen:
            stats = self._batch_stats(self._grouped(x, groups), with_var=self.running_var is not None)
            mean, var = stats.mean, stats.var  # (G, C), the stats used
            self.last_batch_mean = mean.squeeze(0) if groups == 1 else mean
            mean_gap = (mean - self.running_mean).abs().mean()
            if self.running_var is None:
                self.last_batch_var = None
                var_gap = torch.zeros((), device=x.device, dtype=mean_gap.dtype)
            else:
                self.last_batch_var = var.squeeze(0) if groups == 1 else var
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
        ``_update_running_stats`` moves them (the mean over groups of each group's update)."""
        if groups == 1:
            rm, rv = (self.running_mean, self.running_var) if update else (None, None)
            flat = lambda p: None if p is None else p.reshape(-1)  # noqa: E731
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
                n, mean, m2 = _combine_over_ranks(torch.full_like(mean, n), mean, m2)
            self.running_mean.copy_(mean)
            if self.running_var is not None:
                self.running_var.copy_(m2 / ((n - 1).clamp_min(1) if torch.is_tensor(n) else max(n - 1, 1)))


class BatchNorm(_BatchStatNorm):
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

    norm_name = "bn"

    def __init__(
        self,
        num_features: int,
        *,
        momentum: float = 0.1,
        eps: float = 1e-5,
        affine: bool = True,
        virtual_batch: int | None = None,
        sync: bool = False,
    ):
        super().__init__(num_features, momentum=momentum, eps=eps, virtual_batch=virtual_batch, sync=sync)
        _init_affine(self, num_features, affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self._eval_forward(x)
        groups = self._num_groups(x)
        if self._recording or self._precise_acc is not None:
            self._observe(x, groups)
        update = not self._frozen
        if self._syncs():
            if x.is_cuda:
                return self._sync_batch_norm_cuda(x, update)
            return self._normalize_with_batch_stats(x, update)
        return self._fused_batch_norm(x, groups, self.weight, self.bias, update)

    def _normalize_with_batch_stats(self, x: torch.Tensor, update: bool) -> torch.Tensor:
        """BN with the statistics of ``_batch_stats`` (the synchronized ones: no virtual batch here)."""
        xs = self._grouped(x, 1)  # (1, N, C, S)
        stats = self._batch_stats(xs)
        scale = torch.rsqrt(stats.var + self.eps)  # (1, C)
        shift = -stats.mean * scale
        if self.weight is not None:
            scale = scale * self.weight
            shift = shift * self.weight + self.bias
        out = xs * scale.unsqueeze(1).unsqueeze(-1) + shift.unsqueeze(1).unsqueeze(-1)
        if update:
            self._update_running_stats(stats)
        return out.reshape(x.shape).to(x.dtype)


class BatchRenorm(_BatchStatNorm):
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

    norm_name = "brn"

    def __init__(
        self,
        num_features: int,
        *,
        momentum: float = 0.1,
        eps: float = 1e-5,
        affine: bool = True,
        r_max: float = 3.0,
        d_max: float = 5.0,
        relax_unit: str = "fraction",
        relax_start: float = 0.2,
        r_relax: float = 0.4,
        d_relax: float = 0.2,
        virtual_batch: int | None = None,
        sync: bool = False,
    ):
        super().__init__(num_features, momentum=momentum, eps=eps, virtual_batch=virtual_batch, sync=sync)
        lengths = {"relax_start": relax_start, "r_relax": r_relax, "d_relax": d_relax}
        for key, value in lengths.items():
            if relax_unit == "fraction" and not 0.0 <= value <= 1.0:
                raise NormConfigError(f"norm 'brn': {key}={value} must be a fraction of training in [0, 1] "
                                      f"(or set norm.relax_unit=steps)")
            if relax_unit == "steps" and value != int(value):
                raise NormConfigError(f"norm 'brn': {key}={value} must be a whole number of steps with relax_unit=steps")
        if relax_unit not in ("fraction", "steps"):
            raise NormConfigError(f"norm 'brn': relax_unit={relax_unit!r} must be fraction or steps")
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.relax_unit = relax_unit
        self.relax_start, self.r_relax, self.d_relax = float(relax_start), float(r_relax), float(d_relax)
        self.total_steps: int | None = None  # set by set_training_length (relax_unit='fraction')
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        self._steps = 0  # == num_steps, kept on the host (set again when a state_dict is loaded)
        _init_affine(self, num_features, affine)

    def set_training_length(self, total_steps: int) -> None:
        self.total_steps = int(total_steps)

    def _in_steps(self, length: float) -> float:
        if self.relax_unit == "steps":
            return length
        if self.total_steps is None:
            raise RuntimeError("BatchRenorm with relax_unit='fraction' needs the run's length: call "
                               "normbench.norms.set_training_length(model, total_steps) before training")
        return length * self.total_steps

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self._eval_forward(x)
        groups = self._num_groups(x)
        if self._recording or self._precise_acc is not None:
            self._observe(x, groups)
        update = not self._frozen
        if self._syncs():
            out = self._renormalize_with_batch_stats(x, groups, update)
        else:
            # ((x - mu_B) / sigma_B * r + d) * gamma + beta == x_hat * (r gamma) + (d gamma + beta): torch's
            # fused batch norm with that affine, r and d constants (the statistics for them computed once
            # more without gradients: per training step at batch 2 on a CPU, 1.4x faster than through
            # autograd of every elementwise op).
            r, d = self._corrections(self._batch_stats_no_grad(x, groups))
            weight, bias = (r, d) if self.weight is None else (r * self.weight, torch.addcmul(self.bias, d, self.weight))
            out = self._fused_batch_norm(x, groups, weight, bias, update)
        if update:
            self._count_step()
        return out

    @torch.no_grad()
    def _batch_stats_no_grad(self, x: torch.Tensor, groups: int) -> BatchStats:
        return self._batch_stats(self._grouped(x.detach(), groups))

    # The step count and the limits it sets live on the host (a Python int read every forward): kept out
    # of torch.compile's graphs, which would otherwise be specialized on it and recompiled every step.
    @torch.compiler.disable
    def _count_step(self) -> None:
        self.num_steps += 1
        self._steps += 1

    @torch.compiler.disable
    @torch.no_grad()
    def _corrections(self, stats: BatchStats) -> tuple[torch.Tensor, torch.Tensor]:
        """r = clip(sigma_B / sigma, 1/r_max, r_max), d = clip((mu_B - mu) / sigma, -d_max, d_max), (G, C),
        with the running statistics before this step's update."""
        std_b = (stats.var + self.eps).sqrt()
        std = (self.running_var + self.eps).sqrt()
        r_lim, d_lim = self.current_limits()
        r = torch.clamp(std_b / std, min=1.0 / r_lim, max=r_lim)
        d = torch.clamp((stats.mean - self.running_mean) / std, min=-d_lim, max=d_lim)
        return r, d

    def _renormalize_with_batch_stats(self, x: torch.Tensor, groups: int, update: bool) -> torch.Tensor:
        """The forward with the statistics of ``_batch_stats`` through autograd (the synchronized ones)."""
        xs = self._grouped(x, groups)  # (G, k, C, S)
        stats = self._batch_stats(xs)
        r, d = self._corrections(stats)
        # (x - mu_B) / sigma_B * r + d  ==  x * scale + shift, gradients through mu_B, sigma_B only.
        scale = r / (stats.var + self.eps).sqrt()
        shift = d - stats.mean * scale
        if self.weight is not None:
            scale = scale * self.weight
            shift = shift * self.weight + self.bias
        out = xs * scale.unsqueeze(1).unsqueeze(-1) + shift.unsqueeze(1).unsqueeze(-1)
        if update:
            self._update_running_stats(stats)
        return out.reshape(x.shape).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", r_max={self.r_max}, d_max={self.d_max}, relax_unit={self.relax_unit}, "
            f"relax_start={self.relax_start}, r_relax={self.r_relax}, d_relax={self.d_relax}"
        )


class MeanOnlyBatchNorm(_BatchStatNorm):
    """Mean-only batch norm (Salimans & Kingma 2016), used with weight normalization.

    Training: y = x - mu_B + beta (per-channel batch mean over (N, H, W), no division by a
    standard deviation); eval: y = x - running_mean + beta. Learned bias beta (C,), init 0.
    """

    norm_name = "wn"

    def __init__(self, num_features: int, *, momentum: float = 0.1, virtual_batch: int | None = None):
        super().__init__(num_features, momentum=momentum, eps=0.0, virtual_batch=virtual_batch, track_var=False)
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return (x - _chan(self.running_mean - self.bias, x.ndim)).to(x.dtype)
        groups = self._num_groups(x)
        if self._recording or self._precise_acc is not None:
            self._observe(x, groups)
        xs = self._grouped(x, groups)
        stats = self._batch_stats(xs, with_var=False)
        out = xs - stats.mean.unsqueeze(1).unsqueeze(-1) + self.bias.view(1, 1, -1, 1)
        if not self._frozen:
            self._update_running_stats(stats)
        return out.reshape(x.shape).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Batch-independent layers
# --------------------------------------------------------------------------------------------


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
        dims = _spatial_dims(x, "FilterResponseNorm")
        nu2 = torch.linalg.vector_norm(x, dim=dims, keepdim=True).square() / x[0, 0].numel()
        eps = abs(self.eps) if self.eps_learned is None else abs(self.eps) + self.eps_learned.abs()
        # gamma / sqrt(nu2 + eps) per sample and channel first: one multiply-add over the feature map.
        scale = torch.rsqrt(nu2 + eps) * _chan(self.weight, x.ndim)
        if self.tau is None:
            return torch.addcmul(_chan(self.bias, x.ndim), x, scale)
        # TLU max(y, tau) as relu(y - tau) + tau: the same values and gradients except at exact ties
        # (maximum splits the gradient there), and 3x faster in training on a CPU than torch.maximum,
        # whose backward masks and splits every element.
        tau = _chan(self.tau, x.ndim)
        return torch.relu_(torch.addcmul(_chan(self.bias, x.ndim) - tau, x, scale)) + tau

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
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in float32 at least (autocast)
        _, mean, rstd = torch.native_group_norm(x32, None, None, n, c, x[0, 0].numel(), groups, eps)
        ctx.save_for_backward(x, mean, rstd)
        ctx.groups = groups
        return rstd

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, mean, rstd = ctx.saved_tensors
        c = x.shape[1]
        coef = -grad * rstd.pow(3) / (c // ctx.groups * x[0, 0].numel())  # (N, G)
        coef, mean = _groups_to_channels(coef, c, x.ndim), _groups_to_channels(mean, c, x.ndim)
        return torch.addcmul(-mean * coef, x, coef).to(x.dtype), None, None


class EvoNormS0(nn.Module):
    """EvoNorm-S0 (Liu et al. 2020), a norm-*activation* layer.

    With ``apply_act`` (where BN+ReLU stood): y = x * sigmoid(v * x) / group_std(x) * gamma + beta,
    group_std over (C/G, H, W) per sample and group, sqrt(var + eps) (biased variance).
    Without (where BN has no activation after it): y = x * gamma + beta, no v, exactly as the
    paper's reference code and timm's ``EvoNorm2dS0(apply_act=False)`` define the variant.
    v, gamma init 1, beta init 0, all per channel.
    """

    def __init__(self, num_features: int, *, apply_act: bool = True, groups: int = 8, group_size: int | None = None,
                 eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.groups = check_groups("evonorm_s0", num_features, groups, group_size)
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.v = nn.Parameter(torch.ones(num_features)) if apply_act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _spatial_dims(x, "EvoNormS0")
        weight = _chan(self.weight, x.ndim)
        if self.v is not None:
            rstd = _GroupRstd.apply(x, self.groups, self.eps)  # (N, G)
            # gamma / group_std per sample and channel first: the feature map is touched by the
            # gate and one multiply-add only.
            weight = weight * _groups_to_channels(rstd, x.shape[1], x.ndim)
            x = x * torch.sigmoid(_chan(self.v, x.ndim) * x)
        return torch.addcmul(_chan(self.bias, x.ndim), x, weight)

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


class LocalResponseNorm(nn.Module):
    """Local response normalization across channels as in AlexNet (Krizhevsky et al. 2012).

    b_c = a_c / (k + alpha * sum_{c' in [c - size//2, c + size//2]} a_{c'}^2) ** beta,
    with AlexNet's *un-averaged* alpha (torch's ``LocalResponseNorm`` divides alpha by size, so we
    pass alpha * size). Optional per-channel affine after it.

    A historical baseline, not a normalization in the modern sense: at AlexNet's constants
    (alpha=1e-4, k=2) and activations of a few units, as in these networks, the sum term is tiny
    and LRN(x) is within about 5e-4 of the constant scale x * 2**-0.75.
    """

    def __init__(
        self, num_features: int, *, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0,
        affine: bool = True,
    ):
        super().__init__()
        self.num_features = num_features
        self.size, self.alpha, self.beta, self.k = int(size), float(alpha), float(beta), float(k)
        _init_affine(self, num_features, affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _LocalResponseNorm.apply(x, self.size, self.alpha, self.beta, self.k)
        if self.weight is not None:
            y = torch.addcmul(_chan(self.bias, x.ndim), y, _chan(self.weight, x.ndim))
        return y

    def extra_repr(self) -> str:
        return f"{self.num_features}, size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"


# --------------------------------------------------------------------------------------------
# Norms that torch has: thin builders whose signatures declare the options and their defaults
# --------------------------------------------------------------------------------------------


def no_norm(num_features: int) -> nn.Module:
    """No normalization: the slot is the identity."""
    return nn.Identity()


def layer_norm(num_features: int, *, eps: float = 1e-5, affine: bool = True) -> nn.Module:
    """Layer norm as the Group Norm paper defines it for conv nets: GroupNorm with one group."""
    return nn.GroupNorm(1, num_features, eps=eps, affine=affine)


def instance_norm(num_features: int, *, eps: float = 1e-5, affine: bool = True) -> nn.Module:
    """Instance norm: per sample and channel over (H, W), which is GroupNorm with one channel per group
    (nn.InstanceNorm2d computes the same through a batch norm over N*C channels, 30% slower per
    training step at batch 2 on a CPU)."""
    return nn.GroupNorm(num_features, num_features, eps=eps, affine=affine)


def group_norm(num_features: int, *, groups: int = 8, group_size: int | None = None, eps: float = 1e-5,
               affine: bool = True) -> nn.Module:
    return nn.GroupNorm(check_groups("gn", num_features, groups, group_size), num_features, eps=eps, affine=affine)


# --------------------------------------------------------------------------------------------
# PreciseBN and batch-stat recording
# --------------------------------------------------------------------------------------------


def _batch_stat_modules(model: nn.Module) -> list[_BatchStatNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchStatNorm)]


def has_batch_stats(model: nn.Module) -> bool:
    """Whether the model has layers that normalize with batch statistics in training."""
    return bool(_batch_stat_modules(model))


def set_training_length(model: nn.Module, total_steps: int) -> nn.Module:
    """Tell every layer with a schedule over training (Batch Renorm's r/d relaxation) the run's length."""
    for m in model.modules():
        if isinstance(m, BatchRenorm):
            m.set_training_length(total_steps)
    return model


def schedule_scalars(model: nn.Module) -> dict[str, float]:
    """The schedule values in force now, for logging: ``brn/r_max`` and ``brn/d_max``
    if the model has Batch Renorm layers (they all count the same steps), else nothing."""
    for m in model.modules():
        if isinstance(m, BatchRenorm):
            r_max, d_max = m.current_limits()
            return {"brn/r_max": r_max, "brn/d_max": d_max}
    return {}


def _model_device(model: nn.Module) -> torch.device | None:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return None


def precise_bn_update(model: nn.Module, batches: Iterable[torch.Tensor], num_batches: int) -> nn.Module:
    """PreciseBN: set the running stats of every batch-statistics layer to population statistics.

    Runs the model in training mode (so each layer sees the activations it sees in training,
    normalized with batch statistics, ghost batches included) on the first ``num_batches`` input
    batches of ``batches`` in one pass, as fvcore's ``update_bn_stats`` does, without gradients and
    without touching any running statistic or step counter; then each layer's running mean /
    running var become the exact mean / unbiased variance of its inputs over all samples and
    positions of those batches. Weights are untouched; every module's train/eval flag is restored.
    No-op (``batches`` not consumed) if the model has no such layer or ``num_batches`` is 0.
    Items of ``batches`` may be tensors or (x, ...) tuples.
    """
    wanted = _batch_stat_modules(model)
    if not wanted or num_batches <= 0:
        return model
    modes = [(m, m.training) for m in model.modules()]
    device = _model_device(model)
    accs = {m: [0, None, None] for m in wanted}
    try:
        model.train()
        for m in wanted:
            m._frozen = True
            m._precise_acc = accs[m]
        with torch.no_grad():
            for x in itertools.islice(iter(batches), num_batches):
                if isinstance(x, (tuple, list)):
                    x = x[0]
                if device is not None:
                    x = x.to(device, non_blocking=True)
                model(x)
        for m in wanted:
            m._set_population_stats(accs[m])
    finally:
        for m in wanted:
            m._frozen = False
            m._precise_acc = None
        for m, mode in modes:
            m.training = mode
    return model


@contextlib.contextmanager
def batch_stats_mode(model: nn.Module, group: int) -> Iterator[nn.Module]:
    """Evaluation with mini-batch statistics: while active, every module is in training mode and
    every batch-statistics layer normalizes each consecutive group of ``group`` samples of its input
    with that group's statistics (its training-mode forward, Batch Renorm's correction included),
    updating no running statistic or step counter and never synchronizing over ranks. The caller
    feeds batches whose size is a multiple of ``group`` (under ``torch.no_grad``). Every module's
    train/eval flag and every layer's virtual batch are restored on exit."""
    mods = _batch_stat_modules(model)
    modes = [(m, m.training) for m in model.modules()]
    saved = [(m, m.virtual_batch) for m in mods]
    try:
        model.train()
        for m in mods:
            m._frozen = True
            m.virtual_batch = int(group)
        yield model
    finally:
        for m, vb in saved:
            m._frozen = False
            m.virtual_batch = vb
        for m, mode in modes:
            m.training = mode


def freeze_batch_stats(model: nn.Module) -> nn.Module:
    """FrozenBN: put every batch-statistics layer in eval mode (normalize with the running
    statistics, update none of them), the rest of the model untouched. Call after ``model.train()``."""
    for m in _batch_stat_modules(model):
        m.eval()
    return model


@contextlib.contextmanager
def recording_batch_stats(model: nn.Module) -> Iterator[nn.Module]:
    """While active, batch-statistics layers keep the detached batch mean/var of each training
    forward (``last_batch_mean``, ``last_batch_var``; shape (C,), or (G, C) with ghost batches)
    and their gap to the running statistics (read with ``batch_stat_gaps``). Old records are
    cleared on entry; the last ones stay readable after exit. Eval-mode forwards record nothing.
    """
    mods = _batch_stat_modules(model)
    for m in mods:
        m.last_batch_mean = m.last_batch_var = m.last_gaps = None
        m._recording = True
    try:
        yield model
    finally:
        for m in mods:
            m._recording = False


def batch_stat_gaps(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per recorded layer (module name): (mean |mu_B - running_mean|, mean |log(var_B + eps) -
    log(running_var + eps)|), averaged over channels (and ghost groups), as 0-dim tensors, with
    the running stats as they were *before* that forward's update (what eval would have used).
    The variance gap is 0 for mean-only BN, which divides by no variance.
    """
    return {
        name: m.last_gaps
        for name, m in model.named_modules()
        if isinstance(m, _BatchStatNorm) and m.last_gaps is not None
    }
