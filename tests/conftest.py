"""Shared fixtures: tiny CIFAR-10-shaped datasets in both layouts, and the real Hydra config, shrunk.

Following lightning-hydra-template: compose the real config, shrink it (tiny data, one epoch),
run the real entry point. Sweeps run `normbench -m` in a subprocess with outputs in tmp_path.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# Every cpu_fused(float32=True) function eager in float32, here and in the subprocesses the tests start: compiling
# each of the suite's hundreds of layer shapes would take most of its time (tests/test_fused.py turns it on).
os.environ["NORMBENCH_EAGER_FLOAT32"] = "1"

from normbench.compose import CONF_DIR, compose  # noqa: E402, F401  (CONF_DIR: for the tests)

REPO = Path(__file__).resolve().parent.parent


def slow_without_bf16_units(test):
    """Mark a test that trains in bf16 `slow` on a CPU without bf16 matrix units (AVX2 only: bf16 runs on
    fallback kernels, minutes instead of seconds), so `make test` stays under 10 minutes there too; on an AMX
    CPU it is an ordinary test. `make test-all` runs it everywhere."""
    from normbench.device import cpu_has_bf16_matrix_units

    return test if cpu_has_bf16_matrix_units() else pytest.mark.slow(test)

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _class_images(rng: np.random.Generator, label: int, n: int) -> np.ndarray:
    """Learnable toy images: each class has its own mean colour, plus noise. (n, 32, 32, 3) uint8."""
    base = np.array([(label * 25) % 256, (label * 67 + 40) % 256, (255 - label * 23) % 256], dtype=np.float32)
    noise = rng.normal(0, 30, size=(n, 32, 32, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def make_image_folder(root: Path, n_train: int = 8, n_test: int = 4, size: int = 32, n_classes: int = 10,
                      ext: str = "png", seed: int = 0) -> Path:
    from torchvision.io import encode_jpeg, encode_png, write_file

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for label, name in enumerate(CLASSES[:n_classes]):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            images = _class_images(rng, label, n)
            if size != 32:
                images = np.resize(images, (n, size, size, 3))
            for i, img in enumerate(images):
                chw = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
                data = encode_png(chw) if ext == "png" else encode_jpeg(chw, quality=95)
                write_file(str(d / f"{i:04d}.{ext}"), data)
    return root


def make_pickle_layout(root: Path, n_per_batch: int = 20, n_test: int = 20, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def batch(n):
        labels = [i % 10 for i in range(n)]
        data = np.concatenate([_class_images(rng, lab, 1) for lab in labels]).transpose(0, 3, 1, 2).reshape(n, -1)
        return {"data": data, "labels": labels}

    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(n_per_batch), f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch(n_test), f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CLASSES}, f)
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Image-folder CIFAR-10 look-alike: 10 classes x 16 train / 8 test PNGs."""
    return make_image_folder(tmp_path_factory.mktemp("tiny_cifar"), n_train=16, n_test=8)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """No test reads the user's cache, tries a download or sees the machine's other training runs."""
    monkeypatch.setenv("NORMBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))  # the registry of training processes
    monkeypatch.setenv("NORMBENCH_NO_DOWNLOAD", "1")
    torch.set_num_threads(1)


# amp=false: fp32 with contiguous tensors, the runs' plain folder names (cnn/bn/bs8/...) and the exact
# comparisons of the tests; bf16 (amp=auto on an AMX CPU) is covered by test_precision.py and test_parity.py.
TINY_OVERRIDES = ["model=cnn", "epochs=1", "batch_size=8", "data.eval_batch_size=64", "log_every=2",
                  "stat_gap_every=4", "sched.warmup_epochs=0.5", "amp=false"]


def assert_same_forward_backward(layer, reference, x: torch.Tensor, upstream: torch.Tensor):
    """``layer`` and ``reference`` (x -> (output, *rest)) on two copies of ``x``: the same output, and the same
    input gradient for the gradient ``upstream``; ``layer``'s parameters and the reference's hold their own
    gradients for the caller to compare (``assert_same_parameter_gradients``). Returns ``rest``."""
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = layer(x_ours)
    expected, *rest = reference(x_ref)
    torch.testing.assert_close(out, expected)
    out.backward(upstream)
    expected.backward(upstream)
    torch.testing.assert_close(x_ours.grad, x_ref.grad)
    return rest


def assert_same_parameter_gradients(layer, reference_params: dict) -> None:
    """Each named parameter of ``layer`` has the gradient of the reference's parameter of that name."""
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, reference_params[name].grad, msg=name)


def compose_cfg(data_root: Path, out_dir: Path, overrides: list[str] = ()):
    """The real composed config (with HydraConfig set, as in a real run), shrunk for tests."""
    return compose([*TINY_OVERRIDES, f"data.root={data_root}", f"out_dir={out_dir}", *overrides], hydra_node=False)


@pytest.fixture
def make_cfg(tiny_data, tmp_path):
    def make(*overrides, out_dir=None):
        return compose_cfg(tiny_data, out_dir or tmp_path / "runs", list(overrides))

    return make


def run_cli(args: list[str], env_extra: dict | None = None, timeout: int = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m normbench ARGS` in a subprocess (the real entry point)."""
    env = {**os.environ, "NORMBENCH_NO_DOWNLOAD": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "normbench", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=kwargs.pop("cwd", REPO), **kwargs)
