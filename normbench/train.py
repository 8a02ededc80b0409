"""One training run, top to bottom: data, model, optimizer, the loop, evaluation, checkpoints.

`train()` reads as the run goes: set up, resume, then epochs of `train_epoch` (the steps) and
`end_epoch` (evaluation, logging, checkpoint), then the summary. The run's mutable state lives
in one `RunState`, which is what a checkpoint saves besides the model, optimizer and schedule.

The loop keeps per-step values on the device and syncs with the host only every `log_every`
steps (train loss scalar, divergence check) and at epoch ends. TensorBoard's x axis is the
number of training images seen (one epoch = the training set's size), the same in every run
whatever its batch size.

Data-parallel (torchrun, SLURM: `distributed`): every rank builds the same Run; the model is
wrapped in DistributedDataParallel (gradients averaged), each rank trains on its slice of every
global batch and evaluates its shard of the test set, metrics are summed over the ranks in one
place (`reduce_over_ranks`), rank 0 alone writes files, and a checkpoint also holds what differs
between the ranks (running statistics, the epoch's sums), so every rank resumes exactly.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from normbench import checkpoint, data, distributed, identity, norms, summary
from normbench.errors import UserError
from normbench.models import build_model
from normbench.tracking import RunRecorder


# --------------------------------------------------------------------------- setup helpers


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name} but no CUDA GPU is available here; use device=auto or device=cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("device=mps but MPS is not available here; use device=auto or device=cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"device={name!r} is not a device name; use auto, cpu, cuda, cuda:N or mps") from None


def norm_options(cfg: DictConfig) -> dict:
    return {k: v for k, v in cfg.norm.items() if k != "name"}


def make_model(cfg: DictConfig) -> torch.nn.Module:
    try:
        return build_model(cfg.model.name, cfg.norm.name, num_classes=data.NUM_CLASSES,
                           model_options=identity.model_options(cfg.model), **norm_options(cfg))
    except (norms.NormConfigError, KeyError, ValueError) as e:
        raise UserError(f"cannot build {cfg.model.name} with norm={cfg.norm.name}: {e.args[0] if e.args else e}") from None


def _cosine(cfg, optimizer, total_steps: int, warmup: int):
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps - warmup, 1))
    if warmup <= 0:
        return cosine
    linear = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=cfg.sched.warmup_start_factor,
                                               total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [linear, cosine], milestones=[warmup])


def _onecycle(cfg, optimizer, total_steps: int, warmup: int):
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=optimizer.param_groups[0]["lr"], total_steps=total_steps,
        pct_start=max(warmup, 1) / total_steps, div_factor=1 / cfg.sched.warmup_start_factor, cycle_momentum=False)


# sched.name -> builder(cfg, optimizer, total_steps, warmup_steps); conf/sched/<name>.yaml holds its settings.
SCHEDULERS = {"cosine": _cosine, "onecycle": _onecycle}


def make_scheduler(cfg: DictConfig, optimizer, total_steps: int, steps_per_epoch: int):
    warmup = min(int(round(cfg.sched.warmup_epochs * steps_per_epoch)), total_steps - 1)
    return SCHEDULERS[cfg.sched.name](cfg, optimizer, total_steps, warmup)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def reduce_over_ranks(*values: torch.Tensor, op: str = "sum") -> list[torch.Tensor]:
    """Per-process 0-dim tensors combined over the ranks of a data-parallel run, their "sum" or
    "min" (the one place metrics are reduced); the values themselves in a single process."""
    if not distributed.is_initialized():
        return list(values)
    stacked = torch.stack([v.double() for v in values])
    torch.distributed.all_reduce(stacked, op={"sum": torch.distributed.ReduceOp.SUM,
                                              "min": torch.distributed.ReduceOp.MIN}[op])
    return list(stacked.unbind())


def data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model as the training step calls it: wrapped in DistributedDataParallel (gradients
    averaged over the ranks) in a data-parallel run, the model itself otherwise."""
    if not distributed.is_initialized():
        return model
    ddp = torch.nn.parallel.DistributedDataParallel
    # No buffer sync before each forward (broadcast_buffers=False; torch >= 2.13 calls it
    # forward_sync_buffers): each rank keeps the running statistics of its own batches, as separate
    # devices do without synchronized BN (norm.sync=true is what makes them agree). DDP's default
    # would copy rank 0's over them before every forward, which also changes Batch Renorm's training
    # forward (it corrects towards its running statistics). Evaluation uses rank 0's (Run.rank0_buffers).
    no_buffer_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters else "broadcast_buffers"
    return ddp(model, device_ids=[device.index] if device.type == "cuda" else None, **{no_buffer_sync: False})


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


