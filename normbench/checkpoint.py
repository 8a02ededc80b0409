"""Checkpoints: everything a run needs to continue exactly where it stopped, written atomically.

A checkpoint holds plain containers of tensors and numbers only, so it loads with
`torch.load(weights_only=True)`. It carries the run's config fingerprint: a checkpoint of a
different run (another model, norm, batch size, ...) is never resumed silently.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from normbench.atomic import atomic_path

CHECKPOINT_NAME = "checkpoint.pt"


class BadCheckpoint(Exception):
    """The checkpoint file is unreadable or belongs to another run."""


def rng_state() -> dict:
    """The global generators' states (torch, CUDA's, numpy's, python's), as plain containers of
    tensors and numbers (so the checkpoint loads with weights_only=True)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def set_rng_state(state: dict) -> None:
    """Put the global generators back where `rng_state` found them."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save(path: str | Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load(path: str | Path, expected_fingerprint: str) -> dict:
    """Load a checkpoint or raise BadCheckpoint with a one-line reason."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, bad pickle, ...: all mean "unusable"
        raise BadCheckpoint(f"{path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None
    if not isinstance(state, dict) or "fingerprint" not in state:
        raise BadCheckpoint(f"{path} is not a normbench checkpoint")
    if state["fingerprint"] != expected_fingerprint:
        raise BadCheckpoint(f"{path} belongs to a different configuration ({state.get('describe', '?')})")
    return state
