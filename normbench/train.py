"""One training run, top to bottom: data, model, optimizer, the loop, evaluation, checkpoints.

The loop keeps per-step values on the device and syncs with the host only every `log_every`
steps (train loss scalar, divergence check) and at epoch ends.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from normbench import checkpoint, data, norms
from normbench.errors import UserError
from normbench.models import build_model
from normbench.tracking import SUMMARY_NAME, RunRecorder


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


def scaled_lr(cfg: DictConfig) -> float:
    ratio = cfg.batch_size / cfg.optim.ref_batch
    rule = cfg.optim.lr_scaling
    return cfg.lr * {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[rule]


def norm_options(cfg: DictConfig) -> dict:
    return {k: v for k, v in OmegaConf.to_container(cfg.norm, resolve=True).items() if k != "name"}


def model_options(cfg: DictConfig) -> dict:
    opts = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "name"}
    if opts.get("placement") == "before" and cfg.model.name != "cnn":
        opts.pop("placement")  # the ResNets have one placement only
    return opts


def uses_batch_stats(norm: DictConfig) -> bool:
    """Whether the norm config (cfg.norm) normalizes with batch statistics."""
    options = {k: v for k, v in norm.items() if k != "name"}
    try:
        return norms.is_batch_dependent(norm.name, **options)
    except norms.NormConfigError:
        return True  # a bad option is reported by validation, not here


def norm_label(norm: DictConfig) -> str:
    """The norm's name plus its options that differ from the registry defaults, e.g. gn-groups16.
    (The virtual batch is shown with the batch size instead.)"""
    defaults = norms.NORMS[norm.name].options if norm.name in norms.NORMS else {}
    changed = [f"{k.replace('_', '')}{v}" for k, v in sorted(norm.items())
               if k not in ("name", "virtual_batch") and v is not None and k in defaults and v != defaults[k]]
    return "-".join([norm.name, *changed])


def effective_virtual_batch(cfg: DictConfig) -> int | None:
    """The virtual batch if the norm uses batch statistics, else None (batch-independent norms ignore it)."""
    vb = cfg.norm.get("virtual_batch")
    return vb if vb is not None and uses_batch_stats(cfg.norm) else None


def run_config(cfg: DictConfig) -> dict:
    """The resolved config as the run's identity: what its fingerprint hashes and summary.json records."""
    config = OmegaConf.to_container(cfg, resolve=True)
    config["norm"]["virtual_batch"] = effective_virtual_batch(cfg)
    return config


def run_identity(cfg: DictConfig) -> dict:
    """What identifies a run in summary.json (completed, diverged or failed alike)."""
    vb = effective_virtual_batch(cfg)
    batch_dependent = uses_batch_stats(cfg.norm)
    return {"run_name": cfg.run_name, "model": cfg.model.name, "norm": cfg.norm.name, "norm_label": norm_label(cfg.norm),
            "placement": cfg.model.placement, "batch_size": cfg.batch_size, "virtual_batch": vb,
            "norm_batch": (vb or cfg.batch_size) if batch_dependent else None,
            "lr": cfg.lr, "seed": cfg.seed, "epochs": cfg.epochs}


def make_model(cfg: DictConfig) -> torch.nn.Module:
    try:
        return build_model(cfg.model.name, cfg.norm.name, num_classes=data.NUM_CLASSES,
                           model_options=model_options(cfg), **norm_options(cfg))
    except (norms.NormConfigError, KeyError, ValueError) as e:
        raise UserError(f"cannot build {cfg.model.name} with norm={cfg.norm.name}: {e.args[0] if e.args else e}") from None


def make_scheduler(cfg: DictConfig, optimizer, total_steps: int, steps_per_epoch: int):
    warmup = min(int(round(cfg.sched.warmup_epochs * steps_per_epoch)), total_steps - 1)
    if cfg.sched.name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=optimizer.param_groups[0]["lr"], total_steps=total_steps,
            pct_start=max(warmup, 1) / total_steps, div_factor=1 / cfg.sched.warmup_start_factor,
            cycle_momentum=False)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps - warmup, 1))
    if warmup <= 0:
        return cosine
    linear = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=cfg.sched.warmup_start_factor,
                                               total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [linear, cosine], milestones=[warmup])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(model, batches: data.Batches, autocast) -> tuple[float, float]:
    """Mean loss and accuracy (%) over a whole split, in eval mode; one host sync."""
    model.eval()
    loss_sum = torch.zeros((), device=batches.device)
    correct = torch.zeros((), device=batches.device, dtype=torch.long)
    for x, y in batches.epoch():
        with autocast():
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    n = len(batches.split)
    return loss_sum.item() / n, 100.0 * correct.item() / n


