"""What makes a run *this* run: its folder name, its label, its effective learning rate, and its
identity, the part of its config that determines its results. The runner, the checkpoint, the
skip of a finished run, summary.json and the report all ask here, so two runs are the same run
(or comparable runs) by one definition.

The identity is computed from a recorded config, never trusted from a stored hash:
- keys that no result depends on are declared in conf/ beside them (`identity_ignores`);
- a key at its conf/ default counts as absent, so an option added at a default that does what
  runs did before it leaves every finished run's identity as it was;
- values resolved on the machine (amp=auto, compile=auto) are recorded as resolved;
- RESULTS_VERSION says that the code now computes something else: older runs are other runs.

Torch-free at import (the command line composes run names before any training is due).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from normbench import budget, distributed

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass(frozen=True)
class LrRule:
    """How the base learning rate follows the SGD batch: lr * scale(batch_size / optim.ref_batch)."""

    scale: Callable[[float], float]
    formula: str  # as the report's protocol line says it ({batch}: "batch" or "global batch")


LR_SCALING = {
    "linear": LrRule(lambda ratio: ratio, "lr = base × {batch}/{ref_batch:g}"),
    "sqrt": LrRule(math.sqrt, "lr = base × √({batch}/{ref_batch:g})"),
    "none": LrRule(lambda ratio: 1.0, "lr = base (not scaled with the batch)"),
}

# Bump when a change of the code changes what a run computes: a finished run of an older version
# is then trained again instead of being skipped, and the report keeps the versions in separate
# rows. summary.json records it; a summary without one was written at version 2.
RESULTS_VERSION = 2
FIRST_RECORDED_VERSION = 2

# Keys that conf/*.yaml declares outside a run's identity (each config node's `identity_ignores`).
IGNORES_KEY = "identity_ignores"
# Settings of batch-dependent norms only: a batch-independent norm ignores them, and its config
# records them as null (run_config), like its virtual batch.
BATCH_STAT_KEYS = ("eval_stats", "precise_batches", "freeze_stats_epochs")
# Where a model's norm sits relative to its activation; the first is the place of a model without
# the option (every ResNet: conv-norm-ReLU).
PLACEMENTS = ("before", "after")

# Keys that the report can choose per setting by validation accuracy (--select-best, select_best=).
SELECTABLE_KEYS = ("lr",)


def effective_lr(cfg: DictConfig) -> float:
    """The learning rate the optimizer really uses (the base lr scaled with the global batch)."""
    ratio = cfg.batch_size * distributed.world_size() / cfg.optim.ref_batch
    return cfg.lr * LR_SCALING[cfg.optim.lr_scaling].scale(ratio)


def uses_batch_stats(norm: DictConfig) -> bool:
    """Whether the norm config (cfg.norm) normalizes with batch statistics."""
    from normbench import norms

    try:
        return norms.is_batch_dependent(norm.name, **norm_options(norm))
    except norms.NormConfigError:
        return True  # a bad option is reported by validation, not here


def _options_label(name: str, options: dict, defaults: dict) -> str:
    """name plus each option that differs from its default, e.g. gn-groups16, cnn-placementafter."""
    changed = [f"{k.replace('_', '')}{v}" for k, v in sorted(options.items())
               if v is not None and k in defaults and v != defaults[k]]
    return "-".join([name, *changed])


def norm_label(norm: DictConfig) -> str:
    """The norm's name plus its options that differ from the registry defaults, e.g. gn-groups16.
    (The virtual batch is shown with the batch size instead.)"""
    from normbench import norms

    defaults = norms.NORMS[norm.name].options if norm.name in norms.NORMS else {}
    return _options_label(norm.name, {k: v for k, v in norm.items() if k not in ("name", "virtual_batch")}, defaults)


def norm_options(norm: DictConfig) -> dict:
    """The norm's options from its config (cfg.norm without its name)."""
    return {k: v for k, v in norm.items() if k != "name"}


def model_options(model: DictConfig) -> dict:
    """The model's options from its config (cfg.model without its name)."""
    return {k: v for k, v in OmegaConf.to_container(model, resolve=True).items() if k != "name"}


def model_label(model: DictConfig) -> str:
    """The model's name plus its options that differ from their defaults, e.g. cnn-placementafter."""
    from normbench.models import MODELS

    defaults = MODELS[model.name].options if model.name in MODELS else {}
    return _options_label(model.name, model_options(model), defaults)


def effective_virtual_batch(cfg: DictConfig) -> int | None:
    """The virtual batch if the norm uses batch statistics, else None (batch-independent norms ignore it)."""
    vb = cfg.norm.get("virtual_batch")
    return vb if vb is not None and uses_batch_stats(cfg.norm) else None


