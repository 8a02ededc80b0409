#!/usr/bin/env python
"""Throughput of normbench's training loop against two references, in one process:

  pure compute   the model's forward/backward/SGD step on one batch already on the device
                 (no data work at all): the ceiling
  normbench      the real `normbench.train.train` loop (in-memory dataset, batch augmentation,
                 the run's logging and checkpoints), training images/s of its second epoch
  DataLoader     the common hand-written loop: torchvision-style per-image PIL transforms
                 (RandomCrop(32, 4), RandomHorizontalFlip, ToTensor, Normalize) in a DataLoader

and prints the ratios normbench / pure compute and normbench / DataLoader.

    python scripts/bench.py [--model resnet20] [--norm bn] [--batch-size 128] [--steps 100]
                            [--device auto] [--workers 2] [--out results/bench/<device>.md]

Uses the real CIFAR-10 under $NORMBENCH_DATA when set, else random images (throughput does not
depend on pixel values).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from normbench import atomic  # noqa: E402
from normbench.data import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402
from normbench.models import build_model  # noqa: E402
from normbench.train import resolve_device  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_step(model, device, use_amp: bool):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def step(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def time_steps(step, batches, device, warmup: int, window: int) -> float:
    """Median images/s over consecutive windows of `window` batches, after `warmup` untimed ones."""
    rates, n_images, start = [], 0, None
    for i, (x, y) in enumerate(batches):
        if i >= warmup and (i - warmup) % window == 0:
            sync(device)
            if start is not None:
                rates.append(n_images / (time.perf_counter() - start))
            n_images, start = 0, time.perf_counter()
        if i >= warmup:
            n_images += len(y)
        step(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
    sync(device)
    rates.append(n_images / (time.perf_counter() - start))
    return float(np.median(rates))


def bench_pure(args, device, use_amp) -> float:
    torch.manual_seed(0)
    model = build_model(args.model, args.norm).to(device).train()
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    return time_steps(make_step(model, device, use_amp),
                      ((x, y) for _ in range(args.steps * args.repeats + args.warmup)), device, args.warmup, args.steps)


def bench_dataloader(args, device, use_amp, images: np.ndarray, labels: np.ndarray) -> float:
    from PIL import Image
    from torchvision import transforms

    class HWCDataset(torch.utils.data.Dataset):  # what torchvision.datasets.CIFAR10 does per item
        def __init__(self, data, targets, transform):
            self.data, self.targets, self.transform = data, targets, transform

        def __len__(self):
            return len(self.data)

        def __getitem__(self, i):
            return self.transform(Image.fromarray(self.data[i])), int(self.targets[i])

    transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
    loader = torch.utils.data.DataLoader(HWCDataset(images, labels, transform), batch_size=args.batch_size,
                                         shuffle=True, drop_last=True, num_workers=args.workers,
                                         pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    torch.manual_seed(0)
    model = build_model(args.model, args.norm).to(device).train()

    def batches():
        n = 0
        while True:
            for batch in loader:
                yield batch
                n += 1
                if n >= args.steps * args.repeats + args.warmup:
                    return

    return time_steps(make_step(model, device, use_amp), batches(), device, args.warmup, args.steps)


def bench_normbench(args, device_name: str, data_root: str) -> float:
    """The real training loop, configured through the real Hydra config: median over epochs 2.. of
    the training images/s (the first epoch is the warmup)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import normbench.cli  # noqa: F401 - registers the run-name resolver
    from normbench.train import train

    steps = args.steps + args.warmup
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[
            f"model={args.model}", f"norm={args.norm}", f"batch_size={args.batch_size}", f"epochs={args.repeats + 1}",
            f"data.subset={steps * args.batch_size}", "data.test_subset=1000", f"data.root={data_root}",
            f"device={device_name}", f"amp={args.amp}", "stat_gap_every=0", "progress=false"])
    GlobalHydra.instance().clear()
    with tempfile.TemporaryDirectory() as run_dir:
        train(cfg, run_dir, log=lambda *a: None)
        with open(Path(run_dir) / "metrics.csv") as f:
            seconds = [float(row["seconds"]) for row in csv.DictReader(f)][1:]
    return float(np.median([steps * args.batch_size / s for s in seconds]))


def synthetic_cifar(root: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Random images in torchvision's cifar-10-batches-py layout (5 train batches + test)."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    per = -(-n // 50) * 10  # a multiple of 10 per batch keeps the classes balanced
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        count = per if name != "test_batch" else 1000
        data = rng.integers(0, 256, (count, 3 * 32 * 32), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": (np.arange(count) % 10).tolist()}, f)
    images = rng.integers(0, 256, (per * 5, 32, 32, 3), dtype=np.uint8)
    return images, np.arange(per * 5) % 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--norm", default="bn")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="timed windows (epochs for normbench); the median is reported")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", default="auto")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--out", default=None, help="write a markdown summary here (default: print only)")
    args = parser.parse_args()

    device = resolve_device(args.device)
    use_amp = device.type == "cuda" if args.amp == "auto" else args.amp in ("true", "1")
    n = (args.steps + args.warmup) * args.batch_size  # one normbench epoch
    with tempfile.TemporaryDirectory() as tmp:
        real = os.environ.get("NORMBENCH_DATA")
        if real:
            from normbench.data import load_cifar10

            ds = load_cifar10(real)
            images = ds.train.x[:n].permute(0, 2, 3, 1).contiguous().numpy()
            labels = ds.train.y[:n].numpy()
            data_root, source = real, "CIFAR-10 (NORMBENCH_DATA)"
        else:
            images, labels = synthetic_cifar(Path(tmp), n)
            data_root, source = tmp, "random images"
        results = {
            "pure_compute": bench_pure(args, device, use_amp),
            "normbench": bench_normbench(args, str(device), data_root),
            "dataloader": bench_dataloader(args, device, use_amp, images, labels),
        }
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    lines = [
        f"# Training throughput: {args.model} + {args.norm}, batch {args.batch_size}, {name}",
        "",
        f"Command: `python scripts/bench.py --model {args.model} --norm {args.norm} --batch-size {args.batch_size} "
        f"--steps {args.steps} --repeats {args.repeats} --device {args.device} --amp {args.amp} --workers {args.workers}`; "
        f"median of {args.repeats} timed windows; data: {source}; "
        f"bf16 autocast: {use_amp}; torch {torch.__version__}.",
        "",
        "| loop | images/s |",
        "|:---|---:|",
        *[f"| {k} | {v:,.0f} |" for k, v in results.items()],
        "",
        f"normbench / pure compute = **{results['normbench'] / results['pure_compute']:.3f}**; "
        f"normbench / DataLoader ({args.workers} workers) = **{results['normbench'] / results['dataloader']:.2f}x**",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    print(json.dumps({k: round(v, 1) for k, v in results.items()}))
    if args.out:
        atomic.write_text(args.out, text)


if __name__ == "__main__":
    main()
