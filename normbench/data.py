"""CIFAR-10 as tensors in memory: find it, decode it once, cache it, and serve augmented batches.

airbench's recipe: the whole dataset is one uint8 tensor on the training device; each epoch is a
seeded permutation plus per-image crop offsets and flips drawn up front, so a batch is an index
slice and the order of epoch `e` can be rebuilt exactly after a restart (no sampler state to save).
"""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from normbench.atomic import atomic_path
from normbench.device import torch_memory_format
from normbench.errors import UserError

IMAGE_SIZE = 32
NUM_CLASSES = 10
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
# Channel statistics of the CIFAR-10 training set on a 0-1 scale (the usual constants).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass
class Split:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def take(self, index: torch.Tensor) -> "Split":
        return Split(self.x[index], self.y[index])

    def to(self, device) -> "Split":
        return Split(self.x.to(device), self.y.to(device))

    def shard(self, rank: int, world_size: int) -> "Split":
        """Every world_size-th image, starting at rank: the data-parallel slice of this split."""
        return self.take(torch.arange(rank, len(self), world_size))


@dataclass
class Dataset:
    train: Split
    test: Split
    classes: list[str]
    source: str
    val: Split | None = None

    def to(self, device) -> "Dataset":
        return Dataset(self.train.to(device), self.test.to(device), self.classes, self.source,
                       self.val.to(device) if self.val is not None else None)


def default_root() -> str:
    return os.environ.get("NORMBENCH_DATA") or "./data"


def default_cache_dir() -> str:
    return os.environ.get("NORMBENCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "normbench")


# --------------------------------------------------------------------------- finding the data


def _image_folder_classes(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def locate(root: str | os.PathLike) -> tuple[str, Path]:
    """Return ("pickle" | "folder", path) for the CIFAR-10 copy under `root`, or raise UserError."""
    root = Path(root).expanduser()
    for candidate in (root / "cifar-10-batches-py", root):
        if (candidate / "data_batch_1").is_file() and (candidate / "test_batch").is_file():
            return "pickle", candidate
    if (root / "train").is_dir() and (root / "test").is_dir():
        return "folder", root
    if root.exists() and not os.access(root, os.R_OK | os.X_OK):
        raise UserError(f"data root {root} is not readable; fix its permissions or set data.root / NORMBENCH_DATA to a readable copy of CIFAR-10")
    if os.environ.get("NORMBENCH_NO_DOWNLOAD") != "1":
        try:  # the last resort; fails quickly on a machine without network
            import torchvision

            torchvision.datasets.CIFAR10(str(root), train=True, download=True)
            return "pickle", root / "cifar-10-batches-py"
        except Exception:  # noqa: BLE001 - any failure means "not available"
            pass
    raise UserError(
        f"CIFAR-10 not found under data root {root}: looked for {root}/cifar-10-batches-py (torchvision's "
        f"format), for {root}/train/<class>/*.jpg|png with {root}/test/<class>/* (image-folder layout), "
        "and the torchvision download failed. Fix: pass data.root=/path/to/cifar10 or set NORMBENCH_DATA "
        "(on these machines: NORMBENCH_DATA=../shared/datasets/cifar10-jpeg), or put torchvision's "
        "cifar-10-batches-py there."
    )


def _image_names(class_dir: str) -> list[str]:
    with os.scandir(class_dir) as it:
        return sorted(e.name for e in it if e.name.lower().endswith(IMAGE_EXTENSIONS))


def folder_layout(root: Path) -> dict[str, list[tuple[str, int]]]:
    """Check the image-folder layout cheaply (no per-file stat): split -> [(class, image count)]."""
    layout = {}
    for split in ("train", "test"):
        split_dir = root / split
        try:
            classes = _image_folder_classes(split_dir)
            layout[split] = [(c, len(_image_names(str(split_dir / c)))) for c in classes]
        except PermissionError as e:
            raise UserError(f"cannot read {e.filename}: permission denied; fix its permissions") from None
    train_classes = [c for c, _ in layout["train"]]
    test_classes = [c for c, _ in layout["test"]]
    if len(train_classes) != NUM_CLASSES or train_classes != test_classes:
        raise UserError(
            f"data root {root} has the wrong class layout: expected the same {NUM_CLASSES} class folders in "
            f"train/ and test/, found train/: {train_classes[:12]} and test/: {test_classes[:12]}"
        )
    for split, entries in layout.items():
        empty = [c for c, count in entries if count == 0]
        if empty:
            raise UserError(f"data root {root}: {split}/ class folders without images: {empty}; expected *.jpg or *.png files")
    return layout


def _cache_key(kind: str, path: Path, layout=None) -> str:
    """Identify the source by its path and its folders' contents (names, counts, modification times)."""
    h = hashlib.sha256(f"v1|{kind}|{path.resolve()}".encode())
    if layout is None:
        entries = [(p.name, p.stat()) for p in sorted(path.iterdir()) if p.is_file()]
        h.update(repr([(n, st.st_size, st.st_mtime_ns) for n, st in entries]).encode())
    else:
        for split, classes in layout.items():
            for c, count in classes:
                h.update(f"{split}/{c}|{count}|{os.stat(path / split / c).st_mtime_ns}".encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- decoding


def _decode_folder(root: Path, layout) -> dict:
    import warnings

    from torchvision.io import ImageReadMode, decode_image, read_file

    # torchvision 0.29 flags its image codecs as deprecated (for torchcodec); they still are the right tool here.
    warnings.filterwarnings("ignore", message="The image decoding and encoding", category=DeprecationWarning)
    out = {}
    for split, classes in layout.items():
        images, labels = [], []
        for label, (name, _) in enumerate(classes):
            for f in (root / split / name / n for n in _image_names(str(root / split / name))):
                try:
                    img = decode_image(read_file(str(f)), mode=ImageReadMode.RGB)
                except (RuntimeError, OSError) as e:
                    raise UserError(f"cannot decode image {f}: {e}") from None
                if tuple(img.shape[1:]) != (IMAGE_SIZE, IMAGE_SIZE):
                    raise UserError(
                        f"image {f} is {img.shape[2]}x{img.shape[1]} pixels; CIFAR-10 images are "
                        f"{IMAGE_SIZE}x{IMAGE_SIZE}: point data.root at a CIFAR-10 copy"
                    )
                images.append(img)
                labels.append(label)
        out[split] = Split(torch.stack(images), torch.tensor(labels, dtype=torch.int64))
    return out


def _decode_pickle(path: Path) -> dict:
    def load(names):
        xs, ys = [], []
        for name in names:
            with open(path / name, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE))
            ys.append(np.asarray(batch["labels"], dtype=np.int64))
        return Split(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)))

    try:
        return {"train": load([f"data_batch_{i}" for i in range(1, 6)]), "test": load(["test_batch"])}
    except (OSError, KeyError, ValueError, pickle.UnpicklingError) as e:
        raise UserError(f"cannot read CIFAR-10 batches in {path}: {e}") from None


