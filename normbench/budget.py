"""The training length, in one place: a budget of epochs, of optimizer steps or of training images.

``budget.unit=epochs`` (the default) trains ``epochs`` whole passes over the training set, as every run
before the option did. ``budget.unit=steps`` trains ``budget.length`` optimizer steps, and
``budget.unit=images`` the steps that see ``budget.length`` training images (rounded up to whole global
batches), in as many passes as that takes, the last one cut short; ``epochs`` is then not used (the run's
recorded config holds it as null). So small-batch arms can be compared at equal steps
(``budget.unit=steps``) as well as at equal epochs. Everything that follows the length follows the step
count: the lr schedule (its warmup and cosine), Batch Renorm's relaxation, the evaluations (at the end of
every pass, the last one at the budget's end), the FrozenBN tail (the last passes).

Torch-free (run names are composed before any training).
"""

from __future__ import annotations

import math

from normbench.errors import UserError

UNITS = ("epochs", "steps", "images")
# The config keys that hold a run's length (budget.unit says what budget.length counts).
SETTINGS = ("epochs", "budget.unit", "budget.length")
DEFAULT_UNIT = UNITS[0]
# The run folder's length part: ep4, steps3000, img384000.
LABEL_PREFIX = {"epochs": "ep", "steps": "steps", "images": "img"}


def unit(cfg) -> str:
    budget = cfg.get("budget") or {}
    return budget.get("unit") or DEFAULT_UNIT


def length(cfg) -> int:
    """The budget's length in its unit: ``epochs`` for an epochs budget, ``budget.length`` otherwise."""
    return int(cfg.epochs) if unit(cfg) == "epochs" else int(cfg.budget.length)


def label(budget_unit: str | None, budget_length, epochs) -> str:
    """The run folder's length part, e.g. ep4, steps3000, img384000."""
    budget_unit = budget_unit or DEFAULT_UNIT
    value = epochs if budget_unit == "epochs" else budget_length
    return f"{LABEL_PREFIX.get(budget_unit, budget_unit)}{value}"


def describe(run_label: str) -> str:
    """A run's budget label (``label``) in words: 4 epochs, 3000 steps, 384000 training images."""
    for kind, prefix in sorted(LABEL_PREFIX.items(), key=lambda item: -len(item[1])):
        if run_label.startswith(prefix) and run_label[len(prefix):].isdigit():
            value = int(run_label[len(prefix):])
            words = {"epochs": "epoch", "steps": "step", "images": "training image"}[kind]
            return f"{value} {words}{'' if value == 1 else 's'}"
    return run_label


def total_steps(cfg, steps_per_epoch: int, global_batch: int) -> int:
    """The run's optimizer steps."""
    kind = unit(cfg)
    if kind == "epochs":
        return int(cfg.epochs) * steps_per_epoch
    if kind == "steps":
        return int(cfg.budget.length)
    return math.ceil(int(cfg.budget.length) / global_batch)


def passes(total: int, steps_per_epoch: int) -> int:
    """The passes over the training set (epochs, the last one possibly cut short) that ``total`` steps take."""
    return math.ceil(total / steps_per_epoch)


def check(cfg) -> None:
    """The budget's rules (validation): a known unit; for steps and images a positive integer length; for
    epochs no length (the length is ``epochs``, one place for it)."""
    from normbench.validate import check_choice, check_positive_int

    budget = cfg.get("budget") or {}
    kind = budget.get("unit") or DEFAULT_UNIT
    check_choice("budget.unit", kind, UNITS)
    value = budget.get("length")
    if kind == "epochs":
        if value is not None:
            raise UserError(f"budget.length={value} is for budget.unit=steps or images; an epochs budget is "
                            f"epochs=N (set budget.unit=steps or images, or drop budget.length)")
        return
    if value is None:
        raise UserError(f"budget.unit={kind} needs budget.length: the number of training {kind} (a positive integer)")
    check_positive_int("budget.length", value)
