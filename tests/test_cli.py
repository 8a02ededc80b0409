"""Every bad input: exit status 2, one clear line, no traceback, before any training."""

import shutil

import pytest
import torch

from tests.conftest import TINY_OVERRIDES, make_image_folder, run_cli


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "epoch 1/" not in result.stdout  # nothing trained


@pytest.fixture
def run(tiny_data, tmp_path):
    def run(*overrides, data_root=None):
        args = [*TINY_OVERRIDES, f"data.root={data_root or tiny_data}", f"out_dir={tmp_path / 'runs'}", *overrides]
        return run_cli(args, env_extra={"NORMBENCH_CACHE": str(tmp_path / "cache")})

    return run


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (["model=resnet99"], ["unknown model 'resnet99'", "resnet20", "cnn"]),
        (["norm=batchnorm"], ["unknown norm 'batchnorm'", "bn", "gn", "evonorm_s0"]),
        (["norm=bn,groupnorm"], ["unknown norm 'groupnorm'"]),
        (["experiment=quik"], ["unknown experiment 'quik'", "quick", "gn_fig1"]),
        (["batch_size=0"], ["batch_size=0", "positive"]),
        (["-m", "batch_size=8,-1"], ["batch_size=-1", "positive"]),
        (["epochs=0"], ["epochs=0", "positive"]),
        (["lr=0"], ["lr=0", "positive"]),
        (["lr=-0.1"], ["lr=-0.1", "positive"]),
        (["norm.virtual_batch=3"], ["norm.virtual_batch=3", "batch_size=8", "divide"]),
        (["norm=gn", "norm.groups=7"], ["32 channels", "7"]),
        (["data.subset=0"], ["data.subset=0"]),
        (["data.subset=100000"], ["data.subset=100000", "160"]),
        (["batchsize=2"], ["Could not override 'batchsize'"]),
        (["-m", "norm=bn,gn", "epochz=1,2"], ["Could not override 'epochz'"]),
        (["log_every=0"], ["log_every=0"]),
        (["amp=off"], ["amp='off'", "auto, true, false"]),
        (["seed=-1"], ["seed=-1"]),
        (["device=tpu"], ["device='tpu'", "cuda"]),
        (["data.eval_batch_size=0"], ["data.eval_batch_size=0"]),
        (["sched.name=linear"], ["sched.name='linear'"]),
    ],
)
def test_bad_config_values(run, overrides, fragments):
    assert_one_line_error(run(*overrides), *fragments)


def test_missing_data_root(run, tmp_path):
    assert_one_line_error(run(data_root=tmp_path / "nowhere"), "CIFAR-10 not found", "NORMBENCH_DATA")


def test_empty_data_root(run, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run(data_root=tmp_path / "empty"), "CIFAR-10 not found")


def test_unreadable_images(run, tmp_path):
    root = make_image_folder(tmp_path / "corrupt", n_train=1, n_test=1)
    (root / "train" / "cat" / "0000.png").write_bytes(b"not an image")
    assert_one_line_error(run(data_root=root), "cannot decode image", "0000.png")


def test_wrong_image_size(run, tmp_path):
    root = make_image_folder(tmp_path / "big", n_train=1, n_test=1, size=64)
    assert_one_line_error(run(data_root=root), "64x64", "32x32")


def test_wrong_class_layout(run, tmp_path):
    root = make_image_folder(tmp_path / "three", n_train=1, n_test=1, n_classes=3)
    assert_one_line_error(run(data_root=root), "class layout")
    root = make_image_folder(tmp_path / "moved", n_train=1, n_test=1)
    shutil.move(str(root / "test" / "cat"), str(root / "test" / "kitten"))
    assert_one_line_error(run(data_root=root), "class layout")


def test_output_folder_not_writable(run, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert_one_line_error(run(f"out_dir={blocker}/runs"), "cannot be written", "out_dir")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu(run):
    assert_one_line_error(run("device=cuda"), "device=cuda", "no CUDA GPU")


def test_placement_after_needs_cnn(run):
    assert_one_line_error(run("model=resnet20", "model.placement=after"), "placement=after", "cnn")


def test_debug_shows_the_traceback(run):
    result = run("norm.virtual_batch=3", "debug=true")
    assert result.returncode == 2 and "Traceback" in result.stderr


def test_report_on_path_without_runs(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "normbench.report", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "no runs found" in result.stderr
