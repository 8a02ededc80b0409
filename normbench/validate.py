"""Bad input is caught here, before any training: one rule per setting, each a one-line UserError.

The same rules run twice: on the raw command line (so a sweep with one bad value stops before
its first run) and on each run's composed config.
"""

from __future__ import annotations

import os
from pathlib import Path

from normbench.errors import UserError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "norm", "data", "optim", "sched", "experiment")


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check_group_choice(group: str, name: str) -> None:
    valid = group_options(group)
    if name not in valid:
        raise UserError(f"unknown {group} {name!r}; valid {group} names: {', '.join(valid)}")


def _as_int(key: str, value) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{key}={value!r} is not a number; give a positive integer") from None
    if number != int(number):
        raise UserError(f"{key}={value!r} is not an integer; give a positive integer")
    return int(number)


def check_positive_int(key: str, value) -> int:
    number = _as_int(key, value)
    if number <= 0:
        raise UserError(f"{key}={value} must be a positive integer (at least 1)")
    return number


def check_nonnegative_int(key: str, value) -> int:
    number = _as_int(key, value)
    if number < 0:
        raise UserError(f"{key}={value} must be 0 or a positive integer")
    return number


def check_choice(key: str, value, choices: tuple) -> None:
    if value not in choices:
        shown = ", ".join("true" if c is True else "false" if c is False else str(c) for c in choices)
        raise UserError(f"{key}={value!r} is not one of: {shown}")


def check_device(name) -> None:
    import torch

    name = str(name)
    if name in ("auto", "cpu", "mps"):
        return
    if name == "cuda" or name.startswith("cuda:"):
        index = name.partition(":")[2]
        if index and (not index.isdigit() or (torch.cuda.is_available() and int(index) >= torch.cuda.device_count())):
            raise UserError(f"device={name}: no such GPU here ({torch.cuda.device_count()} visible); use device=auto or cuda:0")
        return
    raise UserError(f"device={name!r} is not a device name; use auto, cpu, cuda, cuda:N or mps")


def check_lr(value) -> float:
    try:
        lr = float(value)
    except (TypeError, ValueError):
        raise UserError(f"lr={value!r} is not a number; give a positive learning rate such as lr=0.1") from None
    if not lr > 0:
        raise UserError(f"lr={value} must be positive; give a learning rate such as lr=0.1")
    return lr


def check_virtual_batch(virtual_batch, batch_size: int) -> None:
    if virtual_batch is None:
        return
    vb = check_positive_int("norm.virtual_batch", virtual_batch)
    if batch_size % vb:
        raise UserError(f"norm.virtual_batch={vb} does not divide batch_size={batch_size}; "
                        f"choose a divisor of the batch size (the normalization batch is a slice of it)")


def check_writable(directory: str | os.PathLike) -> None:
    """The nearest existing ancestor of `directory` must be a writable folder."""
    path = Path(directory).expanduser().absolute()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"output folder {path} cannot be written ({probe} is not a writable folder); "
                        "set out_dir=<a writable folder>")


# Top-level keys checked on the command line, before Hydra composes anything.
_SCALAR_RULES = {
    "batch_size": lambda v: check_positive_int("batch_size", v),
    "epochs": lambda v: check_positive_int("epochs", v),
    "lr": check_lr,
    "data.subset": lambda v: check_positive_int("data.subset", v),
    "data.test_subset": lambda v: check_positive_int("data.test_subset", v),
}


def check_argv(argv: list[str]) -> None:
    """Check group names, simple numeric values and the output folder in command-line overrides."""
    out_dir = "runs"
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if "(" in value or value.startswith("${"):  # sweep functions and interpolations: leave to the per-run check
            continue
        values = [v.strip() for v in value.split(",")]
        if key in GROUPS:
            for v in values:
                if v != "null":
                    check_group_choice(key, v)
        elif key in _SCALAR_RULES:
            for v in values:
                if v != "null":
                    _SCALAR_RULES[key](v)
        elif key == "out_dir":
            out_dir = value
    check_writable(out_dir)


def check_config(cfg) -> None:
    """Check one run's composed config (what a YAML preset may have set too)."""
    check_group_choice("model", cfg.model.name)
    check_group_choice("norm", cfg.norm.name)
    batch_size = check_positive_int("batch_size", cfg.batch_size)
    check_positive_int("epochs", cfg.epochs)
    check_lr(cfg.lr)
    check_virtual_batch(cfg.norm.get("virtual_batch"), batch_size)
    check_nonnegative_int("seed", cfg.seed)
    check_positive_int("log_every", cfg.log_every)
    for key in ("stat_gap_every", "ckpt_every"):
        check_nonnegative_int(key, cfg[key] or 0)
    if cfg.threads is not None:
        check_positive_int("threads", cfg.threads)
    check_device(cfg.device)
    check_choice("amp", cfg.amp, ("auto", True, False))
    check_choice("progress", cfg.progress, ("auto", True, False))
    check_positive_int("data.eval_batch_size", cfg.data.eval_batch_size)
    check_nonnegative_int("data.crop_padding", cfg.data.crop_padding)
    check_choice("sched.name", cfg.sched.name, ("cosine", "onecycle"))
    for key in ("subset", "test_subset", "val_split"):
        if cfg.data.get(key) is not None:
            check_positive_int(f"data.{key}", cfg.data[key])
    if cfg.model.placement not in ("before", "after"):
        raise UserError(f"model.placement={cfg.model.placement!r}; use before (conv-norm-ReLU) or after (conv-ReLU-norm)")
    if cfg.model.placement == "after" and cfg.model.name != "cnn":
        raise UserError(f"model.placement=after is supported by model=cnn only, not {cfg.model.name}")
    if cfg.optim.lr_scaling not in ("linear", "sqrt", "none"):
        raise UserError(f"optim.lr_scaling={cfg.optim.lr_scaling!r}; use linear, sqrt or none")
    if cfg.on_bad_checkpoint not in ("restart", "stop"):
        raise UserError(f"on_bad_checkpoint={cfg.on_bad_checkpoint!r}; use restart or stop")
    check_writable(cfg.out_dir)
