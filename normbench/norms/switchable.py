"""Switchable Normalization (Luo et al., ICLR 2019, "Differentiable Learning-to-Normalize via Switchable
Normalization"): every layer learns how much of IN's, LN's and BN's statistics to normalize with.

For an (N, C, H, W) map, with S = H * W values per sample and channel (the reference ``SwitchNorm2d`` of
github.com/switchablenorms/Switchable-Normalization, devkit/ops/switchable_norm.py, computes the three sets of
statistics from the IN ones, and this module computes exactly what it computes):

    mu_in[n,c]  = mean over (H, W),   var_in[n,c] = sum over (H, W) of (x - mu_in)^2 / (S - 1)   (torch's
                  default unbiased var, as the reference; S - 1 taken as 1 at S = 1, where it is NaN)
    mu_ln[n]    = mean_c mu_in,       var_ln[n]   = mean_c (var_in + mu_in^2) - mu_ln^2
    mu_bn[c]    = mean_n mu_in,       var_bn[c]   = mean_n (var_in + mu_in^2) - mu_bn^2
    y = gamma * (x - sum_k w_k mu_k) / sqrt(sum_k w'_k var_k + eps) + beta,
    w = softmax(mean_weight), w' = softmax(var_weight), k over the chosen statistics (in, ln[, bn]).

So var_ln and var_bn are neither the biased nor the unbiased variance over their axes: each is the mean of
the unbiased IN variances plus the biased variance of the IN means (computed here in that second form,
mean(var_in) + mean((mu_in - mu)^2), the same quantity without the float32 cancellation of
E[.] - mu^2 at a large mean). mean_weight and var_weight (one weight per statistic and layer, init 1, so 1/3
each) are learned with gamma and beta; gradients flow through every statistic of the training forward.

It replaces the norm slot's BN (or IN / LN). ``statistics``: ``in_ln_bn`` (the paper's SN, default) or
``in_ln`` (the reference's ``using_bn=False``, the paper's choice at one image per GPU, where BN's statistics
equal IN's in training): then nothing depends on the batch and the layer is a plain module
(``SwitchNormPerSample``) with no running statistics; with BN it is a ``BatchStatNorm`` (``SwitchNorm``).

BN's branch in evaluation, as the reference: running_mean and running_var, initialised to 0 as there, moved
every training step by running <- running + momentum * (batch value - running) (torch's convention, the
weight of the new value) towards mu_bn and var_bn in the form above; IN's and LN's statistics are always
the evaluated sample's own. momentum: SN's published value is the keep factor 0.997 (the reference's
SwitchNorm1d / 3d default; its SwitchNorm2d defaults to 0.9), i.e. momentum 0.003, a time constant of
1/0.003 = 333 steps, longer than this project's runs of a few hundred steps: the running statistics would
still hold 0.997^300 = 40% of their zero init at the end of a 300-step run. The default here is 0.1
(SwitchNorm2d's code default, torch's BN default, Batch Renorm's here), a time constant of 10 steps. The
paper's alternative to the moving average, a batch average of the BN branch's statistics after training
(the reference's using_moving_average=False, whose accumulation its code leaves unfinished), is this
project's PreciseBN (``eval_stats=precise``).

The model-wide features, on the BN branch (``SwitchNorm``; ``SwitchNormPerSample`` has no batch statistics,
so none applies and virtual_batch is unused):
* ghost batches (``virtual_batch=k``): mu_bn, var_bn over each group of k consecutive samples (IN and LN are
  per sample anyway); the running statistics move towards the mean over groups of the group values;
* PreciseBN: running_mean, running_var become the population values in the running statistics' form, over
  every sample n of the pass: mean_n mu_in and mean_n var_in + mean_n (mu_in - mean_n mu_in)^2 (unbiased IN
  variances, biased variance of the IN means);
* batch-statistics evaluation: mu_bn, var_bn of each evaluated group;
* the FrozenBN tail: the BN branch from the running statistics (which stay as they are), IN and LN from the
  sample, gradients to the switch weights, gamma and beta as in evaluation;
* the recorded stat gaps: mu_bn and var_bn (in the form above) against the running statistics;
* ``sync``: not offered (the reference's SyncSN is CUDA-only; option refused as unknown).

``importance_weights()`` returns the softmax weights (what to log per layer: mean_in, mean_ln, mean_bn,
var_in, var_ln, var_bn).

Under bf16 autocast the statistics and the normalization are computed in float32 (on a CPU fused by
``cpu_fused(float32=True)``, as in float32 runs) and the output is rounded once to the input's dtype; the
running statistics stay float32.
The map is normalized in its own memory layout (a channels-last map stays one, without copies; the registry
trains it channels-last, measured faster under bf16).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from normbench.norms.batch_stat import BatchStats, BatchStatNorm, group_mean
from normbench.norms.fused import cpu_fused
from normbench.norms.layers import NormConfigError, float32_at_least, init_affine

# The statistics each choice of ``statistics`` switches between, in the reference's order of the weights.
STATISTICS = {"in_ln_bn": ("in", "ln", "bn"), "in_ln": ("in", "ln")}


def _instance_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mu_in and the unbiased var_in over the spatial axes of a float32 grouped map ``x`` (G, k, C, *S), keepdim
    (the reference's ``x.var``; at one value per sample and channel, where that is NaN, 0)."""
    spatial = tuple(range(3, x.ndim))
    values = x[0, 0, 0].numel()
    var_in, mean_in = torch.var_mean(x, dim=spatial, correction=1 if values > 1 else 0, keepdim=True)
    return mean_in, var_in


