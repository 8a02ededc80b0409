"""The three errors of summary.json (issue 12; summary.GAP_FIELDS), recomputed by hand (issue 27 item 8).

A tiny real BN run (cnn, one epoch, normalization batch 2) leaves its final model in checkpoint.pt (written
after the last evaluation, which changes no weight or buffer). From those weights this file recomputes, with
its own loop and none of normbench.evaluation:

1. gap_train_batchstats_acc: the training slice (gap_train_images, class-balanced with the generator seeded
   20_000 + seed, no augmentation) in eval_batches_for's fixed order (randperm, seed 0), every group of k
   consecutive images fed on its own in training mode (BN normalizes it with its own statistics), the last
   len % k images left out;
2. gap_test_batchstats_acc: the test set the same way;
3. gap_test_popstats_acc (= gap_test_ema_acc = test_acc in an ema run): the test set in eval mode (running
   statistics).

Each must equal the recorded value. The hand-computed training slice with running statistics is checked to
differ from the batch-statistics one by several points, so an evaluation that mixed the two up fails here.
"""

import json

import pytest
import torch

from normbench import checkpoint, data, models
from normbench.cli import run_job
from normbench.norms.batch_stat import BatchStatNorm

GROUP, SLICE = 2, 43  # 43 % 2 = 1: the incomplete group is left out


def _normalized(x_uint8: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(data.CIFAR10_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(data.CIFAR10_STD).view(1, 3, 1, 1) * 255
    return (x_uint8.float() - mean) / std


def _balanced_slice(y: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n // 10 images of each class (one more for the first n % 10), each class's a seeded random choice."""
    g = torch.Generator().manual_seed(20_000 + seed)
    classes = sorted(set(y.tolist()))
    chosen = []
    for i, c in enumerate(classes):
        k = n // len(classes) + (i < n % len(classes))
        idx = (y == c).nonzero().flatten()
        chosen.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.cat(chosen).sort().values


def _model(cfg, state: dict, train: bool) -> torch.nn.Module:
    model = models.build_from_config(cfg)
    model.load_state_dict(state)
    return model.train(train)


@torch.no_grad()
def _acc_batch_stats(cfg, state, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mini-batch statistics: fixed random order, each group of GROUP images its own training-mode batch."""
    model = _model(cfg, state, train=True)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    keep = len(y) - len(y) % GROUP
    logits = torch.cat([model(_normalized(x[i:i + GROUP])) for i in range(0, keep, GROUP)])
    return 100.0 * (logits.argmax(1) == y[:keep]).sum().item() / keep


@torch.no_grad()
def _acc_pop_stats(cfg, state, x: torch.Tensor, y: torch.Tensor) -> float:
    """Population (running) statistics: eval mode, the split in its stored order."""
    model = _model(cfg, state, train=False)
    logits = torch.cat([model(_normalized(x[i:i + 64])) for i in range(0, len(y), 64)])
    return 100.0 * (logits.argmax(1) == y).sum().item() / len(y)


def test_three_errors_equal_a_hand_recomputation(make_cfg, tmp_path):
    cfg = make_cfg("norm=bn", f"norm.virtual_batch={GROUP}", f"gap_train_images={SLICE}")
    assert run_job(cfg)["status"] == "completed"
    run_dir = tmp_path / "runs" / cfg.run_name
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["norm_batch"] == GROUP and s["epochs_done"] == 1
    saved = checkpoint.load(run_dir / checkpoint.CHECKPOINT_NAME, s["fingerprint"])
    assert saved["run"]["epoch"] == 1  # written after the last evaluation
    state = saved["model"]
    assert any(isinstance(m, BatchStatNorm) and m.virtual_batch == GROUP
               for m in _model(cfg, state, train=False).modules())

    ds = data.load_cifar10(cfg.data.root, cfg.data.cache_dir)  # the raw images, sorted by class
    assert len(ds.train) > SLICE and len(ds.test) % 64  # a real subset; a short last evaluation batch
    idx = _balanced_slice(ds.train.y, SLICE, cfg.seed)
    train_x, train_y = ds.train.x[idx], ds.train.y[idx]
    assert torch.bincount(train_y).tolist() == [5, 5, 5] + [4] * 7

    hand = {
        "gap_train_batchstats_acc": _acc_batch_stats(cfg, state, train_x, train_y),
        "gap_test_batchstats_acc": _acc_batch_stats(cfg, state, ds.test.x, ds.test.y),
        "gap_test_popstats_acc": _acc_pop_stats(cfg, state, ds.test.x, ds.test.y),
    }
    recorded = {k: s[k] for k in hand}
    assert recorded == pytest.approx(hand, abs=1e-6)
    assert s["gap_test_ema_acc"] == s["test_acc"] == pytest.approx(hand["gap_test_popstats_acc"], abs=1e-6)
    assert s["gap_test_precise_acc"] is None  # an ema run does not run PreciseBN

    # The statistics matter in this run: the training slice with running statistics is a different number,
    # so an evaluation that used them for the training slice would fail the comparison above.
    train_popstats = _acc_pop_stats(cfg, state, train_x, train_y)
    assert abs(train_popstats - hand["gap_train_batchstats_acc"]) > 5, (train_popstats, hand)
    assert abs(hand["gap_test_popstats_acc"] - hand["gap_test_batchstats_acc"]) > 5, hand
