"""Interchangeable normalization layers: one registry (``NORMS``), one builder (``build_norm``).

Activation norms sit in the norm slots of a model (``norm_layer_factory(name, **opts)(C)``);
weight norms (wn, sn, gn_ws) also reparametrize the weights (``apply_weight_reparam``).
"""

from normbench.norms.activation import (
    NormConfigError,
    batch_stat_gaps,
    precise_bn_batches,
    precise_bn_update,
    recording_batch_stats,
)
from normbench.norms.registry import (
    NORMS,
    NormInfo,
    build_norm,
    is_batch_dependent,
    list_norms,
    norm_layer_factory,
    print_norms,
)
from normbench.norms.weight import apply_weight_reparam, data_dependent_init

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
    "precise_bn_update",
    "precise_bn_batches",
    "recording_batch_stats",
    "batch_stat_gaps",
]
