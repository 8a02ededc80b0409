"""Interchangeable normalization layers: one registry (``NORMS``), one builder (``build_norm``).

Models ask for a norm slot with ``norm_layer_factory(name, **opts)(C, apply_act=...)``; weight
norms (wn, sn, gn_ws) also reparametrize the weights (``apply_weight_reparam``).
"""

from normbench.norms.activation import (
    NormConfigError,
    batch_stat_gaps,
    batch_stats_mode,
    freeze_batch_stats,
    has_batch_stats,
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
    is_batch_dependent,
    list_norms,
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
    "list_norms",
    "print_norms",
    "data_dependent_init",
    "set_training_length",
    "schedule_scalars",
    "precise_bn_update",
    "batch_stats_mode",
    "freeze_batch_stats",
    "has_batch_stats",
    "recording_batch_stats",
    "batch_stat_gaps",
]