def compute_label(amp="auto", memory_format="auto", device_name="auto", norm_name: str = "") -> str:
    """How a run computes, for its folder name: "" for fp32 with contiguous tensors (every run before
    these options), else -bf16 and / or -cl (channels_last), as resolved on this machine."""
    from normbench import device
    from normbench.errors import UserError

    try:
        kind = device.device_type(device_name)
    except UserError:  # validation reports the device
        kind = "cpu"
    bf16 = device.uses_bf16(amp, kind)
    channels_last = device.resolved_memory_format(memory_format, norm_name, bf16) == "channels_last"
    return ("-bf16" if bf16 else "") + ("-cl" if channels_last else "")


def run_name(model: DictConfig, norm: DictConfig, batch_size, lr, seed, variant=None, eval_stats="ema",
             freeze_stats_epochs=0, amp="auto", memory_format="auto", device_name="auto", budget_unit=None,
             budget_length=None, epochs=None) -> str:
    """A readable run directory from the run's identity, e.g. resnet20/bn/bs2/lr0.1/ep30/seed0.

    Model options that differ from their defaults join the model's part (cnn-placementafter);
    norm options that differ from their defaults join the norm's part (gn-groups16); the
    virtual batch joins the batch part (bs128-vb8) for batch-dependent norms only, so the
    duplicates of a batch-independent norm in a virtual-batch sweep share one folder. `variant`
    (free text) separates runs that differ in anything else. A data-parallel run's batch part
    also names its devices (bs64x2dev: 64 per device on 2). A batch-dependent norm's eval_stats other
    than ema and its FrozenBN tail join the batch part too (bs128-vb8-evalprecise-freeze2), and so
    does how it computes where that is not fp32 with contiguous tensors (bs128-bf16-cl). The training
    length follows the lr (ep4, steps3000, img384000: ``budget.label``), so a sweep over lengths keeps one
    folder per length; without ``epochs`` (the names of runs before the length was in them) it is left out."""
    vb = norm.get("virtual_batch")
    batch_dependent = uses_batch_stats(norm)
    vb_part = f"-vb{vb}" if vb is not None and batch_dependent else ""
    if batch_dependent and eval_stats not in (None, "ema"):
        vb_part += f"-eval{eval_stats}"
    if batch_dependent and freeze_stats_epochs:
        vb_part += f"-freeze{freeze_stats_epochs}"
    vb_part += compute_label(amp, memory_format, device_name, norm.name)
    devices_part = f"x{distributed.world_size()}dev" if distributed.world_size() > 1 else ""  # batch_size is per device
    variant_part = f"/{variant}" if variant else ""
    length_part = f"/{budget.label(budget_unit, budget_length, epochs)}" if epochs is not None else ""
    return (f"{model_label(model)}/{norm_label(norm)}/bs{batch_size}{devices_part}{vb_part}/lr{lr:g}{length_part}"
            f"{variant_part}/seed{seed}")


def legacy_run_name(cfg: DictConfig) -> str:
    """The folder this run had before run names held the training length (results of those versions are
    found there: ``cli`` skips a finished one). Only epochs budgets existed then."""
    return run_name(cfg.model, cfg.norm, cfg.batch_size, cfg.lr, cfg.seed, cfg.variant, cfg.eval_stats,
                    cfg.freeze_stats_epochs, cfg.amp, cfg.memory_format, cfg.device)


def run_config(cfg: DictConfig) -> dict:
    """The resolved config as the run records it (summary.json's `config`): what was asked, with the
    values resolved on this machine in place of `auto` (amp, compile), the effective virtual batch,
    and the settings a batch-independent norm ignores recorded as null."""
    from normbench import device

    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("hydra", None)
    config["norm"]["virtual_batch"] = effective_virtual_batch(cfg)
    if not uses_batch_stats(cfg.norm):  # batch-independent norms ignore these, like the virtual batch
        for key in BATCH_STAT_KEYS:
            if key in config:
                config[key] = None
    if budget.unit(cfg) != "epochs":  # a steps or images budget: epochs is not used
        config["epochs"] = None
    config["devices"] = distributed.world_size()
    kind = device.device_type(cfg.device)
    config["amp"] = device.uses_bf16(cfg.amp, kind)
    config["compile"] = device.uses_compile(cfg.compile, kind)
    config["memory_format"] = device.resolved_memory_format(cfg.memory_format, cfg.norm.name, config["amp"])
    return config


def _recorded_resolutions(config: dict, device_name: str | None) -> dict:
    """A config as it would be recorded today. Summaries of results version 2 recorded amp and
    compile as asked (auto, or absent before compile existed); auto meant on CUDA only then, and the
    summary's `device` says where the run was. Before memory_format existed, every run was contiguous."""
    on_cuda = str(device_name or "").startswith("cuda")
    config = dict(config)
    for key in ("amp", "compile"):
        if config.get(key, False) not in (True, False):  # "auto" (or missing compile: off)
            config[key] = on_cuda if config.get(key) == "auto" else False
    config.setdefault("memory_format", "contiguous")
    return config