def _classes_of_pickle(path: Path) -> list[str]:
    try:
        with open(path / "batches.meta", "rb") as f:
            return list(pickle.load(f, encoding="latin1")["label_names"])
    except OSError:
        return [str(i) for i in range(NUM_CLASSES)]


def load_cifar10(root: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> Dataset:
    """Decode CIFAR-10 once, then load the cached uint8 tensors (well under a second)."""
    kind, path = locate(root or default_root())
    layout = folder_layout(path) if kind == "folder" else None
    key = _cache_key(kind, path, layout)
    cache_file = Path(cache_dir or default_cache_dir()).expanduser() / f"cifar10-{key}.pt"
    if cache_file.is_file():
        try:
            blob = torch.load(cache_file, weights_only=True)
            return Dataset(Split(blob["train_x"], blob["train_y"]), Split(blob["test_x"], blob["test_y"]),
                           list(blob["classes"]), str(path))
        except Exception:  # noqa: BLE001 - a broken cache is rebuilt, never trusted
            pass
    splits = _decode_folder(path, layout) if kind == "folder" else _decode_pickle(path)
    classes = [c for c, _ in layout["train"]] if layout else _classes_of_pickle(path)
    blob = {"train_x": splits["train"].x, "train_y": splits["train"].y,
            "test_x": splits["test"].x, "test_y": splits["test"].y, "classes": classes}
    try:
        with atomic_path(cache_file) as tmp:
            torch.save(blob, tmp)
    except OSError:
        pass  # a read-only cache only costs decode time
    return Dataset(splits["train"], splits["test"], classes, str(path))


# --------------------------------------------------------------------------- subsets


def balanced_indices(labels: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """A seeded class-balanced choice of n indices: n // K per class, the remainder to the first classes."""
    classes = torch.unique(labels)
    per_class = [n // len(classes) + (1 if i < n % len(classes) else 0) for i in range(len(classes))]
    chosen = []
    for c, k in zip(classes.tolist(), per_class):
        idx = torch.nonzero(labels == c).flatten()
        if k > len(idx):
            raise UserError(f"cannot take {k} images of class {c}: it has only {len(idx)}")
        chosen.append(idx[torch.randperm(len(idx), generator=generator)[:k]])
    return torch.sort(torch.cat(chosen)).values


def select(ds: Dataset, subset: int | None, test_subset: int | None, val_split: int | None, seed: int) -> Dataset:
    """Carve a validation split out of train, then subset train and test (all seeded, class-balanced)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    train, val = ds.train, None
    if val_split:
        if val_split >= len(train):
            raise UserError(f"data.val_split={val_split} leaves no training images (the training set has {len(train)}); use a smaller value")
        val_idx = balanced_indices(train.y, val_split, g)
        keep = torch.ones(len(train), dtype=torch.bool)
        keep[val_idx] = False
        val, train = train.take(val_idx), train.take(torch.nonzero(keep).flatten())
    for name, value, split in (("data.subset", subset, train), ("data.test_subset", test_subset, ds.test)):
        if value is not None and not 0 < value <= len(split):
            raise UserError(f"{name}={value} is out of range: it must be between 1 and {len(split)} (the size of that split)")
    if subset is not None and subset < len(train):
        train = train.take(balanced_indices(train.y, subset, g))
    test = ds.test
    if test_subset is not None and test_subset < len(test):
        test = test.take(balanced_indices(test.y, test_subset, g))
    return Dataset(train, test, ds.classes, ds.source, val)


# --------------------------------------------------------------------------- batches


class Batches:
    """Augmented, normalized batches from a Split that lives on the training device.

    Training batches drop the last incomplete batch, so every step sees exactly `batch_size`
    images (the normalization batch stays what the config says).

    In a data-parallel run (`world_size` processes) `batch_size` is the per-device batch. Training:
    step i of an epoch is the global batch i of the one epoch order (seed, epoch), `batch_size *
    world_size` images, and rank r takes its r-th slice, so the ranks' slices together are exactly
    what a single process with the global batch would see. Evaluation: rank r takes every
    world_size-th image from r (Split.shard), so the ranks cover the split once."""

    def __init__(self, split: Split, batch_size: int, device, *, train: bool, seed: int = 0,
                 crop_padding: int = 4, flip: bool = True, mean=CIFAR10_MEAN, std=CIFAR10_STD,
                 rank: int = 0, world_size: int = 1, memory_format: str = "contiguous"):
        self.split = split.to(device)
        if not train and world_size > 1:
            self.split = self.split.shard(rank, world_size)
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.train = train
        self.seed = seed
        self.pad = crop_padding if train else 0
        self.flip = flip and train
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255
        self.memory_format = torch_memory_format(memory_format)

    def __len__(self) -> int:
        n = len(self.split)
        return n // (self.batch_size * self.world_size) if self.train else -(-n // self.batch_size)

    def _epoch_plan(self, epoch: int):
        """Permutation, crop offsets and flips of every image for this epoch, from (seed, epoch) alone."""
        n = len(self.split)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g)
        dx = torch.randint(0, 2 * self.pad + 1, (n,), generator=g)
        dy = torch.randint(0, 2 * self.pad + 1, (n,), generator=g)
        flips = torch.randint(0, 2, (n,), generator=g, dtype=torch.bool) if self.flip else torch.zeros(n, dtype=torch.bool)
        return [t.to(self.device) for t in (perm, dx, dy, flips)]

    def epoch(self, epoch: int = 0, start: int = 0, stop: int | None = None):
        """Yield (x, y) batches of one epoch, beginning at batch index `start` (for exact resume) and, for
        training, ending before batch index `stop` (a training budget that ends inside the epoch)."""
        if not self.train:
            for i in range(len(self)):
                sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
                yield self.normalize(self.split.x[sl]), self.split.y[sl]
            return
        perm, dx, dy, flips = self._epoch_plan(epoch)
        ar = torch.arange(IMAGE_SIZE, device=self.device)
        b = torch.arange(self.batch_size, device=self.device)[:, None, None, None]
        c = torch.arange(3, device=self.device)[None, :, None, None]
        for i in range(start, len(self) if stop is None else min(stop, len(self))):
            first = (i * self.world_size + self.rank) * self.batch_size  # this rank's slice of global batch i
            idx = perm[first:first + self.batch_size]
            x = self.split.x[idx]
            if self.pad:
                x = F.pad(x, (self.pad,) * 4)
            # One gather does crop and flip: row/column indices per image.
            rows = (dy[idx, None] + ar)[:, None, :, None]
            cols = torch.where(flips[idx, None], dx[idx, None] + ar.flip(0), dx[idx, None] + ar)[:, None, None, :]
            yield self.normalize(x[b, c, rows, cols]), self.split.y[idx]

    def normalize(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """Float images, normalized per channel, in the run's memory format (the model's)."""
        return ((x_uint8.float() - self.mean) / self.std).contiguous(memory_format=self.memory_format)
