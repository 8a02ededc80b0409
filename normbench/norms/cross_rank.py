"""Statistics over every rank of a data-parallel run: what synchronized batch norm (``sync=True``) needs.

Kept apart from the layers because it is the only part of the norms that talks to
``torch.distributed``: the size of the run's process group, a differentiable all-reduce, the
combination of every rank's (count, mean, sum of squared deviations) into the statistics of all
ranks' samples together, and torch's own fused SyncBatchNorm path for CUDA tensors. Outside a
data-parallel run ``data_parallel_world()`` is 1 and the batch-statistics layers
(``normbench.norms.batch_stat``) never call the rest.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def data_parallel_world() -> int:
    """Ranks of the initialized process group (1 outside a data-parallel run)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class AllReduceSum(torch.autograd.Function):
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


def combine_over_ranks(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor):
    """(count, mean, sum of squared deviations) of every rank's values together, from each rank's own,
    differentiable: each rank's sit in its slot of a zero tensor summed over the ranks, and combine
    as Chan et al.'s parallel variance (sum(x^2) - n mean^2 in float32 would cancel catastrophically
    wherever the mean is large against the spread)."""
    slots = mean.new_zeros(data_parallel_world(), 3, *mean.shape)
    slots[dist.get_rank()] = torch.stack([count, mean, m2])
    counts, means, m2s = AllReduceSum.apply(slots).unbind(1)  # each (ranks, *mean.shape)
    total_count = counts.sum(0)
    total_mean = (counts * means).sum(0) / total_count
    return total_count, total_mean, (m2s + counts * (means - total_mean).square()).sum(0)


def sync_batch_norm_cuda(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                         running_mean: torch.Tensor | None, running_var: torch.Tensor | None, eps: float,
                         momentum: float) -> torch.Tensor:
    """Synchronized BN with torch.nn.SyncBatchNorm's own function and CUDA kernels (per-rank mean,
    invstd and count all-gathered; fused backward): the semantics of the batch-statistics layers'
    synchronized path, faster. In float32, as the other paths compute statistics. The running
    statistics given (None: none) are updated in place."""
    from torch.nn.modules._functions import SyncBatchNorm as sync_batch_norm  # what nn.SyncBatchNorm calls

    out = sync_batch_norm.apply(x.float(), weight, bias, running_mean, running_var, eps, momentum,
                                dist.group.WORLD, data_parallel_world())
    return out.to(x.dtype)