@functools.cache
def _yaml(path: Path) -> dict:
    tree = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    tree.pop("defaults", None)
    tree.pop("hydra", None)
    return tree


def _conf_tree(config: dict) -> dict:
    """What conf/ defines for this config's choices: config.yaml, and each group's chosen entry
    (model, norm, data, optim, sched: conf/<group>/<name>.yaml)."""
    tree = dict(_yaml(CONF_DIR / "config.yaml"))
    for group, value in config.items():
        entry = CONF_DIR / group / f"{value.get('name')}.yaml" if isinstance(value, dict) else None
        if entry is not None and entry.is_file():
            tree[group] = _yaml(entry)
    return tree


def declared_ignores(group: str | None = None, name: str | None = None) -> list | None:
    """What conf/ declares outside the identity: in config.yaml, or in a group's entry (data, cifar10)."""
    return _yaml(CONF_DIR / "config.yaml" if group is None else CONF_DIR / group / f"{name}.yaml").get(IGNORES_KEY)


def _same(a, b) -> bool:
    """Equal values of one kind (True is not 1; 1 is 1.0)."""
    numbers = (int, float)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, numbers) and isinstance(b, numbers):
        return a == b
    return type(a) is type(b) and a == b


def _without(config: dict, conf: dict, drop_defaults: bool) -> dict:
    """`config` less the keys its conf node declares outside the identity (and, with drop_defaults,
    less the values equal to their conf/ default), node by node."""
    ignored = set(conf.get(IGNORES_KEY, ())) | {IGNORES_KEY}
    out = {}
    for key, value in config.items():
        if key in ignored:
            continue
        if key == "name":  # a group's choice (norm.name: gn) is the run's, never a default to drop
            out[key] = value
            continue
        default = conf.get(key, _MISSING) if isinstance(conf, dict) else _MISSING
        if isinstance(value, dict):
            value = _without(value, default if isinstance(default, dict) else {}, drop_defaults)
            if drop_defaults and not value and isinstance(default, dict):
                continue
        elif drop_defaults and default is not _MISSING and _same(value, default):
            continue
        out[key] = value
    return out


_MISSING = object()


def identity_config(config: dict, device_name: str | None = None) -> dict:
    """A recorded config's identity: what determines the run's results, resolved as recorded
    today, with every key at its conf/ default left out. So an option added at its default leaves
    every earlier run's identity as it was, and two configs are the same run exactly when they
    agree on every key, a key one of them lacks counting as its default."""
    config = _recorded_resolutions(config, device_name)
    return _without(config, _conf_tree(config), drop_defaults=True)


def semantic_config(config: dict, device_name: str | None = None) -> dict:
    """A recorded config's identity with every key conf/ defines present (its default where the
    config lacks it): the report's setting of a run, so old and new runs compare key by key."""
    config = _recorded_resolutions(config, device_name)
    conf = _conf_tree(config)
    return _merged(_without(conf, conf, drop_defaults=False), _without(config, conf, drop_defaults=False))


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def fingerprint(config: dict, device_name: str | None = None, version: int | None = None) -> str:
    """A short hash of a recorded config's identity and the results version it was computed with
    (this code's, unless told)."""
    identity = {**identity_config(config, device_name), "results_version": version or RESULTS_VERSION}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def record_fingerprint(record: dict) -> str | None:
    """The fingerprint of a summary's run, recomputed from what it records (its config, device and
    results version), so a summary written before an option existed still names its run."""
    if not isinstance(record.get("config"), dict):
        return None
    return fingerprint(record["config"], record.get("device"), record.get("results_version") or FIRST_RECORDED_VERSION)


def normalization_batch(cfg: DictConfig) -> int | None:
    """The images a batch-dependent norm's statistics are taken over (None for a batch-independent norm): the
    virtual batch, else the per-device batch, or every device's batch together with synchronized statistics."""
    if not uses_batch_stats(cfg.norm):
        return None
    return effective_virtual_batch(cfg) or cfg.batch_size * (distributed.world_size() if cfg.norm.get("sync") else 1)


def run_identity(cfg: DictConfig) -> dict:
    """The summary.json fields that say which run this is (completed, diverged or failed alike)."""
    return {"run_name": cfg.run_name, "model": cfg.model.name, "norm": cfg.norm.name, "norm_label": norm_label(cfg.norm),
            "placement": model_options(cfg.model).get("placement", PLACEMENTS[0]), "batch_size": cfg.batch_size,
            "devices": distributed.world_size(), "virtual_batch": effective_virtual_batch(cfg),
            "norm_batch": normalization_batch(cfg),
            "lr": cfg.lr, "lr_effective": effective_lr(cfg), "seed": cfg.seed,
            "epochs": cfg.epochs if budget.unit(cfg) == "epochs" else None, "budget": budget.label(
                budget.unit(cfg), cfg.get("budget", {}).get("length"), cfg.epochs)}
