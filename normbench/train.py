"""One training run, top to bottom: data, model, optimizer, the loop, evaluation, checkpoints.

`train()` reads as the run goes: set up (`Run`, from the builders below), resume, then epochs of
`train_epoch` (the steps) and `end_epoch` (evaluate, record, checkpoint), then the summary. What is
measured at an epoch's end is one unit of its own (`evaluation.EvaluationSuite`). The run's mutable
state lives in one `RunState`, which is what a checkpoint saves besides the model, optimizer and
schedule.

The loop keeps per-step values on the device and syncs with the host only every `log_every`
steps (train loss scalar, divergence check) and at epoch ends. TensorBoard's x axis is the
number of training images seen (one epoch = the training set's size), the same in every run
whatever its batch size.

Data-parallel (torchrun, SLURM: `distributed`): every rank builds the same Run; the model is
wrapped in DistributedDataParallel (gradients averaged), each rank trains on its slice of every
global batch and evaluates its shard of the test set, metrics are summed over the ranks in one
place (`evaluation.reduce_over_ranks`), rank 0 alone writes files, and a checkpoint also holds what
differs between the ranks (running statistics, the epoch's sums), so every rank resumes exactly.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from normbench import budget, checkpoint, data, distributed, identity, models, norms, summary, tracking
from normbench.device import resolve_device, torch_memory_format, uses_compile
from normbench.errors import UserError
from normbench.evaluation import EvaluationSuite, reduce_over_ranks
from normbench.tracking import RunRecorder

# PreciseBN's batches are drawn with the run's seed plus this: apart from the run's data order.
PRECISE_BN_SEED_OFFSET = 104729


# --------------------------------------------------------------------------- setup: the builders


def run_device(name: str, world: int) -> torch.device:
    """The device asked for (``device.resolve_device``); on CUDA a data-parallel run takes one GPU per process."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None and world > 1:
        device = torch.device("cuda", distributed.gpu_index())
    return device


def autocast_for(bf16: bool, device: torch.device):
    """A context-manager factory for the forward passes: bf16 autocast where the run uses it (its
    recorded, resolved `amp`), a no-op otherwise."""
    if bf16:
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def build_data(cfg: DictConfig, device: torch.device, world: int) -> data.Dataset:
    """The run's splits on its device: decoded once and cached, subsets drawn with a seed of their own."""
    ds = data.select(data.load_cifar10(cfg.data.root, cfg.data.cache_dir), cfg.data.subset,
                     cfg.data.test_subset, cfg.data.val_split, cfg.seed).to(device)
    if cfg.batch_size * world > len(ds.train):
        on_devices = f" x {world} devices" if world > 1 else ""
        raise UserError(f"batch_size={cfg.batch_size}{on_devices} is larger than the training set ({len(ds.train)} "
                        "images); lower it or raise data.subset")
    return ds


def training_batches(cfg: DictConfig, ds: data.Dataset, device: torch.device, seed: int,
                     memory_format: str) -> data.Batches:
    """Augmented training batches in the order of `seed` (this rank's slice of each global batch)."""
    return data.Batches(ds.train, cfg.batch_size, device, train=True, seed=seed, crop_padding=cfg.data.crop_padding,
                        flip=cfg.data.flip, rank=distributed.rank(), world_size=distributed.world_size(),
                        memory_format=memory_format)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
    # forward (it corrects towards its running statistics). Evaluation uses rank 0's (evaluation.rank0_buffers).
    no_buffer_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters else "broadcast_buffers"
    return ddp(model, device_ids=[device.index] if device.type == "cuda" else None, **{no_buffer_sync: False})


