import os

import numpy as np
import pytest
import torch

from normbench import data
from normbench.errors import UserError
from tests.conftest import make_image_folder, make_pickle_layout


def test_image_folder_and_pickle_layouts_load(tmp_path):
    folder = make_image_folder(tmp_path / "folder", n_train=3, n_test=2)
    ds = data.load_cifar10(folder, tmp_path / "cache")
    assert ds.train.x.shape == (30, 3, 32, 32) and ds.train.x.dtype == torch.uint8
    assert ds.test.x.shape == (20, 3, 32, 32)
    assert sorted(ds.train.y.tolist()) == sorted(list(range(10)) * 3)
    assert ds.classes[0] == "airplane"

    pickled = make_pickle_layout(tmp_path / "pickle", n_per_batch=10, n_test=10)
    ds2 = data.load_cifar10(pickled, tmp_path / "cache")
    assert ds2.train.x.shape == (50, 3, 32, 32) and ds2.test.x.shape == (10, 3, 32, 32)
    assert ds2.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_decoded_pixels_match_the_source(tmp_path):
    from torchvision.io import decode_image

    folder = make_image_folder(tmp_path / "folder", n_train=2, n_test=1)
    ds = data.load_cifar10(folder, tmp_path / "cache")
    expected = decode_image(str(folder / "train" / "bird" / "0001.png"))
    assert torch.equal(ds.train.x[2 * 2 + 1], expected)  # classes sorted, files sorted, 2 per class


def test_cache_is_used_and_keyed_by_source(tmp_path, monkeypatch):
    folder = make_image_folder(tmp_path / "folder", n_train=2, n_test=1)
    cache = tmp_path / "cache"
    first = data.load_cifar10(folder, cache)
    assert len(list(cache.glob("cifar10-*.pt"))) == 1

    def no_decode(*a, **k):
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(data, "_decode_folder", no_decode)
    second = data.load_cifar10(folder, cache)
    assert torch.equal(first.train.x, second.train.x)
    # Another source (an added image changes the folder) gets its own cache entry.
    monkeypatch.undo()
    make_image_folder(tmp_path / "other", n_train=3, n_test=1)
    data.load_cifar10(tmp_path / "other", cache)
    assert len(list(cache.glob("cifar10-*.pt"))) == 2


def test_missing_data_names_paths_and_fixes(tmp_path):
    with pytest.raises(UserError) as e:
        data.load_cifar10(tmp_path / "nowhere", tmp_path / "cache")
    msg = str(e.value)
    assert "cifar-10-batches-py" in msg and "train/<class>" in msg and "NORMBENCH_DATA" in msg
    assert "\n" not in msg


def test_wrong_image_size_and_class_layout_are_user_errors(tmp_path):
    make_image_folder(tmp_path / "big", n_train=1, n_test=1, size=40)
    with pytest.raises(UserError, match="40x40"):
        data.load_cifar10(tmp_path / "big", tmp_path / "cache")
    make_image_folder(tmp_path / "few", n_train=1, n_test=1, n_classes=3)
    with pytest.raises(UserError, match="class layout"):
        data.load_cifar10(tmp_path / "few", tmp_path / "cache")


def test_balanced_subset_and_val_split(tmp_path):
    ds = data.load_cifar10(make_image_folder(tmp_path / "f", n_train=10, n_test=4), tmp_path / "cache")
    sel = data.select(ds, subset=40, test_subset=20, val_split=20, seed=0)
    assert len(sel.train) == 40 and len(sel.test) == 20 and len(sel.val) == 20
    assert torch.bincount(sel.train.y, minlength=10).tolist() == [4] * 10
    assert torch.bincount(sel.val.y, minlength=10).tolist() == [2] * 10
    # validation images are disjoint from training images
    train_set = {bytes(x.numpy()) for x in sel.train.x}
    assert not any(bytes(x.numpy()) in train_set for x in sel.val.x)
    assert torch.equal(sel.train.x, data.select(ds, 40, 20, 20, seed=0).train.x)  # seeded
    with pytest.raises(UserError, match="data.subset=1000"):
        data.select(ds, subset=1000, test_subset=None, val_split=None, seed=0)


def test_batches_crop_flip_normalize_and_exact_restart():
    x = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    split = data.Split(x, torch.arange(10))
    batches = data.Batches(split, 4, "cpu", train=True, seed=3)
    assert len(batches) == 2  # the incomplete last batch is dropped
    epoch = list(batches.epoch(5))
    assert [b[0].shape for b in epoch] == [(4, 3, 32, 32)] * 2
    # same epoch -> same batches; restart at batch 1 -> the same second batch
    assert torch.equal(list(batches.epoch(5, start=1))[0][0], epoch[1][0])
    assert not torch.equal(list(batches.epoch(6))[0][0], epoch[0][0])
    # each augmented image is a padded 32x32 crop (maybe flipped) of its source image (label = index)
    padded = torch.nn.functional.pad(x.float(), (4, 4, 4, 4))
    for image, i in zip(*epoch[0]):
        crops = [padded[i, :, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
        candidates = [(c - batches.mean[0]) / batches.std[0] for c in crops + [c.flip(-1) for c in crops]]
        assert any(torch.allclose(image, c) for c in candidates)
    assert len({int(i) for _, y in epoch for i in y}) == 8  # 8 distinct images in an epoch of 2 x 4


def test_eval_batches_cover_split_in_order():
    x = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    batches = data.Batches(data.Split(x, torch.arange(10)), 4, "cpu", train=False)
    got = list(batches.epoch())
    assert [len(y) for _, y in got] == [4, 4, 2]
    assert torch.cat([y for _, y in got]).tolist() == list(range(10))


def test_shard_is_a_disjoint_cover():
    split = data.Split(torch.zeros(10, 3, 32, 32, dtype=torch.uint8), torch.arange(10))
    parts = [split.shard(r, 3).y.tolist() for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(10))


@pytest.mark.skipif(not os.environ.get("NORMBENCH_DATA"), reason="NORMBENCH_DATA not set (real CIFAR-10 not available)")
def test_real_cifar10_loads_in_full(tmp_path):
    ds = data.load_cifar10(os.environ["NORMBENCH_DATA"], os.environ.get("NORMBENCH_CACHE_REAL") or tmp_path / "cache")
    assert len(ds.train) == 50_000 and len(ds.test) == 10_000
    assert torch.bincount(ds.test.y).tolist() == [1000] * 10
    mean = ds.train.x.float().mean((0, 2, 3)) / 255  # all images: the folders are sorted by class
    assert np.allclose(mean.numpy(), data.CIFAR10_MEAN, atol=0.03)
