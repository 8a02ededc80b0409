"""What a run measures at the end of each epoch, one unit: `EvaluationSuite`.

- The headline: test loss and accuracy (and validation's, with data.val_split) with the run's
  evaluation statistics, ``eval_stats``: ema (the running estimates), precise (PreciseBN's population
  statistics, recomputed first) or batch (each group of the normalization batch with its own
  mini-batch statistics). Batch-independent norms have one kind of statistics: ema.
- The train/inference statistics gap (issue 12; summary.GAP_FIELDS), every gap_every epochs and at
  the last: the training slice (gap_train_images) with mini-batch statistics, the test set with
  mini-batch and with population statistics, and with the running estimates before PreciseBN.

Each rank evaluates its shard of a split with rank 0's running statistics (`rank0_buffers`); the
metrics are summed over the ranks in `reduce_over_ranks`, the one place metrics are reduced.
"""

from __future__ import annotations

import contextlib
import itertools
import math

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from normbench import data, distributed, identity, norms
from normbench.summary import GAP_FIELDS


def reduce_over_ranks(*values: torch.Tensor, op: str = "sum") -> list[torch.Tensor]:
    """Per-process 0-dim tensors combined over the ranks of a data-parallel run, their "sum" or
    "min"; the values themselves in a single process."""
    if not distributed.is_initialized():
        return list(values)
    stacked = torch.stack([v.double() for v in values])
    torch.distributed.all_reduce(stacked, op={"sum": torch.distributed.ReduceOp.SUM,
                                              "min": torch.distributed.ReduceOp.MIN}[op])
    return list(stacked.unbind())


@torch.no_grad()
def evaluate(model, batches: data.Batches, autocast, batch_stats: int | None = None) -> tuple[float, float]:
    """Mean loss and accuracy (%) over a whole split (this rank's shard, reduced over the ranks);
    one host sync. In eval mode, or with ``batch_stats=k``: with mini-batch statistics, every
    batch-statistics layer normalizing each consecutive group of k images (in the fixed random
    order of ``eval_batches_for``) with that group's statistics, running statistics untouched (``norms.batch_stats_mode``);
    the last len % k images, too few for a group, are left out."""
    loss_sum = torch.zeros((), device=batches.device)
    correct = torch.zeros((), device=batches.device, dtype=torch.long)
    seen = torch.zeros((), device=batches.device, dtype=torch.long)
    mode = norms.batch_stats_mode(model, batch_stats) if batch_stats else contextlib.nullcontext()
    model.eval()
    with mode:
        for x, y in batches.epoch():
            if batch_stats:
                keep = len(y) - len(y) % batch_stats
                if keep == 0:
                    continue
                x, y = x[:keep], y[:keep]
            with autocast():
                logits = model(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
    loss_sum, correct, n = reduce_over_ranks(loss_sum, correct, seen.double())
    if n.item() == 0:
        return math.nan, math.nan
    return loss_sum.item() / n.item(), 100.0 * correct.item() / n.item()


def eval_batches_for(split: data.Split, batch_size: int, group: int | None, device, **shard) -> data.Batches:
    """Evaluation batches; for mini-batch statistics a whole number of groups of ``group`` images each,
    drawn in a fixed random order: the splits are stored sorted by class, and a group of one class
    would be normalized with that class's statistics (the class removed), unlike any training batch."""
    if group:
        batch_size = group * max(1, batch_size // group)
        order = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))
        split = split.take(order.to(split.x.device))
    return data.Batches(split, batch_size, device, train=False, **shard)


@contextlib.contextmanager
def rank0_buffers(model: torch.nn.Module):
    """The run's model is rank 0's (the one its checkpoint holds): in a data-parallel run the
    other ranks evaluate their shards with rank 0's running statistics, then take their own back."""
    if distributed.world_size() == 1:
        yield
        return
    own = [b.clone() for b in model.buffers()]
    for b in model.buffers():
        torch.distributed.broadcast(b, src=0)
    try:
        yield
    finally:
        with torch.no_grad():
            for b, mine in zip(model.buffers(), own):
                b.copy_(mine)


