"""The one registry of normalization layers: one entry per norm, as in timm's ``create_norm``.

An entry names a layer builder that takes the channel count first and declares the norm's
options, with their defaults, as its keyword parameters; weight norms also name the
reparametrization applied to every conv / linear weight (its keyword parameters are options
too). So a norm's options are written once, in those signatures; ``conf/norm/<name>.yaml``
mirrors them (``tests/test_norms.py`` checks that), and the registry's order is the order in
which reports list the norms. Adding a norm is its layer, one ``NormInfo`` line here, its yaml and
its tests.

Batch dependence is declared here and nowhere else (``NormInfo.batch_dependent``): the trainer's
batch-statistics modes act on the layers that implement ``BatchStatNorm``, so ``build_norm`` checks the
layer of every slot it builds against the declaration and refuses a norm whose layer does not match it.

Option values follow one rule per option name (``_CHECKS``); a rule that depends on other options
or on the channel count belongs to the layer (group counts, Batch Renorm's lengths), and the
virtual batch's rule against the batch size to the batch-statistics layers (``check_virtual_batch``
applies both parts for a run's validation).

Norm-activation: where a model had BN+ReLU it asks for ``build_norm(name, C, apply_act=True)``:
the norm followed by a ReLU, except for layers that are their own nonlinearity (FRN+TLU,
EvoNorm-S0), which are returned alone. Where BN has no activation after it (before a residual
add, in a projection shortcut) it asks for ``apply_act=False``: FRN without its TLU, EvoNorm-S0
without its gate.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch.nn as nn
from torch.nn.utils import parametrize

from normbench.norms.batch_stat import BatchNorm, BatchRenorm, BatchStatNorm, EvoNormB0, virtual_batches
from normbench.norms.cross_iteration import CrossIterationBatchNorm, remember_conv_inputs
from normbench.norms.layers import (
    EvoNormS0,
    FilterResponseNorm,
    LocalResponseNorm,
    NormConfigError,
    group_norm,
    instance_norm,
    layer_norm,
    no_norm,
)
from normbench.norms.mabn import MovingAverageBatchNorm, centre_conv_weights
from normbench.norms.online import OnlineNorm
from normbench.norms.switchable import switch_norm
from normbench.norms.weight import spectral_norm_reparam, standardize_weights, weight_norm_reparam, weight_norm_slot

# Keyword parameters of a builder that ``build_norm`` sets itself, so not options: whether the slot has an
# activation, and the name the norm was chosen by (for the builder's messages).
_SLOT_ARGUMENTS = ("apply_act", "norm_name")


def _keyword_defaults(fn: Callable) -> dict[str, Any]:
    """The keyword options a builder declares, with their defaults."""
    params = inspect.signature(fn).parameters.values()
    return {p.name: p.default for p in params
            if p.kind == p.KEYWORD_ONLY and p.default is not p.empty and p.name not in _SLOT_ARGUMENTS}


@dataclass(frozen=True)
class NormInfo:
    name: str
    description: str  # one line
    layer: Callable[..., nn.Module]  # layer(num_channels, **its options) -> the norm slot's module
    # Whether a training forward of a sample depends on the rest of its batch (may depend on options): the one
    # declaration of it. True exactly where the slot's layer is a BatchStatNorm (build_norm checks).
    batch_dependent: bool | Callable[[dict], bool] = False
    reparam: Callable[..., None] | None = None  # reparam(conv_or_linear, **its options), weight norms only
    # The memory format memory_format=auto trains it in: channels_last where its kernels are faster so
    # (measured with scripts/bench.py, bf16 on this project's 2-core AMX CPU), contiguous otherwise.
    memory_format: str = "contiguous"
    statistics: str = "-"  # what its statistics are taken over: the README's norm table (norms_markdown)
    remedy: str = ""  # for a remedy of BN's small-batch failure: what it is for, and its authors' claim
    # Its layer checks where it sits only at a training forward (CBN: a conv must produce its input), so a run's
    # validation makes one, on a throwaway copy of the model, to refuse a model that cannot have it before training.
    checked_by_forward: bool = False
    options: dict[str, Any] = field(init=False)  # option name -> default, from the signatures (do not mutate)
    fused_act: bool = field(init=False)  # the layer is its own nonlinearity (takes apply_act)

    def __post_init__(self):
        options = _keyword_defaults(self.layer)
        for key, default in _keyword_defaults(self.reparam or (lambda: None)).items():
            assert options.get(key, default) == default, f"{self.name}: option {key} has two defaults"
            options[key] = default
        options.pop("virtual_batch", None)
        options["virtual_batch"] = None  # every norm accepts it (last); only batch-statistics layers use it
        object.__setattr__(self, "options", options)
        object.__setattr__(self, "fused_act", "apply_act" in inspect.signature(self.layer).parameters)

    def depends_on_batch(self, options: Mapping[str, Any]) -> bool:
        """``batch_dependent`` for these (resolved) options."""
        return self.batch_dependent(options) if callable(self.batch_dependent) else self.batch_dependent


NORMS: dict[str, NormInfo] = {
    info.name: info
    for info in [
        NormInfo("none", "no normalization (identity)", no_norm, memory_format="channels_last", statistics="-"),
        NormInfo("bn", "batch norm (Ioffe & Szegedy 2015): per-channel stats over (N,H,W); ghost batches, PreciseBN, "
                 "sync (SyncBN)", BatchNorm, batch_dependent=True, memory_format="channels_last",
                 statistics="(N, H, W) per channel; running stats in eval",
                 remedy="with sync=true (SyncBN), statistics over every device's batch together: the normalization "
                 "batch the SGD batch is, at the cost of a collective per layer"),
        NormInfo("brn", "batch renormalization (Ioffe 2017): BN corrected towards moving stats by clipped r, d; "
                 "r/d limits relax over fractions of the run; sync", BatchRenorm, batch_dependent=True,
                 memory_format="channels_last", statistics="(N, H, W), corrected towards the moving stats",
                 remedy="makes training use what inference will: the batch statistics corrected towards the moving "
                 "averages, so small or non-i.i.d. batches train a model that evaluates as it trained"),
        NormInfo("gn", "group norm (Wu & He 2018): per-sample stats over (C/G,H,W) per group", group_norm,
                 statistics="(C/G, H, W) per sample and group",
                 remedy="removes the batch from the statistics; the Group Norm paper reports 10.6% lower ImageNet "
                 "error than BN at 2 images per GPU (ResNet-50)"),
        NormInfo("ln", "layer norm as in the Group Norm paper: per-sample stats over (C,H,W), per-channel affine",
                 layer_norm, memory_format="channels_last", statistics="(C, H, W) per sample"),
        NormInfo("in", "instance norm (Ulyanov et al. 2016): stats over (H,W) per sample and channel, no running stats",
                 instance_norm, statistics="(H, W) per sample and channel"),
        NormInfo("wn", "weight norm (Salimans & Kingma 2016): w = g*v/||v||; optional data init, mean-only BN",
                 weight_norm_slot, batch_dependent=lambda options: options["mean_only_bn"], reparam=weight_norm_reparam,
                 memory_format="channels_last", statistics="weights, per output channel"),
        NormInfo("sn", "spectral norm (Miyato et al. 2018): w/sigma_max(w) by power iteration", no_norm,
                 reparam=spectral_norm_reparam, memory_format="channels_last", statistics="weights"),
        NormInfo("gn_ws", "group norm + weight standardization of every conv (Qiao et al. 2019)", group_norm,
                 reparam=standardize_weights, statistics="GN + weights per output channel",
                 remedy="GN with standardized conv weights, which its authors propose to close GN's remaining gap "
                 "to large-batch BN"),
        NormInfo("frn", "norm-activation: filter response norm + TLU (Singh & Krishnan 2019), "
                 "x/sqrt(mean_HW(x^2)+eps), max(.,tau); replaces BN+ReLU", FilterResponseNorm,
                 memory_format="channels_last", statistics="(H, W) mean square, no centring",
                 remedy="a batch-independent norm-activation pair in place of BN+ReLU, proposed to beat BN at every "
                 "batch size"),
        NormInfo("evonorm_s0", "norm-activation: EvoNorm-S0 (Liu et al. 2020), x*sigmoid(v*x)/group_std(x); "
                 "replaces BN+ReLU", EvoNormS0, memory_format="channels_last", statistics="group std (C/G, H, W)",
                 remedy="the batch-independent EvoNorm, found by search, in place of BN+ReLU"),
        NormInfo("lrn", "local response norm (AlexNet 2012); at its constants ~ a fixed scale x*2^-0.75 here",
                 LocalResponseNorm, memory_format="channels_last", statistics="5 neighbouring channels"),
        NormInfo("evonorm_b0", "norm-activation: EvoNorm-B0 (Liu et al. 2020), x/max(batch_std, v*x+instance_std)"
                 "; running variance in eval; replaces BN+ReLU", EvoNormB0, batch_dependent=True,
                 statistics="x / max(batch std (N, H, W), v·x + instance std (H, W)); running variance in eval",
                 remedy="the batch-dependent EvoNorm: its denominator falls back on the per-sample std where the "
                 "batch std is small"),
        NormInfo("switchnorm", "switchable norm (Luo et al. 2019): learned softmax mix of IN, LN, BN means and "
                 "variances; BN's from running stats in eval", switch_norm,
                 batch_dependent=lambda options: options["statistics"] == "in_ln_bn", memory_format="channels_last",
                 statistics="(H, W), (C, H, W), (N, H, W) mixed by learned weights; BN's running stats in eval",
                 remedy="learns how much to rely on the batch: its README reports ResNet-50 ImageNet top-1 at 32 / 16 / "
                 "8 / 4 / 2 images per GPU of BN 76.4 / 76.3 / 75.2 / 72.7 / 65.3, GN 75.9 / 75.8 / 76.0 / 75.8 / "
                 "75.9, SN 76.9 / 76.7 / 76.7 / 75.9 / 75.6"),
        NormInfo("mabn", "moving average batch norm (Yan et al. 2020): x/sqrt(SMA of E_NHW[x^2]+eps), SMA of the "
                 "backward's E[g*z], renormalized to the EMA; centred conv weights", MovingAverageBatchNorm,
                 batch_dependent=True, reparam=centre_conv_weights, memory_format="channels_last",
                 statistics="E[x²] over (N, H, W) per channel, averaged over the last steps, no centring; its EMA "
                 "in eval",
                 remedy="stabilizes the forward and the backward batch statistics with moving averages over steps: "
                 "its README reports ResNet-50 ImageNet top-1 error at 2 images per GPU of BN 35.22, BRN 30.29, "
                 "MABN 23.67 (BN at 32: 23.41)"),
        NormInfo("online", "online norm (Chiley et al. 2019): per-channel streaming mean/var of earlier samples, "
                 "control-process backward, layer scaling", OnlineNorm, memory_format="channels_last",
                 statistics="(H, W) per channel, streamed over every earlier sample; the streams frozen in eval",
                 remedy="normalizes with running statistics of the stream of samples, so it trains at batch 1: its "
                 "authors report ResNet-20 CIFAR-10 accuracy (250 epochs, batch 128) of ON 92.3, BN 92.2, IN 90.4, "
                 "GN 90.3, LN 87.4"),
        NormInfo("cbn", "cross-iteration BN (Yao et al. 2021): BN stats pooled over the last k steps, each moved to "
                 "the current conv weights by a Taylor expansion; BN during burn-in", CrossIterationBatchNorm,
                 batch_dependent=True, reparam=remember_conv_inputs, memory_format="channels_last",
                 checked_by_forward=True,
                 statistics="(N, H, W) per channel, pooled over the last k steps; running stats in eval",
                 remedy="enlarges the normalization batch with the last steps' statistics, compensated for the "
                 "weights' change: its README reports COCO Mask R-CNN box AP 38.4 (SyncBN 38.5, GN 38.5)"),
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
    "sync": _as_bool,
    "groups": _as_int(1),
    "group_size": _as_int(1),
    "r_max": _as_float(1.0),
    "d_max": _as_float(0.0),
    "relax_unit": _as_choice("fraction", "steps"),
    "relax_start": _as_float(0.0),
    "r_relax": _as_float(0.0),
    "d_relax": _as_float(0.0),
    "size": _as_int(1),
    "alpha": _as_float(0.0),
    "beta": _as_float(0.0),
    "k": _as_float(0.0, lo_open=True),
    "init": _as_choice("none", "data"),
    "n_power_iterations": _as_int(1),
    "statistics": _as_choice("in_ln_bn", "in_ln"),  # switchnorm: the statistics it switches between
    "alpha_fwd": _as_float(0.0, 1.0),  # online: decay of the forward statistics' stream
    "alpha_bkw": _as_float(0.0, 1.0),  # online: decay of the backward control processes
    "ecm": _as_choice("ls", "ac", "none"),  # online: error compensation (layer scaling, activation clamping)
    "ls_eps": _as_float(0.0, lo_open=True),  # online: layer scaling's eps
    "clamp_value": _as_float(0.0, lo_open=True),  # online: activation clamping's bound
    "sma_window": _as_int(1),  # mabn: training steps in the simple moving averages
    "sma_warmup": _as_int(0),  # mabn: steps normalized with the current batch's statistic before the averages
    "renorm_start": _as_int(0),  # mabn: steps before the renormalization towards the running statistic
    "window": _as_int(1),  # cbn: iterations whose statistics are pooled, the current one included (k)
    "burnin": _as_float(0.0),  # cbn: training steps (or fraction of them) normalized as BN before pooling
    "burnin_unit": _as_choice("fraction", "steps"),  # cbn: the unit of burnin
    "compensate": _as_bool,  # cbn: Taylor-compensate past statistics for the preceding conv's weight change
}
assert {key for info in NORMS.values() for key in info.options} <= set(_CHECKS), "an option without a check"


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


def _accepted(fn: Callable, options: dict) -> dict:
    params = inspect.signature(fn).parameters
    return {k: v for k, v in options.items() if k in params}


def check_virtual_batch(name: str, virtual_batch: Any, batch_size: int) -> None:
    """The virtual-batch rule for a run of norm ``name`` with training batches of ``batch_size``: a
    positive integer (the option's rule) that divides the batch (the batch-statistics layers' rule,
    which they apply again at every training forward), or None. NormConfigError otherwise."""
    if virtual_batch is not None:
        virtual_batches(name, _CHECKS["virtual_batch"](name, "virtual_batch", virtual_batch), batch_size)


def _check_batch_dependence(info: NormInfo, options: dict, layer: nn.Module) -> nn.Module:
    """The norm's layer, which must hold batch-statistics layers exactly when the registry declares the
    norm batch-dependent: the modes (PreciseBN, the FrozenBN tail, batch-statistics evaluation, sync,
    the stat gaps) act on those layers only, and would skip any other without a word."""
    layers = [type(m).__name__ for m in layer.modules() if isinstance(m, BatchStatNorm)]
    declared = info.depends_on_batch(options)
    if declared and not layers:
        raise NormConfigError(
            f"norm '{info.name}': the registry declares it batch-dependent but its layer ({type(layer).__name__}) "
            f"is no normbench.norms.batch_stat.BatchStatNorm, which PreciseBN, the FrozenBN tail, batch-statistics "
            f"evaluation, sync and the stat gaps need; build it on BatchStatNorm or declare it batch-independent")
    if layers and not declared:
        raise NormConfigError(
            f"norm '{info.name}': its layer {layers[0]} normalizes with batch statistics but the registry "
            f"declares the norm batch-independent; set batch_dependent in its NormInfo")
    return layer


def build_norm(name: str, num_channels: int, *, apply_act: bool = False, **options) -> nn.Module:
    """The module for one norm slot with ``num_channels`` channels (N, C, H, W feature maps).

    ``apply_act=False``: the norm alone; ``apply_act=True``: the norm with its activation where
    BN+ReLU stood (norm then ReLU, or a norm-activation layer alone). For weight norms the norm
    part is the slot's layer (Identity, or mean-only BN for wn with mean_only_bn); the weights
    themselves are reparametrized by ``apply_weight_reparam``.
    """
    info = _get_info(name)
    opts = resolve_options(name, options)
    if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
        raise NormConfigError(f"norm '{name}': num_channels must be a positive integer, got {num_channels!r}")
    layer_options = _accepted(info.layer, {**opts, "norm_name": name})
    if info.fused_act:
        return _check_batch_dependence(info, opts, info.layer(num_channels, apply_act=apply_act, **layer_options))
    norm = _check_batch_dependence(info, opts, info.layer(num_channels, **layer_options))
    if not apply_act:
        return norm
    if isinstance(norm, nn.Identity):  # not in place: the slot's input may be needed elsewhere (a shortcut)
        return nn.ReLU()
    return nn.Sequential(norm, nn.ReLU(inplace=True))


def norm_layer_factory(name: str, **options) -> Callable[..., nn.Module]:
    """Validate name and options now; return ``norm_layer(num_channels, apply_act=...)`` (picklable)."""
    resolve_options(name, options)
    return functools.partial(build_norm, name, **options)


def apply_weight_reparam(model: nn.Module, name: str, **options) -> nn.Module:
    """Reparametrize every conv / linear weight of ``model`` in place for weight norm ``name``; returns it.

    No-op for the other norms. Options are validated like ``build_norm``'s (same names; the
    reparametrization reads those in its signature). Layers already parametrized are skipped,
    so calling it twice is harmless.
    """
    info = _get_info(name)
    opts = resolve_options(name, options)
    if info.reparam is None:
        return model
    reparam_options = _accepted(info.reparam, opts)
    for layer in list(model.modules()):
        if isinstance(layer, (nn.Conv2d, nn.Linear)) and not parametrize.is_parametrized(layer, "weight"):
            info.reparam(layer, **reparam_options)
    return model


def is_batch_dependent(name: str, **options) -> bool:
    """Whether a training forward of a sample depends on the other samples of its batch."""
    return NORMS[name].depends_on_batch(resolve_options(name, options))


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def norms_markdown() -> str:
    """The README's tables, from the registry: every norm (name, what it is, what its statistics are taken
    over, whether it depends on the batch at its defaults), then what each remedy of BN's small-batch failure
    is for."""
    lines = ["| name | what | statistics over | batch-dependent |", "|:---|:---|:---|:---|"]
    for name, info in NORMS.items():
        dependent = "yes" if info.depends_on_batch(info.options) else "no"
        lines.append(f"| `{name}` | {_cell(info.description)} | {_cell(info.statistics)} | {dependent} |")
    lines += ["", "What each remedy for BN's small-batch failure is for:", "",
              "| name | what it is for (and its authors' claim) |", "|:---|:---|"]
    lines += [f"| `{name}` | {_cell(info.remedy)} |" for name, info in NORMS.items() if info.remedy]
    return "\n".join(lines) + "\n"


# Where README.md holds norms_markdown(): between these lines.
README_BEGIN = "<!-- generated by normbench-norms --markdown (from the registry); tests/test_norms.py checks it -->\n"
README_END = "<!-- end of the generated tables -->"


def update_readme(path) -> None:
    """Put norms_markdown() in place in the README at ``path`` (``normbench-norms --update-readme README.md``)."""
    from pathlib import Path

    text = Path(path).read_text(encoding="utf-8")
    begin, end = text.index(README_BEGIN) + len(README_BEGIN), text.index(README_END)
    Path(path).write_text(text[:begin] + norms_markdown() + text[end:], encoding="utf-8")


def print_norms(argv: list[str] | None = None) -> None:
    """Console script ``normbench-norms``: one "name  description" line per registered norm;
    ``--markdown``: the README's tables (``norms_markdown``); ``--update-readme PATH``: put them in place."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if "--update-readme" in args:
        update_readme(args[args.index("--update-readme") + 1])
        return
    if "--markdown" in args:
        print(norms_markdown(), end="")
        return
    width = max(map(len, NORMS))
    for name, info in NORMS.items():
        print(f"{name:<{width}}  {info.description}")
