"""The one registry of normalization layers: names, descriptions, options and their defaults.

``conf/norm/<name>.yaml`` mirrors this registry one to one (``name`` plus every option with its
default); ``tests/test_norms.py`` checks that. Every option is passed to ``build_norm`` as a
keyword; an option set to None means "use the default".
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch.nn as nn

from normbench.norms.activation import (
    BatchNorm,
    BatchRenorm,
    EvoNormS0,
    FilterResponseNorm,
    LocalResponseNorm,
    MeanOnlyBatchNorm,
    NormConfigError,
    check_groups,
)

__all__ = [
    "NormConfigError",
    "NormInfo",
    "NORMS",
    "resolve_options",
    "build_norm",
    "norm_layer_factory",
    "is_batch_dependent",
    "list_norms",
    "print_norms",
]


@dataclass(frozen=True)
class NormInfo:
    name: str
    description: str  # one line
    kind: str  # 'activation' | 'weight'
    batch_dependent: bool  # for 'wn' this is the default (mean_only_bn=False); see is_batch_dependent
    options: dict[str, Any]  # option name -> default (do not mutate)


def _info(name, description, kind, batch_dependent, **options) -> NormInfo:
    return NormInfo(name, description, kind, batch_dependent, dict(options))


# Every norm accepts virtual_batch (each yaml has it); only batch-statistics layers use it.
_VB = {"virtual_batch": None}

NORMS: dict[str, NormInfo] = {
    i.name: i
    for i in [
        _info("none", "no normalization (identity)", "activation", False, **_VB),
        _info(
            "bn", "batch norm (Ioffe & Szegedy 2015): per-channel stats over (N,H,W); ghost batches, PreciseBN",
            "activation", True,
            momentum=0.1, eps=1e-5, affine=True, virtual_batch=None, precise_stats=0,
        ),
        _info(
            "ln", "layer norm as in the Group Norm paper: per-sample stats over (C,H,W), per-channel affine",
            "activation", False, eps=1e-5, affine=True, **_VB,
        ),
        _info(
            "in", "instance norm (Ulyanov et al. 2016): stats over (H,W) per sample and channel, no running stats",
            "activation", False, eps=1e-5, affine=True, **_VB,
        ),
        _info(
            "gn", "group norm (Wu & He 2018): per-sample stats over (C/G,H,W) per group",
            "activation", False, groups=8, group_size=None, eps=1e-5, affine=True, **_VB,
        ),
        _info(
            "brn", "batch renormalization (Ioffe 2017): BN corrected towards moving stats by clipped r, d",
            "activation", True,
            momentum=0.01, eps=1e-5, affine=True, r_max=3.0, d_max=5.0, relax_start=5000,
            r_relax_steps=35000, d_relax_steps=20000, virtual_batch=None, precise_stats=0,
        ),
        _info(
            "lrn", "local response norm across channels (AlexNet, Krizhevsky et al. 2012)",
            "activation", False, size=5, alpha=1e-4, beta=0.75, k=2.0, affine=True, **_VB,
        ),
        _info(
            "frn", "filter response norm + TLU (Singh & Krishnan 2019): x/sqrt(mean_HW(x^2)+eps), max(.,tau)",
            "activation", False, eps=1e-6, learnable_eps=False, **_VB,
        ),
        _info(
            "evonorm_s0", "EvoNorm-S0 (Liu et al. 2020): x*sigmoid(v*x)/group_std(x), batch independent",
            "activation", False, groups=8, group_size=None, eps=1e-5, **_VB,
        ),
        _info(
            "wn", "weight norm (Salimans & Kingma 2016): w = g*v/||v||; optional data init, mean-only BN",
            "weight", False,
            exp_g=False, init="none", mean_only_bn=False, momentum=0.1, **_VB,
        ),
        _info(
            "sn", "spectral norm (Miyato et al. 2018): w/sigma_max(w) by power iteration",
            "weight", False, n_power_iterations=1, **_VB,
        ),
        _info(
            "gn_ws", "group norm + weight standardization of every conv (Qiao et al. 2019)",
            "weight", False, groups=8, group_size=None, eps=1e-5, affine=True, ws_eps=1e-5, **_VB,
        ),
    ]
}


# ---- option validation (one rule per option name; names mean the same thing in every norm) ----


def _bad(norm: str, opt: str, want: str, value: Any) -> NormConfigError:
    return NormConfigError(f"norm '{norm}': option {opt} must be {want}, got {value!r}")


def _as_bool(norm, opt, v):
    if isinstance(v, bool):
        return v
    raise _bad(norm, opt, "true or false", v)


def _as_int(lo: int):
    def check(norm, opt, v):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise _bad(norm, opt, f"an integer >= {lo}", v)
        return int(v)

    return check


def _as_float(lo: float, hi: float = math.inf, lo_open: bool = False):
    def check(norm, opt, v):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (v > lo if lo_open else v >= lo) and v <= hi
        if not ok:
            lo_s = f"> {lo}" if lo_open else f">= {lo}"
            raise _bad(norm, opt, f"a number {lo_s}" + (f" and <= {hi}" if hi != math.inf else ""), v)
        return float(v)

    return check


def _as_choice(*choices: str):
    def check(norm, opt, v):
        if v not in choices:
            raise _bad(norm, opt, "one of " + ", ".join(choices), v)
        return v

    return check


_CHECKS: dict[str, Callable[[str, str, Any], Any]] = {
    "momentum": _as_float(0.0, 1.0),
    "eps": _as_float(0.0, lo_open=True),
    "ws_eps": _as_float(0.0, lo_open=True),
    "affine": _as_bool,
    "learnable_eps": _as_bool,
    "exp_g": _as_bool,
    "mean_only_bn": _as_bool,
    "virtual_batch": _as_int(1),
    "precise_stats": _as_int(0),
    "groups": _as_int(1),
    "group_size": _as_int(1),
    "r_max": _as_float(1.0),
    "d_max": _as_float(0.0),
    "relax_start": _as_int(0),
    "r_relax_steps": _as_int(0),
    "d_relax_steps": _as_int(0),
    "size": _as_int(1),
    "alpha": _as_float(0.0),
    "beta": _as_float(0.0),
    "k": _as_float(0.0, lo_open=True),
    "init": _as_choice("none", "data"),
    "n_power_iterations": _as_int(1),
}


def _get_info(name: str) -> NormInfo:
    info = NORMS.get(name) if isinstance(name, str) else None
    if info is None:
        raise NormConfigError(f"unknown norm {name!r}; valid names: {', '.join(NORMS)}")
    return info


def resolve_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``options`` for norm ``name`` and return every option (defaults filled in, None = default)."""
    info = _get_info(name)
    unknown = [k for k in options if k not in info.options]
    if unknown:
        raise NormConfigError(
            f"norm '{name}': unknown option(s) {', '.join(map(str, unknown))}; "
            f"valid options: {', '.join(info.options) or '(none)'}"
        )
    out = dict(info.options)
    for key, value in options.items():
        if value is not None:
            out[key] = _CHECKS[key](name, key, value)
    return out