class EvaluationSuite:
    """The end-of-epoch evaluation of one run's model: its batches (test, validation, their groups
    for mini-batch statistics, the training slice), built once, and PreciseBN's; `evaluate` measures."""

    def __init__(self, cfg: DictConfig, ds: data.Dataset, model: torch.nn.Module, autocast, device, *, epochs: int,
                 memory_format: str, precise_source: data.Batches):
        self.model, self.autocast = model, autocast
        self.epochs, self.gap_every = epochs, int(cfg.gap_every)  # epochs: the run's passes (its budget's)
        # Training vs inference statistics (issue 12): batch-dependent norms only; their normalization batch.
        self.batch_dependent = identity.uses_batch_stats(cfg.norm)
        self.eval_stats = cfg.eval_stats if self.batch_dependent else "ema"
        self.stat_group = identity.normalization_batch(cfg)
        # Each rank evaluates its shard, in the run's memory format.
        shard = {"rank": distributed.rank(), "world_size": distributed.world_size(), "memory_format": memory_format}
        size = cfg.data.eval_batch_size
        self.test = data.Batches(ds.test, size, device, train=False, **shard)
        self.val = data.Batches(ds.val, size, device, train=False, **shard) if ds.val else None
        self.test_groups = self.val_groups = None  # for mini-batch statistics
        if self.batch_dependent:
            self.test_groups = eval_batches_for(ds.test, size, self.stat_group, device, **shard)
            self.val_groups = eval_batches_for(ds.val, size, self.stat_group, device, **shard) if ds.val else None
        self.train_slice = self._train_slice(cfg, ds, device, shard)
        # PreciseBN (eval_stats=precise): precise_batches training batches of its own (seeded apart from
        # the run's data order, so that order is not disturbed).
        self.precise_source, self.precise_batches = precise_source, cfg.precise_batches

    def _train_slice(self, cfg: DictConfig, ds: data.Dataset, device, shard: dict) -> data.Batches | None:
        """gap_train_images of the training set: fixed (seeded apart from the run's data order),
        class-balanced, no augmentation; None with gap_train_images=0."""
        n_slice = min(int(cfg.gap_train_images or 0), len(ds.train))
        if not n_slice:
            return None
        train_slice = ds.train
        if n_slice < len(ds.train):
            idx = data.balanced_indices(ds.train.y.cpu(), n_slice, torch.Generator().manual_seed(20_000 + cfg.seed))
            train_slice = ds.train.take(idx.to(ds.train.y.device))
        return eval_batches_for(train_slice, cfg.data.eval_batch_size, self.stat_group, device, **shard)

    def evaluate(self, epoch: int, frozen: bool) -> dict:
        """Evaluate after epoch (0-based) `epoch`: {test_loss, test_acc, val_loss, val_acc, *GAP_FIELDS}
        (None where not measured). PreciseBN first if asked, except in the FrozenBN tail (`frozen`):
        its population statistics stay as they are."""
        gap = dict.fromkeys(GAP_FIELDS)
        # The gap's extra passes cost about as much as the headline one: every gap_every epochs and the last.
        measure_gap = (epoch + 1) % self.gap_every == 0 or epoch + 1 == self.epochs
        if self.eval_stats == "precise" and not frozen:
            if measure_gap:
                with rank0_buffers(self.model):  # the running estimates (ema), before PreciseBN replaces them
                    gap["gap_test_ema_acc"] = evaluate(self.model, self.test, self.autocast)[1]
            self.precise_bn(epoch)
        with rank0_buffers(self.model):
            headline = self.headline()
            if measure_gap:
                gap.update(self.gap_accuracies(headline["test_acc"]))
        return {**headline, **gap}

    def headline(self) -> dict:
        """Test (and validation) loss and accuracy with the run's evaluation statistics."""
        group = self.stat_group if self.eval_stats == "batch" else None
        test_loss, test_acc = evaluate(self.model, self.test_groups if group else self.test, self.autocast, group)
        val_loss, val_acc = (None, None)
        if self.val:
            val_loss, val_acc = evaluate(self.model, self.val_groups if group else self.val, self.autocast, group)
        return {"test_loss": test_loss, "test_acc": test_acc, "val_loss": val_loss, "val_acc": val_acc}

    def precise_bn(self, epoch: int) -> None:
        """PreciseBN on batches of its own, running through as many of their epochs (from `epoch` on)
        as precise_batches needs."""
        stream = (x for e in itertools.count(epoch) for x, _ in self.precise_source.epoch(e))
        norms.precise_bn_update(self.model, stream, int(self.precise_batches))

    def gap_accuracies(self, test_acc: float) -> dict:
        """The train/inference gap's accuracies beside the headline test accuracy (the model's
        evaluation statistics): the test set with population and with mini-batch statistics, and the
        training slice with mini-batch statistics; one extra pass each where they differ."""
        gap = {}
        if self.batch_dependent:
            if self.eval_stats == "batch":
                gap["gap_test_batchstats_acc"] = test_acc
                popstats_acc = evaluate(self.model, self.test, self.autocast)[1]
                gap["gap_test_popstats_acc"] = gap["gap_test_ema_acc"] = popstats_acc
            else:
                gap["gap_test_popstats_acc"] = test_acc
                gap[f"gap_test_{self.eval_stats}_acc"] = test_acc
                gap["gap_test_batchstats_acc"] = evaluate(self.model, self.test_groups, self.autocast,
                                                          self.stat_group)[1]
        else:  # batch-independent: the same statistics either way
            gap["gap_test_batchstats_acc"] = gap["gap_test_popstats_acc"] = test_acc
        if self.train_slice is not None:
            gap["gap_train_batchstats_acc"] = evaluate(self.model, self.train_slice, self.autocast, self.stat_group)[1]
        return gap
