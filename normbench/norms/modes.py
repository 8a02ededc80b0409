"""The model-wide modes: switches over every batch-statistics layer of a model, for the trainer.

``set_training_length`` / ``schedule_scalars`` (Batch Renorm's schedule over the run),
``precise_bn_update`` (PreciseBN, the trainer's ``eval_stats=precise``), ``batch_stats_mode``
(evaluation with mini-batch statistics, ``eval_stats=batch``), ``freeze_batch_stats`` (the FrozenBN
tail, ``freeze_stats_epochs``) and ``recording_batch_stats`` / ``batch_stat_gaps`` (the gap between
training and inference statistics). Each acts on the layers that implement
``normbench.norms.batch_stat.BatchStatNorm``; the registry guarantees that those are exactly the
norm slots of the norms it declares batch-dependent (``build_norm`` refuses any other), so no mode
skips a batch-dependent layer.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Iterable, Iterator

import torch
import torch.nn as nn

from normbench.norms.batch_stat import BatchRenorm, BatchStatNorm


def _batch_stat_modules(model: nn.Module) -> list[BatchStatNorm]:
    return [m for m in model.modules() if isinstance(m, BatchStatNorm)]


def set_training_length(model: nn.Module, total_steps: int) -> nn.Module:
    """Tell every layer with a schedule over training the run's length: each layer that has one declares it
    by a ``set_training_length(total_steps)`` method (Batch Renorm's r/d relaxation, CBN's burn-in)."""
    for m in model.modules():
        if callable(getattr(m, "set_training_length", None)):
            m.set_training_length(total_steps)
    return model


def schedule_scalars(model: nn.Module) -> dict[str, float]:
    """The values the norms report now, for logging: ``brn/r_max`` and ``brn/d_max`` if the model has Batch
    Renorm layers (they all count the same steps), and Switchable Normalization's softmax importance weights
    averaged over its layers (``switchnorm/mean_in``, ..., one host sync), else nothing."""
    scalars: dict[str, float] = {}
    brn = next((m for m in model.modules() if isinstance(m, BatchRenorm)), None)
    if brn is not None:
        r_max, d_max = brn.current_limits()
        scalars.update({"brn/r_max": r_max, "brn/d_max": d_max})
    switch = [m.importance_weights() for m in model.modules() if callable(getattr(m, "importance_weights", None))]
    if switch:
        with torch.no_grad():
            means = torch.stack([torch.stack([w[k] for w in switch]).float().mean() for k in switch[0]]).tolist()
        scalars.update({f"switchnorm/{k}": v for k, v in zip(switch[0], means)})
    return scalars


def _model_device(model: nn.Module) -> torch.device | None:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return None


def precise_bn_update(model: nn.Module, batches: Iterable[torch.Tensor], num_batches: int) -> nn.Module:
    """PreciseBN: set the running stats of every batch-statistics layer to population statistics.

    Runs the model in training mode (so each layer sees the activations it sees in training,
    normalized with batch statistics, ghost batches included) on the first ``num_batches`` input
    batches of ``batches`` in one pass, as fvcore's ``update_bn_stats`` does, without gradients and
    without touching any running statistic or step counter; then each layer's running mean /
    running var become the exact mean / unbiased variance of its inputs over all samples and
    positions of those batches. Weights are untouched; every module's train/eval flag is restored.
    No-op (``batches`` not consumed) if the model has no such layer or ``num_batches`` is 0.
    Items of ``batches`` may be tensors or (x, ...) tuples.
    """
    wanted = _batch_stat_modules(model)
    if not wanted or num_batches <= 0:
        return model
    modes = [(m, m.training) for m in model.modules()]
    device = _model_device(model)
    accs = {m: [0, None, None] for m in wanted}
    try:
        model.train()
        for m in wanted:
            m._keep_running_stats = True
            m._precise_acc = accs[m]
        with torch.no_grad():
            for x in itertools.islice(iter(batches), num_batches):
                if isinstance(x, (tuple, list)):
                    x = x[0]
                if device is not None:
                    x = x.to(device, non_blocking=True)
                model(x)
        for m in wanted:
            m._set_population_stats(accs[m])
    finally:
        for m in wanted:
            m._keep_running_stats = False
            m._precise_acc = None
        for m, mode in modes:
            m.training = mode
    return model


@contextlib.contextmanager
def batch_stats_mode(model: nn.Module, group: int) -> Iterator[nn.Module]:
    """Evaluation with mini-batch statistics: while active, every module is in training mode and
    every batch-statistics layer normalizes each consecutive group of ``group`` samples of its input
    with that group's statistics (its training-mode forward, Batch Renorm's correction included),
    updating no running statistic or step counter and never synchronizing over ranks. The caller
    feeds batches whose size is a multiple of ``group`` (under ``torch.no_grad``). Every module's
    train/eval flag and every layer's virtual batch are restored on exit."""
    mods = _batch_stat_modules(model)
    modes = [(m, m.training) for m in model.modules()]
    saved = [(m, m.virtual_batch) for m in mods]
    try:
        model.train()
        for m in mods:
            m._keep_running_stats = True
            m.virtual_batch = int(group)
        yield model
    finally:
        for m, vb in saved:
            m._keep_running_stats = False
            m.virtual_batch = vb
        for m, mode in modes:
            m.training = mode


def freeze_batch_stats(model: nn.Module) -> nn.Module:
    """FrozenBN: put every batch-statistics layer in eval mode (normalize with the running
    statistics, update none of them), the rest of the model untouched. Call after ``model.train()``."""
    for m in _batch_stat_modules(model):
        m.eval()
    return model


@contextlib.contextmanager
def recording_batch_stats(model: nn.Module) -> Iterator[nn.Module]:
    """While active, batch-statistics layers keep the detached batch mean of each training
    forward (``last_batch_mean``; shape (C,), or (G, C) with ghost batches) and the gap of its
    mean and variance to the running statistics (read with ``batch_stat_gaps``). Old records are
    cleared on entry; the last ones stay readable after exit. Eval-mode forwards record nothing.
    """
    mods = _batch_stat_modules(model)
    for m in mods:
        m.last_batch_mean = m.last_gaps = None
        m._recording = True
    try:
        yield model
    finally:
        for m in mods:
            m._recording = False


def batch_stat_gaps(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per recorded layer (module name): (mean |mu_B - running_mean|, mean |log(var_B + eps) -
    log(running_var + eps)|), averaged over channels (and ghost groups), as 0-dim tensors, with
    the running stats as they were *before* that forward's update (what eval would have used).
    The variance gap is 0 for mean-only BN, which divides by no variance.
    """
    return {
        name: m.last_gaps
        for name, m in model.named_modules()
        if isinstance(m, BatchStatNorm) and m.last_gaps is not None
    }