# --------------------------------------------------------------------------- the run's state


def _accumulators(device) -> dict[str, torch.Tensor]:
    """Per-epoch sums kept on the device (no host sync per step)."""
    z = lambda dtype=torch.float32: torch.zeros((), device=device, dtype=dtype)  # noqa: E731
    return {"loss_sum": z(), "correct": z(torch.long), "seen": z(torch.long),
            "window_loss": z(), "window_n": z(torch.long), "first_bad_step": z(torch.long) - 1}


@dataclass
class RunState:
    """Everything about a run that changes as it trains, besides model, optimizer and schedule."""

    epoch: int = 0  # completed epochs
    batch_in_epoch: int = 0  # completed steps of the current epoch
    step: int = 0  # completed optimizer steps
    best_test_acc: float | None = None
    best_val_acc: float | None = None
    rows: list[dict] = field(default_factory=list)  # metrics.csv, one row per completed epoch
    elapsed_s: float = 0.0  # wall time of earlier attempts (before the checkpoint we resumed)
    train_s: float = 0.0  # training time of completed epochs (no evaluation)
    epoch_s: float = 0.0  # training time already spent in the current epoch by earlier attempts
    acc: dict[str, torch.Tensor] = field(default_factory=dict)  # _accumulators

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict, device) -> None:
        for key, value in state.items():
            setattr(self, key, value)
        self.acc = {k: v.to(device) for k, v in self.acc.items()}


# --------------------------------------------------------------------------- the run