def _per_channel(p: torch.Tensor, ndim: int) -> torch.Tensor:
    """(C,) -> (1, 1, C, 1, ...) against a grouped map (G, k, C, *S) of ``ndim`` dimensions."""
    return p.view(1, 1, -1, *([1] * (ndim - 3)))


def _pooled_stats(mean_in: torch.Tensor, var_in: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's statistics over ``dim`` from the IN ones: mu = mean mu_in, var = mean (var_in + mu_in^2)
    - mu^2, computed as mean var_in + mean (mu_in - mu)^2 (the same value, without cancellation)."""
    mean = mean_in.mean(dim, keepdim=True)
    return mean, var_in.mean(dim, keepdim=True) + (mean_in - mean).square().mean(dim, keepdim=True)


def _switch_normalize(x: torch.Tensor, mean_in: torch.Tensor, var_in: torch.Tensor,
                      bn: tuple[torch.Tensor, torch.Tensor] | None, mean_weight: torch.Tensor,
                      var_weight: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """gamma * (x - sum_k w_k mu_k) / sqrt(sum_k w'_k var_k + eps) + beta on a float32 grouped map ``x``
    (G, k, C, *S), its IN statistics (G, k, C, 1, ...), BN's (mean, var) broadcastable to them or None."""
    mean_ln, var_ln = _pooled_stats(mean_in, var_in, 2)
    w_mean, w_var = torch.softmax(mean_weight, 0), torch.softmax(var_weight, 0)
    # sum_k w_k mu_k as mu_in + sum_k w_k (mu_k - mu_in) (the weights sum to 1): the same value and gradients,
    # but the weights' gradients are sums of products with the small differences mu_k - mu_in, not with the
    # means themselves (on a map of mean 64 and std 0.5, float32 mean_weight gradients were 4e-4 off the
    # float64 ones in the first form, 3e-7 in this one: the switch weights' gradients are differences of such
    # sums, which cancel).
    shift = w_mean[1] * (mean_ln - mean_in)
    var = var_in + w_var[1] * (var_ln - var_in)
    if bn is not None:
        shift = shift + w_mean[2] * (bn[0] - mean_in)
        var = var + w_var[2] * (bn[1] - var_in)
    # gamma / sigma per sample and channel first: the map itself sees one subtraction and one multiply-add.
    scale = torch.rsqrt(var + eps) * _per_channel(weight, x.ndim)
    return torch.addcmul(_per_channel(bias, x.ndim), x - (mean_in + shift), scale)


@cpu_fused(float32=True)
def _switch_norm_train(xs: torch.Tensor, mean_weight: torch.Tensor, var_weight: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SN's training forward on the grouped map ``xs`` (G, k, C, *S), BN's statistics over each group: the
    output in ``xs``'s dtype and layout, and mu_bn, var_bn per group and channel (G, C)."""
    x = float32_at_least(xs)
    mean_in, var_in = _instance_stats(x)
    mean_bn, var_bn = _pooled_stats(mean_in, var_in, 1)  # (G, 1, C, 1, ...)
    out = _switch_normalize(x, mean_in, var_in, (mean_bn, var_bn), mean_weight, var_weight, weight, bias, eps)
    # mu_bn, var_bn go to the running statistics only: detached, autograd asks no gradient of them (no zero
    # tangents in the compiled backward).
    return out.to(xs.dtype), mean_bn.detach().flatten(1), var_bn.detach().flatten(1)


@cpu_fused(float32=True)
def _switch_norm_apply(xs: torch.Tensor, bn_mean: torch.Tensor | None, bn_var: torch.Tensor | None,
                       mean_weight: torch.Tensor, var_weight: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       eps: float) -> torch.Tensor:
    """SN of the grouped map ``xs`` (G, k, C, *S) with BN's statistics given ((C,): the running ones), or without
    a BN branch (None), in ``xs``'s dtype and layout."""
    x = float32_at_least(xs)
    mean_in, var_in = _instance_stats(x)
    bn = None if bn_mean is None else (_per_channel(bn_mean, x.ndim), _per_channel(bn_var, x.ndim))
    return _switch_normalize(x, mean_in, var_in, bn, mean_weight, var_weight, weight, bias, eps).to(xs.dtype)


def _grouped_view(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, C, *S) -> (G, N/G, C, *S), group g holding samples g*k .. g*k+k-1: a view in either memory layout
    (``BatchStatNorm._grouped`` flattens S, which copies a channels-last map)."""
    if x.ndim < 3:  # without spatial axes IN's statistics would be over nothing
        raise ValueError(f"SwitchNorm expects (N, C, *spatial) feature maps, got shape {tuple(x.shape)}")
    return x.unflatten(0, (groups, x.shape[0] // groups))


class _SwitchWeights:
    """What both SN layers hold: gamma, beta (C,), the switch weights (one per statistic), eps."""

    def _init_switch(self, num_features: int, statistics: str, eps: float) -> None:
        self.statistics = statistics
        self.eps = float(eps)
        n = len(STATISTICS[statistics])
        self.mean_weight = nn.Parameter(torch.ones(n))  # the reference's init: equal importance
        self.var_weight = nn.Parameter(torch.ones(n))
        init_affine(self, num_features, True)

    @torch.no_grad()
    def importance_weights(self) -> dict[str, torch.Tensor]:
        """The softmax importance weights now, e.g. {"mean_in": ., "mean_ln": ., "mean_bn": ., "var_in": ., ...}
        (0-dim tensors on the layer's device: reading them is the caller's host sync)."""
        names = STATISTICS[self.statistics]
        out = {f"mean_{k}": w for k, w in zip(names, torch.softmax(self.mean_weight, 0))}
        out.update({f"var_{k}": w for k, w in zip(names, torch.softmax(self.var_weight, 0))})
        return out


class SwitchNorm(_SwitchWeights, BatchStatNorm):
    """Switchable Normalization over IN, LN and BN statistics (the module docstring has the definition and
    what each model-wide feature does with it). Buffers: running_mean, running_var (C,) of the BN branch,
    init 0 as the reference's, running_var in the form of var_bn (not the unbiased variance BN keeps)."""

    def __init__(self, num_features: int, *, momentum: float = 0.1, eps: float = 1e-5,
                 virtual_batch: int | None = None, norm_name: str = "switchnorm"):
        super().__init__(num_features, momentum=momentum, eps=eps, virtual_batch=virtual_batch, norm_name=norm_name)
        self.running_var.zero_()
        self._init_switch(num_features, "in_ln_bn", eps)

    def _train_forward(self, x: torch.Tensor, groups: int, update: bool) -> torch.Tensor:
        xs = _grouped_view(x, groups)
        out, mean_bn, var_bn = _switch_norm_train(xs, self.mean_weight, self.var_weight, self.weight, self.bias,
                                                  self.eps)
        if update:
            self._update_running_stats(BatchStats(mean_bn, var_bn, xs.shape[1]))
        return out.flatten(0, 1)

    def _eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _switch_norm_apply(_grouped_view(x, 1), self.running_mean, self.running_var, self.mean_weight,
                                 self.var_weight, self.weight, self.bias, self.eps)
        return out[0]

    def _batch_stats(self, xs: torch.Tensor, with_var: bool = True) -> BatchStats:
        """mu_bn and var_bn (the reference's form) per group and channel of the grouped map ``xs`` (G, k, C, *S):
        what the training forward normalizes with (the stat gaps read them; count = samples per group)."""
        mean_bn, var_bn = _pooled_stats(*_instance_stats(float32_at_least(xs)), 1)
        return BatchStats(mean_bn.flatten(1), var_bn.flatten(1), xs.shape[1])

    @torch.no_grad()
    def _update_running_stats(self, stats: BatchStats) -> None:
        """Towards the mean over groups of mu_bn and of var_bn, as they are (no Bessel factor: var_bn is the
        reference's form, which its running_var holds)."""
        self.running_mean.lerp_(group_mean(stats.mean), self.momentum)
        self.running_var.lerp_(group_mean(stats.var), self.momentum)

    @torch.no_grad()
    def _observe(self, x: torch.Tensor, groups: int) -> None:
        """The stat gaps as the base class records them (through ``_batch_stats``); PreciseBN's accumulation in
        this layer's form instead of BN's: samples seen, and the float64 sums over them of mu_in, mu_in^2 and
        var_in per channel."""
        acc, self._precise_acc = self._precise_acc, None  # the base class would accumulate BN's statistics
        try:
            super()._observe(x, groups)
        finally:
            self._precise_acc = acc
        if acc is not None:
            stats = _instance_stats(float32_at_least(_grouped_view(x, 1)))
            mean_in, var_in = (s.reshape(x.shape[:2]).double() for s in stats)
            sums = torch.stack([mean_in.sum(0), mean_in.square().sum(0), var_in.sum(0)])
            acc[:] = [x.shape[0], sums, None] if acc[0] == 0 else [acc[0] + x.shape[0], acc[1] + sums, None]

    def _set_population_stats(self, acc: list) -> None:
        """running_mean = mean_n mu_in, running_var = mean_n var_in + mean_n mu_in^2 - (mean_n mu_in)^2 over
        the samples of the pass (``_observe``'s sums)."""
        n, sums, _ = acc
        if n == 0:
            return
        mean, second, var_in = sums / n
        with torch.no_grad():
            self.running_mean.copy_(mean)
            self.running_var.copy_(var_in + (second - mean.square()).clamp_min(0))

    def extra_repr(self) -> str:
        return (f"{self.num_features}, statistics={self.statistics}, eps={self.eps}, momentum={self.momentum}, "
                f"virtual_batch={self.virtual_batch}")


class SwitchNormPerSample(_SwitchWeights, nn.Module):
    """Switchable Normalization over IN and LN statistics only (the reference's using_bn=False): per sample,
    the same computation in training and evaluation, no running statistics."""

    def __init__(self, num_features: int, *, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self._init_switch(num_features, "in_ln", eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _switch_norm_apply(_grouped_view(x, 1), None, None, self.mean_weight, self.var_weight, self.weight,
                                 self.bias, self.eps)
        return out[0]

    def extra_repr(self) -> str:
        return f"{self.num_features}, statistics={self.statistics}, eps={self.eps}"


def switch_norm(num_features: int, *, statistics: str = "in_ln_bn", momentum: float = 0.1, eps: float = 1e-5,
                virtual_batch: int | None = None, norm_name: str = "switchnorm") -> nn.Module:
    """The switchnorm slot: ``SwitchNorm`` (a BatchStatNorm) with BN among the statistics, else
    ``SwitchNormPerSample`` (momentum and virtual_batch unused: nothing depends on the batch)."""
    if statistics not in STATISTICS:  # the registry checks it; a direct call too
        raise NormConfigError(f"norm '{norm_name}': option statistics must be one of {', '.join(STATISTICS)}, "
                              f"got {statistics!r}")
    if "bn" in STATISTICS[statistics]:
        return SwitchNorm(num_features, momentum=momentum, eps=eps, virtual_batch=virtual_batch, norm_name=norm_name)
    return SwitchNormPerSample(num_features, eps=eps)
