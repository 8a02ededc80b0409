"""Model registry: `build_model(name, norm=...)` returns a model with its normalization in place;
`build_from_config(cfg)` builds a run's model from its config (the trainer and validation alike).

Each module of this package lists its models in a module-level `MODELS = {name: (description,
constructor)}`; this registry collects them all (so adding a model is its module, or an entry in
one, plus `conf/model/<name>.yaml`). A model's options are the keyword-only parameters of its
constructor (with their defaults); the yaml mirrors them.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn
from torch.nn.utils import parametrize

from normbench.data import NUM_CLASSES
from normbench.errors import UserError
from normbench.norms import NormConfigError, apply_weight_reparam, norm_layer_factory


@dataclass(frozen=True)
class ModelInfo:
    name: str
    description: str
    constructor: Callable[..., nn.Module]  # constructor(norm_layer=, num_classes=, conv_bias=, **options)
    options: dict[str, Any] = field(init=False)  # option name -> default, from the constructor's signature

    def __post_init__(self):
        params = inspect.signature(self.constructor).parameters.values()
        object.__setattr__(self, "options", {p.name: p.default for p in params if p.kind == p.KEYWORD_ONLY})


def _collect_models() -> dict[str, ModelInfo]:
    models = {}
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        for name, (description, constructor) in getattr(module, "MODELS", {}).items():
            assert name not in models, f"model {name} is registered twice"
            models[name] = ModelInfo(name, description, constructor)
    return models


MODELS: dict[str, ModelInfo] = _collect_models()


def _norm_has_shift(norm_layer: Callable[..., nn.Module]) -> bool:
    """Whether the norm (without activation) has learnable parameters, i.e. a shift of its own."""
    try:
        probe = norm_layer(64, apply_act=False)
    except NormConfigError:
        return True  # the model's own layers raise it again, naming their channel count
    return any(True for _ in probe.parameters())


def zero_init_residual(model: nn.Module, norm: str) -> nn.Module:
    """Make every residual branch start at zero (Goyal et al. 2017; torchvision's zero_init_residual).

    The gamma of the branch's last norm is set to 0; where that slot has no gamma (no norm, wn,
    sn, affine=False, or a pre-activation block) the branch's last conv is zeroed instead, as
    SkipInit / Fixup do (weight and bias; for wn its gain g, so the direction v stays and g gets a
    gradient).
    """
    from normbench.norms.weight import ExpGainWeightNorm, mark_initialized

    for block in model.modules():
        conv = getattr(block, "residual_conv", None)
        if conv is None:
            continue
        gamma = getattr(block.residual_norm, "weight", None)
        if isinstance(gamma, nn.Parameter) and gamma.ndim == 1:
            nn.init.zeros_(gamma)
            continue
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
        if not parametrize.is_parametrized(conv, "weight"):
            nn.init.zeros_(conv.weight)
        elif hasattr(conv.parametrizations.weight, "original1") and not isinstance(
                conv.parametrizations.weight[0], ExpGainWeightNorm):  # weight norm w = g v/||v||: g can be 0
            nn.init.zeros_(conv.parametrizations.weight.original0)
            mark_initialized(conv)  # data-dependent init would divide by this g
        else:
            raise NormConfigError(
                f"model.zero_init_residual=true with norm={norm}: the residual branch has no gamma and its last "
                f"conv's weight cannot start at zero under this reparametrization; set model.zero_init_residual=false")
    return model


def build_model(name: str, norm: str = "bn", num_classes: int = NUM_CLASSES, model_options: dict | None = None,
                **norm_options) -> nn.Module:
    """Build model `name` with normalization `norm` (any name of normbench.norms.NORMS) in place."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    info = MODELS[name]
    model_options = dict(model_options or {})
    unknown = set(model_options) - set(info.options)
    if unknown:
        raise ValueError(f"model {name} has no option(s) {sorted(unknown)}; it takes {list(info.options) or 'none'}")
    norm_layer = norm_layer_factory(norm, **norm_options)
    # A conv that feeds a norm with a shift of its own needs no bias.
    model = info.constructor(norm_layer=norm_layer, num_classes=num_classes,
                             conv_bias=not _norm_has_shift(norm_layer), **model_options)
    apply_weight_reparam(model, norm, **norm_options)
    if getattr(model, "zero_init_residual", False):  # after the reparametrization: wn would divide 0 by 0
        zero_init_residual(model, norm)
    return model


def build_from_config(cfg) -> nn.Module:
    """The model of a run's config (cfg.model, cfg.norm). A bad model or norm option (a placement, a
    group count that does not divide a layer's channels, ...) is a one-line UserError."""
    from normbench import identity

    try:
        return build_model(cfg.model.name, cfg.norm.name, model_options=identity.model_options(cfg.model),
                           **identity.norm_options(cfg.norm))
    except (NormConfigError, KeyError, ValueError) as e:
        raise UserError(f"cannot build {cfg.model.name} with norm={cfg.norm.name}: {e.args[0] if e.args else e}") from None