class Run:
    """One run's objects (config, data, model, optimizer, schedule, recorder) and its state."""

    def __init__(self, cfg: DictConfig, run_dir: Path, log):
        self.cfg, self.run_dir, self.log = cfg, run_dir, log
        self.t_start = time.perf_counter()
        self.config = identity.run_config(cfg)
        self.fingerprint = identity.fingerprint(self.config)
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.device = device = resolve_device(cfg.device)
        if device.type == "cuda" and device.index is None and self.world > 1:
            self.device = device = torch.device("cuda", distributed.gpu_index())  # one GPU per process
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        use_amp = device.type == "cuda" if cfg.amp == "auto" else cfg.amp is True
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_amp else contextlib.nullcontext

        # Data: decoded once, cached; subsets drawn with a seed of their own.
        self.ds = ds = data.select(data.load_cifar10(cfg.data.root, cfg.data.cache_dir), cfg.data.subset,
                                   cfg.data.test_subset, cfg.data.val_split, cfg.seed).to(device)
        if cfg.batch_size * self.world > len(ds.train):
            on_devices = f" x {self.world} devices" if self.world > 1 else ""
            raise UserError(f"batch_size={cfg.batch_size}{on_devices} is larger than the training set ({len(ds.train)} "
                            "images); lower it or raise data.subset")
        self.train_batches = self.train_batches_from(cfg.seed)
        shard = {"rank": self.rank, "world_size": self.world}  # each rank evaluates its shard
        self.test_batches = data.Batches(ds.test, cfg.data.eval_batch_size, device, train=False, **shard)
        self.val_batches = data.Batches(ds.val, cfg.data.eval_batch_size, device, train=False, **shard) if ds.val else None
        # Training vs inference statistics (issue 12): batch-dependent norms only; their normalization batch.
        self.batch_dependent = identity.uses_batch_stats(cfg.norm)
        self.eval_stats = cfg.eval_stats if self.batch_dependent else "ema"
        self.stat_group = identity.run_identity(cfg)["norm_batch"] if self.batch_dependent else None
        eval_bs = cfg.data.eval_batch_size
        if self.batch_dependent:
            self.test_group_batches = eval_batches_for(ds.test, eval_bs, self.stat_group, device, **shard)
            self.val_group_batches = eval_batches_for(ds.val, eval_bs, self.stat_group, device, **shard) if ds.val else None
        n_slice = min(int(cfg.gap_train_images or 0), len(ds.train))
        self.train_slice_batches = None
        if n_slice:  # fixed (seeded apart from the run's data order), class-balanced, no augmentation
            train_slice = ds.train
            if n_slice < len(ds.train):
                idx = data.balanced_indices(ds.train.y.cpu(), n_slice, torch.Generator().manual_seed(20_000 + cfg.seed))
                train_slice = ds.train.take(idx.to(ds.train.y.device))
            self.train_slice_batches = eval_batches_for(train_slice, eval_bs, self.stat_group, device, **shard)
        self.steps_per_epoch = len(self.train_batches)
        self.total_steps = cfg.epochs * self.steps_per_epoch

        seed_everything(cfg.seed)
        self.model = model = make_model(cfg).to(device)
        norms.set_training_length(model, self.total_steps)
        self.train_model = data_parallel(model, device)
        if cfg.compile is True or (cfg.compile == "auto" and device.type == "cuda"):
            # The training forward only (evaluation stays eager: it runs a few times per run); the
            # parameters and buffers are the model's, so checkpoints and evaluation see the same state.
            self.train_model = torch.compile(self.train_model)
        if cfg.norm.get("sync") and self.world == 1:
            log("warning: norm.sync=true in a single process: statistics are this process's batch, as without sync")
        elif cfg.norm.get("sync") and cfg.norm.get("virtual_batch") is not None:
            log("warning: norm.sync=true has no effect with norm.virtual_batch: each virtual group keeps its own statistics")
        self.lr = identity.effective_lr(cfg)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=cfg.optim.momentum,
                                         nesterov=cfg.optim.nesterov and cfg.optim.momentum > 0,
                                         weight_decay=cfg.optim.weight_decay)
        self.scheduler = make_scheduler(cfg, self.optimizer, self.total_steps, self.steps_per_epoch)
        self.state = RunState(acc=_accumulators(device))
        self.ckpt_path = run_dir / checkpoint.CHECKPOINT_NAME
        self.recorder: RunRecorder | None = None
        # Plain ints for the hot loop (a DictConfig lookup costs microseconds every step).
        self.log_every, self.gap_every = int(cfg.log_every), int(cfg.stat_gap_every or 0)
        self.ckpt_every = int(cfg.ckpt_every or 0)
        # A host sync is free on the CPU; the divergence check of a data-parallel run is a collective.
        self.sync_every = 1 if device.type == "cpu" and self.world == 1 else self.log_every

    def train_batches_from(self, seed: int) -> data.Batches:
        cfg = self.cfg
        return data.Batches(self.ds.train, cfg.batch_size, self.device, train=True, seed=seed,
                            crop_padding=cfg.data.crop_padding, flip=cfg.data.flip, rank=self.rank, world_size=self.world)

    def images_seen(self, step: int) -> int:
        """TensorBoard's x axis: training images seen after `step` steps (one epoch = the training set)."""
        return step * len(self.ds.train) // self.steps_per_epoch

    # -- checkpoints ---------------------------------------------------------------------
    def resume(self) -> None:
        """Continue from the run folder's checkpoint, if there is a usable one (every rank reads it)."""
        self._load_checkpoint()
        if self.world > 1:
            step_of_rank0 = distributed.broadcast(self.state.step)
            if step_of_rank0 != self.state.step:
                raise RuntimeError(f"rank {self.rank} resumes at step {self.state.step}, rank 0 at step {step_of_rank0}: "
                                   "every rank must read the same checkpoint (put out_dir on a filesystem all nodes share)")

    def _load_checkpoint(self) -> None:
        if not self.ckpt_path.exists():
            return
        try:
            saved = checkpoint.load(self.ckpt_path, self.fingerprint)
        except checkpoint.BadCheckpoint as e:
            if self.cfg.on_bad_checkpoint == "stop":
                raise UserError(f"{e}; delete it to start over, or set on_bad_checkpoint=restart") from None
            self.log(f"warning: {e}; starting this run from scratch")
            if distributed.is_main():
                self.ckpt_path.unlink()
            return
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        checkpoint.set_rng_state(saved["rng"])
        self.state.load_state_dict(saved["run"], self.device)
        if self.world > 1:  # this rank's own running statistics and epoch sums
            own = saved["ranks"][self.rank]
            with torch.no_grad():
                for name, buffer in self.model.named_buffers():
                    buffer.copy_(own["buffers"][name])
            self.state.acc = {k: v.to(self.device) for k, v in own["acc"].items()}
        if saved["threads"] != torch.get_num_threads():
            self.log(f"warning: resuming with {torch.get_num_threads()} CPU threads, the checkpoint was written with "
                     f"{saved['threads']}: CPU results may differ from an uninterrupted run in the last digits")
        s = self.state
        self.log(f"resuming {self.cfg.run_name} from epoch {s.epoch} batch {s.batch_in_epoch} (step {s.step})")

    def rank_state(self) -> dict:
        """What differs between the ranks of a data-parallel run: the running statistics of their own
        batches (BN without sync) and their sums of the epoch so far."""
        return {"buffers": {name: b.detach().cpu() for name, b in self.model.named_buffers()},
                "acc": {k: v.cpu() for k, v in self.state.acc.items()}}

    def save_checkpoint(self, epoch_s_so_far: float = 0.0) -> None:
        rank_states = distributed.gather(self.rank_state()) if self.world > 1 else None  # every rank takes part
        if not distributed.is_main():  # rank 0 writes for everyone
            return
        run_state = self.state.state_dict()
        run_state["elapsed_s"] = self.state.elapsed_s + time.perf_counter() - self.t_start
        run_state["epoch_s"] = epoch_s_so_far
        checkpoint.save(self.ckpt_path, {
            "fingerprint": self.fingerprint, "describe": f"{self.cfg.model.name}/{self.cfg.norm.name}/bs{self.cfg.batch_size}",
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "rng": checkpoint.rng_state(), "run": run_state,
            "threads": torch.get_num_threads(),
            **({"ranks": rank_states} if rank_states else {}),
        })

    def start_recording(self) -> None:
        """Open the run's logs; a fresh start first clears what an abandoned attempt left."""
        run_dir, step = self.run_dir, self.state.step
        if distributed.is_main():  # the files are rank 0's
            # Every check has passed: an older summary.json (another config's) is no longer this run's.
            (run_dir / summary.SUMMARY_NAME).unlink(missing_ok=True)
            if step == 0:  # events and temp files of an abandoned attempt go
                for stale in [*run_dir.glob("events.out.tfevents.*"), *run_dir.glob(".*.tmp")]:
                    stale.unlink()
        # Events at the checkpoint's step were logged before it was written: keep them, drop later ones.
        self.recorder = RunRecorder(run_dir, purge_step=self.images_seen(step) + 1 if step else None)
        self.recorder.rows = list(self.state.rows)
        self.recorder.hparams({k: v for k, v in identity.run_identity(self.cfg).items()
                               if k not in ("run_name", "norm_batch")})

    def data_dependent_init(self) -> None:
        """WN with init=data (a no-op otherwise), on a fixed random batch, before the first step."""
        ds, cfg = self.ds, self.cfg
        n_init = min(len(ds.train), 256)
        n_init -= n_init % (cfg.norm.get("virtual_batch") or 1)  # mean-only BN may use ghost batches
        init_idx = torch.randperm(len(ds.train), generator=torch.Generator().manual_seed(cfg.seed))[:n_init]
        norms.data_dependent_init(self.model, self.train_batches.normalize(ds.train.x[init_idx.to(self.device)]))

    # -- one epoch of steps --------------------------------------------------------------
    def train_epoch(self, bar=None) -> int | None:
        """Train to the end of the current epoch; returns the first step with a non-finite loss, if any."""
        s, acc, model, recorder = self.state, self.state.acc, self.model, self.recorder
        model.train()
        if self.frozen_epoch(s.epoch):  # FrozenBN tail: population statistics, not updated
            norms.freeze_batch_stats(model)
        self._sync()
        t_epoch = time.perf_counter()
        for x, y in self.train_batches.epoch(s.epoch, start=s.batch_in_epoch):
            record_gaps = self.gap_every and s.step % self.gap_every == 0
            with self.autocast(), (norms.recording_batch_stats(model) if record_gaps else contextlib.nullcontext()):
                logits = self.train_model(x)
                loss = F.cross_entropy(logits.float(), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            # Everything below stays on the device: no host sync per step.
            loss_d = loss.detach()
            acc["first_bad_step"] = torch.where((acc["first_bad_step"] < 0) & ~torch.isfinite(loss_d),
                                                s.step, acc["first_bad_step"])
            acc["loss_sum"] += loss_d * len(y)
            acc["correct"] += (logits.detach().argmax(1) == y).sum()
            acc["seen"] += len(y)
            acc["window_loss"] += loss_d
            acc["window_n"] += 1
            s.step += 1
            s.batch_in_epoch += 1
            if bar is not None:
                bar.update(1)
            x_axis = self.images_seen(s.step)
            if record_gaps:
                self.log_stat_gaps(x_axis)
            if s.step % self.sync_every == 0:
                bad_step = self.diverged_at()
                if bad_step is not None:
                    return bad_step
            if s.step % self.log_every == 0:
                window_loss, window_n = reduce_over_ranks(acc["window_loss"], acc["window_n"])
                recorder.scalar("train/loss", window_loss / window_n, x_axis)
                recorder.scalar("lr", self.scheduler.get_last_lr()[0], x_axis)
                for tag, value in norms.schedule_scalars(model).items():
                    recorder.scalar(tag, value, x_axis)
                acc["window_loss"].zero_()
                acc["window_n"].zero_()
            if self.ckpt_every and s.step % self.ckpt_every == 0 and s.batch_in_epoch < self.steps_per_epoch:
                self.save_checkpoint(s.epoch_s + time.perf_counter() - t_epoch)
        self._sync()
        self.epoch_seconds = s.epoch_s + time.perf_counter() - t_epoch
        s.epoch_s = 0.0
        return self.diverged_at()

    def log_stat_gaps(self, x_axis: int) -> None:
        """BN train/eval statistic gaps of the step just taken, one host sync for all layers."""
        gaps = norms.batch_stat_gaps(self.model)
        if gaps:
            values = torch.stack([torch.stack(pair).float() for pair in gaps.values()]).tolist()
            for layer, (mean_gap, logvar_gap) in zip(gaps, values):
                self.recorder.scalar(f"bn_gap/mean/{layer}", mean_gap, x_axis)
                self.recorder.scalar(f"bn_gap/logvar/{layer}", logvar_gap, x_axis)

    def diverged_at(self) -> int | None:
        """The first step with a non-finite loss (on any rank: every rank stops at the same step), if any."""
        first_bad = self.state.acc["first_bad_step"].double()  # -1: none on this rank
        earliest = reduce_over_ranks(torch.where(first_bad < 0, math.inf, first_bad), op="min")[0].item()
        return int(earliest) if math.isfinite(earliest) else None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    # -- the end of an epoch -------------------------------------------------------------
    def frozen_epoch(self, epoch: int) -> bool:
        """Whether epoch (0-based) is in the FrozenBN tail (the last freeze_stats_epochs epochs)."""
        k = int(self.cfg.freeze_stats_epochs or 0) if self.batch_dependent else 0
        return k > 0 and epoch >= self.cfg.epochs - k

    def precise_bn(self) -> None:
        """PreciseBN on batches of their own (seeded apart, so the run's data order is not disturbed),
        running through as many of their epochs as precise_batches needs."""
        extra = self.train_batches_from(self.cfg.seed + 104729)
        n = int(self.cfg.precise_batches)
        stream = (x for e in itertools.count(self.state.epoch) for x, _ in extra.epoch(e))
        norms.precise_bn_update(self.model, stream, n)

    def end_epoch(self) -> None:
        """Evaluate (after PreciseBN, if asked), measure the train/inference statistics gap, log the
        epoch's row and scalars, checkpoint."""
        cfg, s, acc, recorder = self.cfg, self.state, self.state.acc, self.recorder
        gap = dict.fromkeys(summary.GAP_FIELDS)
        frozen = self.frozen_epoch(s.epoch)  # the epoch just trained: its population statistics stay as they are
        # The gap's extra evaluation passes cost about as much as the headline one: every gap_every epochs and the last
        measure_gap = (s.epoch + 1) % cfg.gap_every == 0 or s.epoch + 1 == cfg.epochs
        if self.eval_stats == "precise" and not frozen:
            if measure_gap:
                with self.rank0_buffers():  # the running estimates (ema), before PreciseBN replaces them
                    gap["gap_test_ema_acc"] = evaluate(self.model, self.test_batches, self.autocast)[1]
            self.precise_bn()
        group = self.stat_group if self.eval_stats == "batch" else None
        with self.rank0_buffers():
            test_loss, test_acc = evaluate(self.model, self.test_group_batches if group else self.test_batches,
                                           self.autocast, group)
            val_loss, val_acc = (None, None)
            if self.val_batches:
                val_loss, val_acc = evaluate(self.model, self.val_group_batches if group else self.val_batches,
                                             self.autocast, group)
            if measure_gap:
                gap.update(self.gap_accuracies(test_acc))
        s.epoch += 1
        loss_sum, correct, seen = reduce_over_ranks(acc["loss_sum"], acc["correct"], acc["seen"])
        seen = seen.item()
        row = {"epoch": s.epoch, "step": s.step, "train_loss": loss_sum.item() / seen,
               "train_acc": 100.0 * correct.item() / seen, "test_loss": test_loss, "test_acc": test_acc,
               "val_loss": val_loss, "val_acc": val_acc, "lr": self.scheduler.get_last_lr()[0],
               "seconds": round(self.epoch_seconds, 3), **gap}
        s.train_s += self.epoch_seconds
        s.best_test_acc = max(s.best_test_acc if s.best_test_acc is not None else -1.0, test_acc)
        if val_acc is not None:
            s.best_val_acc = max(s.best_val_acc or 0.0, val_acc)
        x_axis = self.images_seen(s.step)
        for tag, key in (("train/loss_epoch", "train_loss"), ("train/acc", "train_acc"), ("test/loss", "test_loss"),
                         ("test/acc", "test_acc"), ("val/loss", "val_loss"), ("val/acc", "val_acc")):
            if row[key] is not None:
                recorder.scalar(tag, row[key], x_axis)
        for key, value in gap.items():
            if value is not None and math.isfinite(value):
                recorder.scalar(key.replace("gap_", "gap/", 1), value, x_axis)
        recorder.scalar("perf/images_per_s", self.steps_per_epoch * self.global_batch / self.epoch_seconds, x_axis)
        recorder.scalar("perf/seconds_per_epoch", self.epoch_seconds, x_axis)
        recorder.epoch_row(row)
        s.rows = list(recorder.rows)
        self.log(f"{cfg.run_name} epoch {s.epoch}/{cfg.epochs}: train loss {row['train_loss']:.4f} "
                 f"acc {row['train_acc']:.2f}% | test loss {test_loss:.4f} acc {test_acc:.2f}% | {self.epoch_seconds:.1f}s")
        s.batch_in_epoch = 0
        acc.update({k: torch.zeros_like(acc[k]) for k in ("loss_sum", "correct", "seen")})
        self.save_checkpoint()

    def gap_accuracies(self, test_acc: float) -> dict:
        """The train/inference gap's accuracies beside the headline test accuracy (the model's
        evaluation statistics): the test set with population and with mini-batch statistics, and the
        training slice with mini-batch statistics; one extra pass each where they differ."""
        gap = {}
        if self.batch_dependent:
            if self.eval_stats == "batch":
                gap["gap_test_batchstats_acc"] = test_acc
                gap["gap_test_popstats_acc"] = gap["gap_test_ema_acc"] = evaluate(
                    self.model, self.test_batches, self.autocast)[1]
            else:
                gap["gap_test_popstats_acc"] = test_acc
                gap[f"gap_test_{self.eval_stats}_acc"] = test_acc
                gap["gap_test_batchstats_acc"] = evaluate(self.model, self.test_group_batches, self.autocast,
                                                          self.stat_group)[1]
        else:  # batch-independent: the same statistics either way
            gap["gap_test_batchstats_acc"] = gap["gap_test_popstats_acc"] = test_acc
        if self.train_slice_batches is not None:
            gap["gap_train_batchstats_acc"] = evaluate(self.model, self.train_slice_batches, self.autocast,
                                                       self.stat_group)[1]
        return gap

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.world

    @contextlib.contextmanager
    def rank0_buffers(self):
        """The run's model is rank 0's (the one its checkpoint holds): in a data-parallel run the
        other ranks evaluate their shards with rank 0's running statistics, then take their own back."""
        if self.world == 1:
            yield
            return
        own = [b.clone() for b in self.model.buffers()]
        for b in self.model.buffers():
            torch.distributed.broadcast(b, src=0)
        try:
            yield
        finally:
            with torch.no_grad():
                for b, mine in zip(self.model.buffers(), own):
                    b.copy_(mine)

    # -- the end of the run --------------------------------------------------------------
    def finish(self, status: str, diverged_step: int | None = None) -> dict:
        """Write summary.json (last: it marks the run finished) and return it."""
        s, cfg = self.state, self.cfg
        if status == summary.DIVERGED:
            self.log(f"diverged: non-finite loss at step {diverged_step}; the run stops here")
        else:
            self.recorder.scalar("summary/best_test_acc", s.best_test_acc, self.images_seen(s.step))
        last = s.rows[-1] if s.rows else {}
        images = len(s.rows) * self.steps_per_epoch * self.global_batch
        record = summary.new(
            identity.run_identity(cfg), status,
            reason=f"non-finite loss at step {diverged_step}" if status == summary.DIVERGED else None,
            epochs_done=len(s.rows), steps_done=s.step, test_acc=last.get("test_acc"), best_test_acc=s.best_test_acc,
            test_loss=last.get("test_loss"), train_loss=last.get("train_loss"), train_acc=last.get("train_acc"),
            val_acc=last.get("val_acc"), best_val_acc=s.best_val_acc,
            wall_time_s=round(s.elapsed_s + time.perf_counter() - self.t_start, 3),
            seconds_per_epoch=round(s.train_s / len(s.rows), 3) if s.rows else None,
            images_per_s=round(images / s.train_s, 1) if s.train_s > 0 and images else None,
            **{key: last.get(key) for key in summary.GAP_FIELDS},
            diverged_step=diverged_step, train_size=len(self.ds.train), test_size=len(self.ds.test),
            val_size=len(self.ds.val) if self.ds.val else 0, device=str(self.device), fingerprint=self.fingerprint,
            config=self.config)
        self.recorder.summary(record)
        return record


def train(cfg: DictConfig, run_dir: str | Path, *, progress: bool = False, log=print) -> dict:
    """Train one run in `run_dir` (resuming from its checkpoint if any) and return its summary.
    In a data-parallel run every rank calls it; rank 0 alone logs and writes."""
    if not distributed.is_main():
        log, progress = (lambda *args, **kwargs: None), False
    run = Run(cfg, Path(run_dir), log)
    run.resume()
    run.start_recording()
    if run.state.step == 0:
        run.data_dependent_init()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=run.total_steps, initial=run.state.step, desc=cfg.run_name, leave=False, dynamic_ncols=True)
    try:
        while run.state.epoch < cfg.epochs:
            bad_step = run.train_epoch(bar)
            if bad_step is not None:
                return run.finish(summary.DIVERGED, diverged_step=bad_step)
            run.end_epoch()
        return run.finish(summary.COMPLETED)
    finally:
        if bar is not None:
            bar.close()
        run.recorder.close()

