"""Model registry: `build_model(name, norm=...)` returns a model with its normalization in place."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

from torch import nn

from normbench.models.cnn import PlainCNN
from normbench.models.resnet_cifar import CifarResNet, PreActResNet18
from normbench.norms import NormConfigError, apply_weight_reparam, norm_layer_factory


@dataclass(frozen=True)
class ModelInfo:
    name: str
    description: str
    constructor: Callable[..., nn.Module]
    options: tuple[str, ...] = ()  # model options beyond norm_layer / num_classes / conv_bias


MODELS: dict[str, ModelInfo] = {
    info.name: info
    for info in (
        ModelInfo("resnet20", "CIFAR ResNet-20 (He et al. 2016), 0.27M parameters", partial(CifarResNet, 20)),
        ModelInfo("resnet32", "CIFAR ResNet-32 (He et al. 2016), 0.46M parameters", partial(CifarResNet, 32)),
        ModelInfo("resnet56", "CIFAR ResNet-56 (He et al. 2016), 0.85M parameters", partial(CifarResNet, 56)),
        ModelInfo("resnet110", "CIFAR ResNet-110 (He et al. 2016), 1.7M parameters", partial(CifarResNet, 110)),
        ModelInfo("preact_resnet18", "PreAct-ResNet-18 (He et al. 2016b), 11M parameters", PreActResNet18),
        ModelInfo("cnn", "plain 5-layer CNN, fast on a CPU; norm before or after the ReLU", PlainCNN, ("placement",)),
    )
}


def _needs_conv_bias(norm_layer: Callable[[int], nn.Module]) -> bool:
    """Convs feeding a norm with learnable parameters (a shift) need no bias of their own."""
    try:
        probe = norm_layer(64)
    except NormConfigError:
        return False  # the model's own layers raise it again, naming their channel count
    return not any(True for _ in probe.parameters())


def build_model(name: str, norm: str = "bn", num_classes: int = 10, model_options: dict | None = None,
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
    model = info.constructor(norm_layer=norm_layer, num_classes=num_classes,
                             conv_bias=_needs_conv_bias(norm_layer), **model_options)
    return apply_weight_reparam(model, norm, **norm_options)


def list_models() -> list[str]:
    return list(MODELS)
