"""What makes a run *this* run: its folder name, its label, its effective learning rate, and the
config that its fingerprint hashes. The runner, the checkpoint, summary.json and the report all
ask here, so two runs are the same run (or comparable runs) by one definition.

Torch-free at import (the command line composes run names before any training is due).
"""

from __future__ import annotations

import hashlib
import json
import math

from omegaconf import DictConfig, OmegaConf

# How the base learning rate follows the SGD batch: lr * rule(batch_size / optim.ref_batch).
LR_SCALING = {"linear": lambda ratio: ratio, "sqrt": math.sqrt, "none": lambda ratio: 1.0}

# Bump when a change of the code changes what a run computes (a finished run of an older version
# is then trained again instead of being skipped as done).
RESULTS_VERSION = 2

# Keys that do not change what a run computes: where it writes, how it reports progress.
NON_SEMANTIC_KEYS = {"out_dir", "run_name", "variant", "progress", "debug", "log_every", "stat_gap_every", "ckpt_every",
                     "on_bad_checkpoint", "target_acc", "threads", "report_at_end", "report_dir", "select_best", "gap_every", "compile", "experiment", "device", "hydra",
                     "dist_timeout_s"}
NON_SEMANTIC_DATA_KEYS = {"root", "cache_dir", "eval_batch_size"}

# Keys that the report can choose per setting by validation accuracy (--select-best, select_best=).
SELECTABLE_KEYS = ("lr",)


def effective_lr(cfg: DictConfig) -> float:
    """The learning rate the optimizer really uses (the base lr scaled with the global batch)."""
    ratio = cfg.batch_size * world_size() / cfg.optim.ref_batch
    return cfg.lr * LR_SCALING[cfg.optim.lr_scaling](ratio)


def world_size() -> int:
    """Processes (devices) of a data-parallel run (torchrun / SLURM / submitit); 1 otherwise."""
    from normbench import distributed

    return distributed.world_size()


def uses_batch_stats(norm: DictConfig) -> bool:
    """Whether the norm config (cfg.norm) normalizes with batch statistics."""
    from normbench import norms

    options = {k: v for k, v in norm.items() if k != "name"}
    try:
        return norms.is_batch_dependent(norm.name, **options)
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


def run_name(model: DictConfig, norm: DictConfig, batch_size, lr, seed, variant=None, eval_stats="ema",
             freeze_stats_epochs=0) -> str:
    """A readable run directory from the run's identity, e.g. resnet20/bn/bs2/lr0.1/seed0.

    Model options that differ from their defaults join the model's part (cnn-placementafter);
    norm options that differ from their defaults join the norm's part (gn-groups16); the
    virtual batch joins the batch part (bs128-vb8) for batch-dependent norms only, so the
    duplicates of a batch-independent norm in a virtual-batch sweep share one folder. `variant`
    (free text) separates runs that differ in anything else. A data-parallel run's batch part
    also names its devices (bs64x2dev: 64 per device on 2). A batch-dependent norm's eval_stats other
    than ema and its FrozenBN tail join the batch part too (bs128-vb8-evalprecise-freeze2)."""
    vb = norm.get("virtual_batch")
    batch_dependent = uses_batch_stats(norm)
    vb_part = f"-vb{vb}" if vb is not None and batch_dependent else ""
    if batch_dependent and eval_stats not in (None, "ema"):
        vb_part += f"-eval{eval_stats}"
    if batch_dependent and freeze_stats_epochs:
        vb_part += f"-freeze{freeze_stats_epochs}"
    devices_part = f"x{world_size()}dev" if world_size() > 1 else ""  # batch_size is per device
    variant_part = f"/{variant}" if variant else ""
    return (f"{model_label(model)}/{norm_label(norm)}/bs{batch_size}{devices_part}{vb_part}/lr{lr:g}{variant_part}"
            f"/seed{seed}")


def run_config(cfg: DictConfig) -> dict:
    """The resolved config as the run's identity: what its fingerprint hashes and summary.json records."""
    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("hydra", None)
    config["norm"]["virtual_batch"] = effective_virtual_batch(cfg)
    if not uses_batch_stats(cfg.norm):  # batch-independent norms ignore these, like the virtual batch
        for key in ("eval_stats", "precise_batches", "freeze_stats_epochs"):
            if key in config:
                config[key] = None
    config["devices"] = world_size()
    return config


def semantic_config(config: dict) -> dict:
    """The part of a resolved config that determines a run's results (everything but paths and logging)."""
    semantic = {k: v for k, v in config.items() if k not in NON_SEMANTIC_KEYS}
    if isinstance(semantic.get("data"), dict):
        semantic["data"] = {k: v for k, v in semantic["data"].items() if k not in NON_SEMANTIC_DATA_KEYS}
    return semantic


def fingerprint(config: dict) -> str:
    """A short hash of everything that determines a run's results."""
    identity = {**semantic_config(config), "results_version": RESULTS_VERSION}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_identity(cfg: DictConfig) -> dict:
    """The summary.json fields that say which run this is (completed, diverged or failed alike)."""
    vb = effective_virtual_batch(cfg)
    batch_dependent = uses_batch_stats(cfg.norm)
    # Synchronized statistics span every device's batch; a virtual batch fixes the normalization batch.
    norm_batch = vb or cfg.batch_size * (world_size() if cfg.norm.get("sync") else 1)
    return {"run_name": cfg.run_name, "model": cfg.model.name, "norm": cfg.norm.name, "norm_label": norm_label(cfg.norm),
            "placement": model_options(cfg.model).get("placement", "before"), "batch_size": cfg.batch_size,
            "devices": world_size(), "virtual_batch": vb,
            "norm_batch": norm_batch if batch_dependent else None,
            "lr": cfg.lr, "lr_effective": effective_lr(cfg), "seed": cfg.seed, "epochs": cfg.epochs}