# --------------------------------------------------------------------------- the run


def train(cfg: DictConfig, run_dir: str | Path, *, progress: bool = False, log=print) -> dict:
    """Train one run in `run_dir` (resuming from its checkpoint if any) and return its summary."""
    run_dir = Path(run_dir)
    t_start = time.perf_counter()
    config = run_config(cfg)
    fp = checkpoint.fingerprint(config)
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    use_amp = device.type == "cuda" if cfg.amp == "auto" else cfg.amp is True
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_amp else contextlib.nullcontext

    # Data: decoded once, cached; subsets drawn with a seed of their own.
    ds = data.select(data.load_cifar10(cfg.data.root, cfg.data.cache_dir), cfg.data.subset,
                     cfg.data.test_subset, cfg.data.val_split, cfg.seed).to(device)
    if cfg.batch_size > len(ds.train):
        raise UserError(f"batch_size={cfg.batch_size} is larger than the training set ({len(ds.train)} images); lower it or raise data.subset")
    train_batches = data.Batches(ds.train, cfg.batch_size, device, train=True, seed=cfg.seed,
                                 crop_padding=cfg.data.crop_padding, flip=cfg.data.flip)
    test_batches = data.Batches(ds.test, cfg.data.eval_batch_size, device, train=False)
    val_batches = data.Batches(ds.val, cfg.data.eval_batch_size, device, train=False) if ds.val else None

    seed_everything(cfg.seed)
    model = make_model(cfg).to(device)
    lr = scaled_lr(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.optim.momentum,
                                nesterov=cfg.optim.nesterov and cfg.optim.momentum > 0,
                                weight_decay=cfg.optim.weight_decay)
    steps_per_epoch = len(train_batches)
    total_steps = cfg.epochs * steps_per_epoch
    scheduler = make_scheduler(cfg, optimizer, total_steps, steps_per_epoch)

    # Resume: the checkpoint says how many epochs and batches are done.
    epoch, batch_in_epoch, step, best_test_acc, best_val_acc, elapsed_before = 0, 0, 0, -1.0, None, 0.0
    train_seconds_before, rows, epoch_seconds_before = 0.0, [], 0.0
    acc_state = None
    ckpt_path = run_dir / checkpoint.CHECKPOINT_NAME
    if ckpt_path.exists():
        try:
            state = checkpoint.load(ckpt_path, fp)
        except checkpoint.BadCheckpoint as e:
            if cfg.on_bad_checkpoint == "stop":
                raise UserError(f"{e}; delete it to start over, or set on_bad_checkpoint=restart") from None
            log(f"warning: {e}; starting this run from scratch")
            ckpt_path.unlink()
        else:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            checkpoint.set_rng_state(state["rng"])
            epoch, batch_in_epoch, step = state["epoch"], state["batch_in_epoch"], state["step"]
            best_test_acc, best_val_acc = state["best_test_acc"], state["best_val_acc"]
            elapsed_before, train_seconds_before, rows = state["elapsed"], state["train_seconds"], state["rows"]
            acc_state = state["accumulators"]
            epoch_seconds_before = state.get("epoch_seconds", 0.0)
            if state.get("threads", torch.get_num_threads()) != torch.get_num_threads():
                log(f"warning: resuming with {torch.get_num_threads()} CPU threads, the checkpoint was written with "
                    f"{state['threads']}: CPU results may differ from an uninterrupted run in the last digits")
            log(f"resuming {cfg.run_name} from epoch {epoch} batch {batch_in_epoch} (step {step})")

    # Every check has passed: an older summary.json (another config's) is no longer this run's.
    (run_dir / SUMMARY_NAME).unlink(missing_ok=True)
    if step == 0:  # a fresh start: events and temp files of an abandoned attempt go
        for stale in [*run_dir.glob("events.out.tfevents.*"), *run_dir.glob(".*.tmp")]:
            stale.unlink()
    # Events at the checkpoint's step were logged before it was written: keep them, drop later ones.
    recorder = RunRecorder(run_dir, purge_step=step + 1 if step else None)
    recorder.rows = list(rows)
    recorder.hparams({k: v for k, v in run_identity(cfg).items() if k not in ("run_name", "norm_batch")})
    if step == 0:  # data-dependent init (WN with init=data; a no-op otherwise) on a fixed random batch
        n_init = min(len(ds.train), 256)
        n_init -= n_init % (cfg.norm.get("virtual_batch") or 1)  # mean-only BN may use ghost batches
        init_idx = torch.randperm(len(ds.train), generator=torch.Generator().manual_seed(cfg.seed))[:n_init]
        norms.data_dependent_init(model, train_batches.normalize(ds.train.x[init_idx.to(device)]))
    precise_n = norms.precise_bn_batches(model)

    def accumulators():
        z = lambda dtype=torch.float32: torch.zeros((), device=device, dtype=dtype)  # noqa: E731
        return {"loss_sum": z(), "correct": z(torch.long), "seen": z(torch.long),
                "window_loss": z(), "window_n": z(torch.long), "first_bad_step": z(torch.long) - 1}

    def save_checkpoint():
        if not recorder.enabled:  # rank 0 writes for everyone (tracking.rank)
            return
        checkpoint.save(ckpt_path, {
            "fingerprint": fp, "describe": f"{cfg.model.name}/{cfg.norm.name}/bs{cfg.batch_size}",
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": checkpoint.rng_state(), "epoch": epoch, "batch_in_epoch": batch_in_epoch, "step": step,
            "best_test_acc": best_test_acc, "best_val_acc": best_val_acc, "rows": recorder.rows,
            "elapsed": elapsed_before + time.perf_counter() - t_start,
            "train_seconds": train_seconds_before + train_seconds, "accumulators": acc,
            "epoch_seconds": epoch_seconds_before + time.perf_counter() - t_epoch if batch_in_epoch else 0.0,
            "threads": torch.get_num_threads(),
        })

    def check_divergence() -> int | None:
        bad = int(acc["first_bad_step"].item())
        return bad if bad >= 0 else None

    def summary(status: str, reason: str | None = None, diverged_step: int | None = None) -> dict:
        last = recorder.rows[-1] if recorder.rows else {}
        total_train_s = train_seconds_before + train_seconds
        images = len(recorder.rows) * steps_per_epoch * cfg.batch_size
        return {
            **run_identity(cfg), "status": status, "reason": reason, "lr_effective": lr, "epochs_done": len(recorder.rows),
            "steps_done": step, "test_acc": last.get("test_acc"), "best_test_acc": best_test_acc if best_test_acc >= 0 else None,
            "test_loss": last.get("test_loss"), "train_loss": last.get("train_loss"), "train_acc": last.get("train_acc"),
            "val_acc": last.get("val_acc"), "best_val_acc": best_val_acc,
            "wall_time_s": round(elapsed_before + time.perf_counter() - t_start, 3),
            "seconds_per_epoch": round(total_train_s / len(recorder.rows), 3) if recorder.rows else None,
            "images_per_s": round(images / total_train_s, 1) if total_train_s > 0 and images else None,
            "diverged_step": diverged_step, "train_size": len(ds.train), "test_size": len(ds.test),
            "val_size": len(ds.val) if ds.val else 0, "device": str(device), "fingerprint": fp,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": config,
        }

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, desc=cfg.run_name, leave=False, dynamic_ncols=True)
    train_seconds, t_epoch = 0.0, time.perf_counter()
    acc = {k: v.to(device) for k, v in acc_state.items()} if acc_state else accumulators()
    # Plain ints for the hot loop (a DictConfig lookup costs microseconds every step).
    log_every, gap_every, ckpt_every = int(cfg.log_every), int(cfg.stat_gap_every or 0), int(cfg.ckpt_every or 0)
    sync_every = 1 if device.type == "cpu" else log_every  # a host sync is free on the CPU
    try:
        while epoch < cfg.epochs:
            model.train()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_epoch = time.perf_counter()
            for x, y in train_batches.epoch(epoch, start=batch_in_epoch):
                record_gaps = gap_every and step % gap_every == 0
                with autocast(), (norms.recording_batch_stats(model) if record_gaps else contextlib.nullcontext()):
                    logits = model(x)
                    loss = F.cross_entropy(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                # Everything below stays on the device: no host sync per step.
                loss_d = loss.detach()
                acc["first_bad_step"] = torch.where((acc["first_bad_step"] < 0) & ~torch.isfinite(loss_d),
                                                    step, acc["first_bad_step"])
                acc["loss_sum"] += loss_d * len(y)
                acc["correct"] += (logits.detach().argmax(1) == y).sum()
                acc["seen"] += len(y)
                acc["window_loss"] += loss_d
                acc["window_n"] += 1
                step += 1
                batch_in_epoch += 1
                if bar is not None:
                    bar.update(1)
                if record_gaps:
                    gaps = norms.batch_stat_gaps(model)
                    if gaps:  # one host sync for all layers
                        values = torch.stack([torch.stack(pair).float() for pair in gaps.values()]).tolist()
                        for layer, (mean_gap, logvar_gap) in zip(gaps, values):
                            recorder.scalar(f"bn_gap/mean/{layer}", mean_gap, step)
                            recorder.scalar(f"bn_gap/logvar/{layer}", logvar_gap, step)
                if step % sync_every == 0:
                    bad = check_divergence()
                    if bad is not None:
                        return _diverged(recorder, summary, bad, log)
                if step % log_every == 0:
                    recorder.scalar("train/loss", acc["window_loss"] / acc["window_n"], step)
                    recorder.scalar("lr", scheduler.get_last_lr()[0], step)
                    acc["window_loss"].zero_()
                    acc["window_n"].zero_()
                if ckpt_every and step % ckpt_every == 0 and batch_in_epoch < steps_per_epoch:
                    save_checkpoint()
            if device.type == "cuda":
                torch.cuda.synchronize()
            epoch_seconds = epoch_seconds_before + time.perf_counter() - t_epoch
            epoch_seconds_before = 0.0
            train_seconds += epoch_seconds
            bad = check_divergence()
            if bad is not None:
                return _diverged(recorder, summary, bad, log)

            # End of epoch: evaluate (PreciseBN first, if asked), log, checkpoint.
            if precise_n:
                extra = data.Batches(ds.train, cfg.batch_size, device, train=True, seed=cfg.seed + 104729,
                                     crop_padding=cfg.data.crop_padding, flip=cfg.data.flip)
                norms.precise_bn_update(model, (x for x, _ in _take(extra.epoch(epoch), precise_n)))
            test_loss, test_acc = evaluate(model, test_batches, autocast)
            val_loss, val_acc = evaluate(model, val_batches, autocast) if val_batches else (None, None)
            epoch += 1
            seen = int(acc["seen"].item())
            row = {"epoch": epoch, "step": step, "train_loss": acc["loss_sum"].item() / seen,
                   "train_acc": 100.0 * acc["correct"].item() / seen, "test_loss": test_loss, "test_acc": test_acc,
                   "val_loss": val_loss, "val_acc": val_acc, "lr": scheduler.get_last_lr()[0],
                   "seconds": round(epoch_seconds, 3)}
            best_test_acc = max(best_test_acc, test_acc)
            if val_acc is not None:
                best_val_acc = max(best_val_acc or 0.0, val_acc)
            for tag, key in (("train/loss_epoch", "train_loss"), ("train/acc", "train_acc"), ("test/loss", "test_loss"),
                             ("test/acc", "test_acc"), ("val/loss", "val_loss"), ("val/acc", "val_acc")):
                if row[key] is not None:
                    recorder.scalar(tag, row[key], step)
            recorder.scalar("perf/images_per_s", steps_per_epoch * cfg.batch_size / epoch_seconds, step)
            recorder.scalar("perf/seconds_per_epoch", epoch_seconds, step)
            recorder.epoch_row(row)
            log(f"{cfg.run_name} epoch {epoch}/{cfg.epochs}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.2f}% | "
                f"test loss {test_loss:.4f} acc {test_acc:.2f}% | {epoch_seconds:.1f}s")
            batch_in_epoch = 0
            acc.update({k: torch.zeros_like(acc[k]) for k in ("loss_sum", "correct", "seen")})
            save_checkpoint()
        recorder.scalar("summary/best_test_acc", best_test_acc, step)
        result = summary("completed")
        recorder.summary(result)
        return result
    finally:
        if bar is not None:
            bar.close()
        recorder.close()


def _take(iterator, n):
    for i, item in enumerate(iterator):
        if i >= n:
            return
        yield item


def _diverged(recorder: RunRecorder, summary, bad_step: int, log) -> dict:
    log(f"diverged: non-finite loss at step {bad_step}; the run stops here")
    result = summary("diverged", reason=f"non-finite loss at step {bad_step}", diverged_step=bad_step)
    recorder.summary(result)
    return result