# ---- builders: (num_channels, resolved options) -> module for the norm slot ----


def _gn(name: str, c: int, o: dict) -> nn.Module:
    return nn.GroupNorm(check_groups(name, c, o["groups"], o["group_size"]), c, eps=o["eps"], affine=o["affine"])


_BUILDERS: dict[str, Callable[[int, dict], nn.Module]] = {
    "none": lambda c, o: nn.Identity(),
    "bn": lambda c, o: BatchNorm(
        c, momentum=o["momentum"], eps=o["eps"], affine=o["affine"], virtual_batch=o["virtual_batch"],
        precise_stats=o["precise_stats"],
    ),
    "ln": lambda c, o: nn.GroupNorm(1, c, eps=o["eps"], affine=o["affine"]),
    "in": lambda c, o: nn.InstanceNorm2d(c, eps=o["eps"], affine=o["affine"], track_running_stats=False),
    "gn": lambda c, o: _gn("gn", c, o),
    "brn": lambda c, o: BatchRenorm(
        c, momentum=o["momentum"], eps=o["eps"], affine=o["affine"], r_max=o["r_max"], d_max=o["d_max"],
        relax_start=o["relax_start"], r_relax_steps=o["r_relax_steps"], d_relax_steps=o["d_relax_steps"],
        virtual_batch=o["virtual_batch"], precise_stats=o["precise_stats"],
    ),
    "lrn": lambda c, o: LocalResponseNorm(
        c, size=o["size"], alpha=o["alpha"], beta=o["beta"], k=o["k"], affine=o["affine"]
    ),
    "frn": lambda c, o: FilterResponseNorm(c, eps=o["eps"], learnable_eps=o["learnable_eps"]),
    "evonorm_s0": lambda c, o: EvoNormS0(
        c, groups=check_groups("evonorm_s0", c, o["groups"], o["group_size"]), eps=o["eps"]
    ),
    "wn": lambda c, o: (
        MeanOnlyBatchNorm(c, momentum=o["momentum"], virtual_batch=o["virtual_batch"])
        if o["mean_only_bn"]
        else nn.Identity()
    ),
    "sn": lambda c, o: nn.Identity(),
    "gn_ws": lambda c, o: _gn("gn_ws", c, o),
}
assert set(_BUILDERS) == set(NORMS)


def build_norm(name: str, num_channels: int, **options) -> nn.Module:
    """The module for one norm slot with ``num_channels`` channels (N, C, H, W feature maps).

    For weight-kind norms this is the activation layer of the slot (Identity for wn and sn,
    mean-only BN for wn with mean_only_bn=True, GroupNorm for gn_ws); the weights themselves are
    reparametrized by ``apply_weight_reparam``.
    """
    opts = resolve_options(name, options)
    if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
        raise NormConfigError(f"norm '{name}': num_channels must be a positive integer, got {num_channels!r}")
    return _BUILDERS[name](num_channels, opts)


def norm_layer_factory(name: str, **options) -> Callable[[int], nn.Module]:
    """Validate name and options now; return ``norm_layer(num_channels) -> nn.Module`` (picklable)."""
    resolve_options(name, options)
    return functools.partial(build_norm, name, **options)


def is_batch_dependent(name: str, **options) -> bool:
    """Whether a training forward of a sample depends on the other samples of its batch."""
    opts = resolve_options(name, options)
    if name == "wn":
        return opts["mean_only_bn"]
    return NORMS[name].batch_dependent


def list_norms() -> list[str]:
    return list(NORMS)


def print_norms() -> None:
    """Console script ``normbench-norms``: one "name  description" line per registered norm."""
    width = max(map(len, NORMS))
    for name, info in NORMS.items():
        print(f"{name:<{width}}  {info.description}")