def build_model(cfg: DictConfig, device: torch.device, total_steps: int, memory_format: str,
                log) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The run's model (its initial weights the seed's) on its device in its memory format, and what the
    training step calls: the model in DDP in a data-parallel run, compiled where the run compiles
    (``device.uses_compile``)."""
    seed_everything(cfg.seed)
    model = models.build_from_config(cfg).to(device, memory_format=torch_memory_format(memory_format))
    norms.set_training_length(model, total_steps)
    train_model = data_parallel(model, device)
    if uses_compile(cfg.compile, device.type):
        # The training forward only (evaluation stays eager: it runs a few times per run); the
        # parameters and buffers are the model's, so checkpoints and evaluation see the same state.
        norms.before_compile()
        train_model = torch.compile(train_model)
    if cfg.norm.get("sync") and distributed.world_size() == 1:
        log("warning: norm.sync=true in a single process: statistics are this process's batch, as without sync")
    elif cfg.norm.get("sync") and cfg.norm.get("virtual_batch") is not None:
        log("warning: norm.sync=true has no effect with norm.virtual_batch: each virtual group keeps its own statistics")
    return model, train_model


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


def build_optimizer_and_schedule(cfg: DictConfig, model: torch.nn.Module, total_steps: int, steps_per_epoch: int):
    """SGD at the effective lr (the base lr scaled with the global batch), and its per-step schedule."""
    optimizer = torch.optim.SGD(model.parameters(), lr=identity.effective_lr(cfg), momentum=cfg.optim.momentum,
                                nesterov=cfg.optim.nesterov and cfg.optim.momentum > 0,
                                weight_decay=cfg.optim.weight_decay,
                                # One multi-tensor update instead of a Python loop over parameters: the same
                                # values bit for bit (torch's default on a GPU), a third faster on a CPU.
                                foreach=True)
    warmup = min(int(round(cfg.sched.warmup_epochs * steps_per_epoch)), total_steps - 1)
    return optimizer, SCHEDULERS[cfg.sched.name](cfg, optimizer, total_steps, warmup)


# --------------------------------------------------------------------------- the run's state


def new_sums(device) -> dict[str, torch.Tensor]:
    """The sums the steps add to, kept on the device (no host sync per step): the epoch's loss,
    correct and seen images, the log window's loss and steps, and the first step whose loss was
    not finite (-1: none yet)."""
    z = lambda dtype=torch.float32: torch.zeros((), device=device, dtype=dtype)  # noqa: E731
    return {"loss": z(), "correct": z(torch.long), "seen": z(torch.long),
            "window_loss": z(), "window_steps": z(torch.long), "first_bad_step": z(torch.long) - 1}


EPOCH_SUMS = ("loss", "correct", "seen")  # the sums that start again at each epoch


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
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # new_sums

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict, device) -> None:
        for key, value in state.items():
            setattr(self, key, value)
        self.sums = {k: v.to(device) for k, v in self.sums.items()}


# --------------------------------------------------------------------------- the run


class Run:
    """One run's objects (config, data, model, optimizer, schedule, evaluation suite, recorder) and its state."""

    def __init__(self, cfg: DictConfig, run_dir: Path, log):
        self.cfg, self.run_dir, self.log = cfg, run_dir, log
        self.t_start = time.perf_counter()
        self.config = identity.run_config(cfg)
        self.fingerprint = identity.fingerprint(self.config)
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.device = run_device(cfg.device, self.world)
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        # Precision and memory format as the run's identity records them (resolved from auto).
        self.autocast = autocast_for(self.config["amp"], self.device)
        layout = self.config["memory_format"]
        self.ds = build_data(cfg, self.device, self.world)
        self.train_batches = training_batches(cfg, self.ds, self.device, cfg.seed, layout)
        self.steps_per_epoch = len(self.train_batches)
        # The budget (epochs, steps or images) as optimizer steps, in `passes` epochs, the last one possibly cut short.
        self.total_steps = budget.total_steps(cfg, self.steps_per_epoch, self.global_batch)
        self.passes = budget.passes(self.total_steps, self.steps_per_epoch)
        if int(cfg.freeze_stats_epochs or 0) > self.passes:
            raise UserError(f"freeze_stats_epochs={cfg.freeze_stats_epochs} is more than the run's {self.passes} "
                            f"epochs ({budget.unit(cfg)} budget of {budget.length(cfg)}); use at most that")
        self.model, self.train_model = build_model(cfg, self.device, self.total_steps, layout, log)
        self.optimizer, self.scheduler = build_optimizer_and_schedule(cfg, self.model, self.total_steps,
                                                                      self.steps_per_epoch)
        self.evaluation = EvaluationSuite(
            cfg, self.ds, self.model, self.autocast, self.device, epochs=self.passes, memory_format=layout,
            precise_source=training_batches(cfg, self.ds, self.device, cfg.seed + PRECISE_BN_SEED_OFFSET, layout))
        self.state = RunState(sums=new_sums(self.device))
        self.ckpt_path = run_dir / checkpoint.CHECKPOINT_NAME
        self.recorder: RunRecorder | None = None
        # Plain ints for the hot loop (a DictConfig lookup costs microseconds every step); more often in a short run.
        self.log_every, self.stat_gap_every = (tracking.curve_every(k, self.total_steps) for k in (cfg.log_every, cfg.stat_gap_every))
        self.ckpt_every = int(cfg.ckpt_every or 0)
        # A host sync is free on the CPU; the divergence check of a data-parallel run is a collective.
        self.sync_every = 1 if self.device.type == "cpu" and self.world == 1 else int(cfg.log_every)

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.world

    def images_seen(self, step: int) -> int:
        """TensorBoard's x axis: training images seen after `step` steps (one epoch = the training set)."""
        return step * len(self.ds.train) // self.steps_per_epoch

    def frozen_epoch(self, epoch: int) -> bool:
        """Whether epoch (0-based) is in the FrozenBN tail (the last freeze_stats_epochs epochs)."""
        k = int(self.cfg.freeze_stats_epochs or 0) if self.evaluation.batch_dependent else 0
        return k > 0 and epoch >= self.passes - k

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
            self.state.sums = {k: v.to(self.device) for k, v in own["sums"].items()}
        if saved["threads"] != torch.get_num_threads():
            self.log(f"warning: resuming with {torch.get_num_threads()} CPU threads, the checkpoint was written with "
                     f"{saved['threads']}: CPU results may differ from an uninterrupted run in the last digits")
        s = self.state
        self.log(f"resuming {self.cfg.run_name} from epoch {s.epoch} batch {s.batch_in_epoch} (step {s.step})")

    def rank_state(self) -> dict:
        """What differs between the ranks of a data-parallel run: the running statistics of their own
        batches (BN without sync) and their sums of the epoch so far."""
        return {"buffers": {name: b.detach().cpu() for name, b in self.model.named_buffers()},
                "sums": {k: v.cpu() for k, v in self.state.sums.items()}}

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
        self.recorder = RunRecorder(run_dir, purge_step=self.images_seen(step) + 1 if step else None, epochs=self.passes)
        self.recorder.rows = list(self.state.rows)
        if step == 0:  # a resumed attempt keeps the first one's
            self.recorder.dashboards(identity.run_identity(self.cfg))

    def data_dependent_init(self) -> None:
        """WN with init=data (a no-op otherwise), on a fixed random batch, before the first step."""
        ds, cfg = self.ds, self.cfg
        n_init = min(len(ds.train), 256)
        n_init -= n_init % (cfg.norm.get("virtual_batch") or 1)  # mean-only BN may use ghost batches
        init_idx = torch.randperm(len(ds.train), generator=torch.Generator().manual_seed(cfg.seed))[:n_init]
        norms.data_dependent_init(self.model, self.train_batches.normalize(ds.train.x[init_idx.to(self.device)]))

    # -- one epoch of steps --------------------------------------------------------------
    def steps_in_epoch(self, epoch: int) -> int:
        """The steps of epoch (0-based) `epoch`: all of a pass, less in a last pass that the budget cuts short."""
        return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)

    def train_epoch(self, bar=None) -> int | None:
        """Train to the end of the current epoch (or of the budget); returns the first step with a non-finite
        loss, if any."""
        s = self.state
        self.model.train()
        if self.frozen_epoch(s.epoch):  # FrozenBN tail: population statistics, not updated
            norms.freeze_batch_stats(self.model)
        self._sync()
        t_epoch = time.perf_counter()
        epoch_steps = self.steps_in_epoch(s.epoch)
        for x, y in self.train_batches.epoch(s.epoch, start=s.batch_in_epoch, stop=epoch_steps):
            record_gaps = self.stat_gap_every and s.step % self.stat_gap_every == 0
            self.train_step(x, y, record_gaps)
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
            if self.log_every and s.step % self.log_every == 0:
                self.log_train_window(x_axis)
            if self.ckpt_every and s.step % self.ckpt_every == 0 and s.batch_in_epoch < epoch_steps:
                self.save_checkpoint(s.epoch_s + time.perf_counter() - t_epoch)
        self._sync()
        self.epoch_seconds = s.epoch_s + time.perf_counter() - t_epoch
        s.epoch_s = 0.0
        return self.diverged_at()

    def train_step(self, x: torch.Tensor, y: torch.Tensor, record_gaps: bool) -> None:
        """One optimizer step (step `state.step`); its loss and accuracy go to the sums, on the device."""
        sums = self.state.sums
        with self.autocast(), (norms.recording_batch_stats(self.model) if record_gaps else contextlib.nullcontext()):
            logits = self.train_model(x)
            loss = F.cross_entropy(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        # Everything below stays on the device: no host sync per step.
        loss = loss.detach()
        sums["first_bad_step"] = torch.where((sums["first_bad_step"] < 0) & ~torch.isfinite(loss),
                                             self.state.step, sums["first_bad_step"])
        sums["loss"] += loss * len(y)
        sums["correct"] += (logits.detach().argmax(1) == y).sum()
        sums["seen"] += len(y)
        sums["window_loss"] += loss
        sums["window_steps"] += 1

    def log_train_window(self, x_axis: int) -> None:
        """The mean training loss of the steps since the last call, the lr and the norms' schedules."""
        sums = self.state.sums
        window_loss, window_steps = reduce_over_ranks(sums["window_loss"], sums["window_steps"])
        self.recorder.scalar(tracking.TRAIN_LOSS_TAG, window_loss / window_steps, x_axis)
        self.recorder.scalar(tracking.LR_TAG, self.scheduler.get_last_lr()[0], x_axis)
        for name, value in norms.schedule_scalars(self.model).items():
            self.recorder.scalar(tracking.diagnostic_tag(name), value, x_axis)
        sums["window_loss"].zero_()
        sums["window_steps"].zero_()

    def log_stat_gaps(self, x_axis: int) -> None:
        """BN train/eval statistic gaps of the step just taken, one host sync for all layers."""
        gaps = norms.batch_stat_gaps(self.model)
        if gaps:
            values = torch.stack([torch.stack(pair).float() for pair in gaps.values()]).tolist()
            for layer, layer_values in zip(gaps, values):
                for tag, value in zip(tracking.BN_GAP_TAGS, layer_values):
                    self.recorder.scalar(tag.format(layer=layer), value, x_axis)

    def diverged_at(self) -> int | None:
        """The first step with a non-finite loss (on any rank: every rank stops at the same step), if any."""
        first_bad = self.state.sums["first_bad_step"].double()  # -1: none on this rank
        earliest = reduce_over_ranks(torch.where(first_bad < 0, math.inf, first_bad), op="min")[0].item()
        return int(earliest) if math.isfinite(earliest) else None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    # -- the end of an epoch -------------------------------------------------------------
    def end_epoch(self) -> None:
        """Evaluate, record the epoch (metrics.csv, TensorBoard, console), checkpoint."""
        s = self.state
        evaluation = self.evaluation.evaluate(s.epoch, frozen=self.frozen_epoch(s.epoch))
        s.epoch += 1
        self.record_epoch(evaluation)
        s.batch_in_epoch = 0
        s.sums.update({k: torch.zeros_like(s.sums[k]) for k in EPOCH_SUMS})
        self.save_checkpoint()

    def record_epoch(self, evaluation: dict) -> None:
        """The epoch's row (its training sums reduced over the ranks, beside its evaluation), the run's
        best accuracies, the row's scalars and the console line."""
        s = self.state
        loss, correct, seen = reduce_over_ranks(*(s.sums[k] for k in EPOCH_SUMS))
        seen = seen.item()
        row = {"epoch": s.epoch, "step": s.step, "train_loss": loss.item() / seen,
               "train_acc": 100.0 * correct.item() / seen, **evaluation, "lr": self.scheduler.get_last_lr()[0],
               "seconds": round(self.epoch_seconds, 3)}
        s.train_s += self.epoch_seconds
        s.best_test_acc = max(s.best_test_acc if s.best_test_acc is not None else -1.0, row["test_acc"])
        if row["val_acc"] is not None:
            s.best_val_acc = max(s.best_val_acc or 0.0, row["val_acc"])
        x_axis = self.images_seen(s.step)
        self.recorder.epoch_scalars(row, x_axis)
        images_per_s = self.steps_in_epoch(s.epoch - 1) * self.global_batch / self.epoch_seconds
        self.recorder.epoch_diagnostics({tracking.IMAGES_PER_S_TAG: images_per_s,
                                         tracking.SECONDS_PER_EPOCH_TAG: self.epoch_seconds}, x_axis)
        self.recorder.epoch_row(row)
        s.rows = list(self.recorder.rows)
        self.log(f"{self.cfg.run_name} epoch {s.epoch}/{self.passes}: train loss {row['train_loss']:.4f} "
                 f"acc {row['train_acc']:.2f}% | test loss {row['test_loss']:.4f} acc {row['test_acc']:.2f}% | "
                 f"{self.epoch_seconds:.1f}s")

    # -- the end of the run --------------------------------------------------------------
    def finish(self, status: str, diverged_step: int | None = None) -> dict:
        """Write summary.json (last: it marks the run finished) and return it."""
        s = self.state
        if status == summary.DIVERGED:
            self.log(f"diverged: non-finite loss at step {diverged_step}; the run stops here")
        else:
            self.recorder.scalar(tracking.BEST_TEST_ACC_TAG, s.best_test_acc, self.images_seen(s.step))
        last = s.rows[-1] if s.rows else {}
        images = s.step * self.global_batch if s.rows else 0
        record = summary.new(
            identity.run_identity(self.cfg), status,
            reason=f"non-finite loss at step {diverged_step}" if status == summary.DIVERGED else None,
            epochs_done=len(s.rows), steps_done=s.step, best_test_acc=s.best_test_acc, best_val_acc=s.best_val_acc,
            **{key: last.get(key) for key in tracking.LAST_EPOCH_FIELDS},
            wall_time_s=round(s.elapsed_s + time.perf_counter() - self.t_start, 3),
            seconds_per_epoch=round(s.train_s / len(s.rows), 3) if s.rows else None,
            images_per_s=round(images / s.train_s, 1) if s.train_s > 0 and images else None,
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
        while run.state.epoch < run.passes:
            bad_step = run.train_epoch(bar)
            if bad_step is not None:
                return run.finish(summary.DIVERGED, diverged_step=bad_step)
            run.end_epoch()
        return run.finish(summary.COMPLETED)
    finally:
        if bar is not None:
            bar.close()
        run.recorder.close()
