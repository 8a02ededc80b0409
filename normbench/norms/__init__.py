"""Interchangeable normalization layers: one registry (``NORMS``), one builder (``build_norm``).

Models ask for a norm slot with ``norm_layer_factory(name, **opts)(C, apply_act=...)``; weight
norms (wn, sn, gn_ws) also reparametrize the weights (``apply_weight_reparam``). The trainer drives
the batch-statistics layers through the model-wide modes (PreciseBN, batch-statistics evaluation,
the FrozenBN tail, stat recording).

The package, module by module:

* ``registry``: ``NORMS`` (one ``NormInfo`` per norm: its layer, options, batch dependence) and the
  builders that validate options against it;
* ``layers``: the layers without batch statistics (FRN, EvoNorm-S0, LRN; GN / LN / IN / none
  builders) and what every layer shares (``NormConfigError``, the group-count rule);
* ``batch_stat``: the batch-statistics layers (BN, Batch Renorm, mean-only BN) on their common base
  ``BatchStatNorm``, and the virtual-batch rule;
* ``cross_rank``: statistics over the ranks of a data-parallel run (sync);
* ``modes``: the model-wide modes over the batch-statistics layers;
* ``weight``: the weight reparametrizations (wn, sn, gn_ws) and data-dependent init;
* ``fused``: what torch.compile does with the layers (``cpu_fused`` kernels, ``before_compile``).
* ``native``: C++ ports of layers' training steps (the same calls as their Python, without its overhead),
  built on first use.

This module's ``__all__`` is the package's public interface (the submodules declare none).
"""

from normbench.norms.fused import before_compile
from normbench.norms.layers import NormConfigError
from normbench.norms.modes import (
    batch_stat_gaps,
    batch_stats_mode,
    freeze_batch_stats,
    precise_bn_update,
    recording_batch_stats,
    schedule_scalars,
    set_training_length,
)
from normbench.norms.registry import (
    NORMS,
    NormInfo,
    apply_weight_reparam,
    build_norm,
    check_virtual_batch,
    is_batch_dependent,
    norm_layer_factory,
    print_norms,
)
from normbench.norms.weight import data_dependent_init

__all__ = [
    "NORMS",
    "NormInfo",
    "NormConfigError",
    "build_norm",
    "norm_layer_factory",
    "apply_weight_reparam",
    "is_batch_dependent",
    "check_virtual_batch",
    "print_norms",
    "data_dependent_init",
    "set_training_length",
    "schedule_scalars",
    "precise_bn_update",
    "batch_stats_mode",
    "freeze_batch_stats",
    "recording_batch_stats",
    "batch_stat_gaps",
    "before_compile",
]
