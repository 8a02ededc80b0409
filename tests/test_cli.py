"""Every bad input: exit status 2, one clear line, no traceback, before any training."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, TINY_OVERRIDES, make_image_folder, run_cli


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


@pytest.fixture
def refused(tiny_data, tmp_path, monkeypatch, capsys):
    """`normbench ARGS` in this process, for input refused before Hydra starts anything (a
    subprocess per case cost two minutes of make test; the tests that use `run` check the real
    entry point's exit status and stderr): its exit status and output, as a CompletedProcess."""
    from normbench import cli

    def hydra_started():
        raise AssertionError("the bad input reached Hydra: nothing should start")

    monkeypatch.setattr(cli, "hydra_entry", hydra_started)

    def refused(*overrides, data_root=None):
        with pytest.raises(SystemExit) as exit_:
            cli.main([*TINY_OVERRIDES, f"data.root={data_root or tiny_data}", f"out_dir={tmp_path / 'runs'}", *overrides])
        captured = capsys.readouterr()
        return subprocess.CompletedProcess([], exit_.value.code, captured.out, captured.err)

    return refused


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
        (["batchsize=2"], ["unknown key 'batchsize'; did you mean 'batch_size'?"]),
        (["-m", "norm=bn,gn", "epochz=1,2"], ["unknown key 'epochz'; did you mean 'epochs'?"]),
        (["log_every=0"], ["log_every=0"]),
        (["amp=off"], ["amp='off'", "auto, true, false"]),
        (["seed=-1"], ["seed=-1"]),
        (["device=tpu"], ["device='tpu'", "cuda"]),
        (["data.eval_batch_size=0"], ["data.eval_batch_size=0"]),
        (["sched.name=linear"], ["sched.name='linear'", "cosine, onecycle"]),
        (["sched=linear"], ["unknown sched 'linear'", "cosine, onecycle"]),
        (["optim.lr_scaling=cubic"], ["optim.lr_scaling='cubic'", "linear, sqrt, none"]),
        (["hydra/launcher=threads"], ["unknown hydra/launcher 'threads'", "local_parallel", "slurm"]),
        (["x=["], ["cannot parse 'x=['"]),
        (["eval_stats=running"], ["eval_stats='running'", "ema, precise, batch"]),
        (["precise_batches=0"], ["precise_batches=0", "positive"]),
        (["gap_train_images=-1"], ["gap_train_images=-1"]),
        (["freeze_stats_epochs=2"], ["freeze_stats_epochs=2", "epochs=1"]),
        (["norm.precise_stats=4"], ["unknown key 'norm.precise_stats'"]),
        (["select_best=acc"], ["select_best='acc'", "lr"]),
        (["gap_every=0"], ["gap_every=0", "positive"]),
        (["gap_train_images=5"], ["gap_train_images=5", "normalization batch (8)", ">= 8 or 0"]),
        (["norm.virtual_batch=4", "data.test_subset=3"], ["data.test_subset=3", "normalization batch (4)"]),
    ],
)
def test_bad_config_values(refused, tmp_path, overrides, fragments):
    assert_one_line_error(refused(*overrides), *fragments)
    assert not (tmp_path / "runs").exists()


def test_subset_larger_than_the_data(run):
    """Known only once the data is found (inside the run, still before training): the real entry point."""
    assert_one_line_error(run("data.subset=100000"), "data.subset=100000", "160")


def test_missing_data_root(refused, tmp_path):
    assert_one_line_error(refused(data_root=tmp_path / "nowhere"), "CIFAR-10 not found", "NORMBENCH_DATA")


def test_empty_data_root(refused, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(refused(data_root=tmp_path / "empty"), "CIFAR-10 not found")


def test_unreadable_images(run, tmp_path):
    root = make_image_folder(tmp_path / "corrupt", n_train=1, n_test=1)
    (root / "train" / "cat" / "0000.png").write_bytes(b"not an image")
    assert_one_line_error(run(data_root=root), "cannot decode image", "0000.png")


def test_wrong_image_size(run, tmp_path):
    root = make_image_folder(tmp_path / "big", n_train=1, n_test=1, size=64)
    assert_one_line_error(run(data_root=root), "64x64", "32x32")


@pytest.mark.slow  # 15 s; the other data-layout errors stay in make test
def test_wrong_class_layout(run, tmp_path):
    root = make_image_folder(tmp_path / "three", n_train=1, n_test=1, n_classes=3)
    assert_one_line_error(run(data_root=root), "class layout")
    root = make_image_folder(tmp_path / "moved", n_train=1, n_test=1)
    shutil.move(str(root / "test" / "cat"), str(root / "test" / "kitten"))
    assert_one_line_error(run(data_root=root), "class layout")


def test_output_folder_not_writable(refused, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert_one_line_error(refused(f"out_dir={blocker}/runs"), "cannot be written", "out_dir")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_gpu(refused, tmp_path, device):
    # Refused by validation (normbench.device.check_device), before Hydra starts: once refused only
    # inside the run, after its folder was made.
    assert_one_line_error(refused(f"device={device}"), f"device={device}", "no CUDA GPU")
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
                    reason="MPS is available here")
def test_mps_where_it_is_not_available(refused, tmp_path):
    assert_one_line_error(refused("device=mps"), "device=mps", "MPS is not available")
    assert not (tmp_path / "runs").exists()


def test_placement_after_needs_cnn(refused):
    assert_one_line_error(refused("model=resnet20", "model.placement=after"), "placement", "cnn")


def test_debug_shows_the_traceback(run):
    result = run("norm.virtual_batch=3", "debug=true")
    assert result.returncode == 2 and "Traceback" in result.stderr


# --------------------------------------------------------------------------- mistyped keys (issue 10.3)


@pytest.mark.parametrize("override", ["epoch=1", "+epoch=1", "++epoch=1"])
def test_unknown_key_names_the_closest_known_key(refused, tmp_path, override):
    # `+epoch=1` used to train (30 epochs, with an unused key): Hydra adds unknown `+` keys silently.
    assert_one_line_error(refused("norm=bn", override), "unknown key 'epoch'; did you mean 'epochs'?")
    assert not (tmp_path / "runs").exists()


def test_unknown_nested_key_names_the_closest_known_key(refused):
    assert_one_line_error(refused("data.subsett=100"), "unknown key 'data.subsett'; did you mean 'data.subset'")


def test_option_of_another_norm_names_the_chosen_norms_options(refused):
    assert_one_line_error(refused("norm=bn", "norm.groups=4"), "unknown key 'norm.groups'", "norm bn has:", "momentum",
                          "gn")


def test_plus_on_a_known_key(refused):
    assert_one_line_error(refused("+epochs=1"), "'epochs' is already in the config", "(epochs=1)")


def test_removing_a_key(refused):
    assert_one_line_error(refused("~data.subset"), "cannot remove 'data.subset'", "data.subset=null")


def test_plus_still_adds_to_hydras_own_config(run, tmp_path):
    """`+` stays legitimate where Hydra's config is open, e.g. an environment variable for each job."""
    result = run("+hydra.job.env_set.NORMBENCH_TEST_MARK=1")
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "runs").rglob("summary.json"))) == 1


# --------------------------------------------------------------------------- checked before anything is created (10.4, 10.5)


def test_bad_virtual_batch_creates_nothing(refused, tmp_path):
    assert_one_line_error(refused("norm=bn", "norm.virtual_batch=3"), "norm.virtual_batch=3", "batch_size=8")
    assert not (tmp_path / "runs").exists()


def test_missing_data_creates_nothing(refused, tmp_path):
    assert_one_line_error(refused(data_root=tmp_path / "nowhere"), "CIFAR-10 not found")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "nowhere").exists()


def test_failed_download_to_the_default_root_creates_nothing(tmp_path):
    """Without data.root and NORMBENCH_DATA the root is ./data, and torchvision's download attempt creates
    it before failing. The proxy refuses every connection: no test touches the network."""
    work = tmp_path / "work"
    work.mkdir()
    env = {"NORMBENCH_DATA": "", "NORMBENCH_NO_DOWNLOAD": "0", "NORMBENCH_CACHE": str(tmp_path / "cache"),
           "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}
    result = run_cli([*TINY_OVERRIDES, "out_dir=runs"], env_extra=env, cwd=work)
    assert_one_line_error(result, "CIFAR-10 not found", str(work / "data"))
    assert list(work.iterdir()) == [] and not (tmp_path / "cache").exists()


def test_sweep_with_one_bad_value_stops_before_its_first_run(refused, tmp_path):
    result = refused("-m", "batch_size=8,6", "norm.virtual_batch=4")
    assert_one_line_error(result, "norm.virtual_batch=4 does not divide batch_size=6")
    assert not (tmp_path / "runs").exists()


def test_preset_sweep_is_checked_before_its_first_run(tiny_data, tmp_path):
    # experiment=quick sweeps norm.virtual_batch=32,2 in its own sweep parameters; with batch_size=8
    # (TINY_OVERRIDES) its first value cannot divide the batch.
    result = run_cli([*TINY_OVERRIDES, f"data.root={tiny_data}", f"out_dir={tmp_path / 'runs'}", "experiment=quick"])
    assert_one_line_error(result, "norm.virtual_batch=32 does not divide batch_size=8")
    assert not (tmp_path / "runs").exists()


def test_every_value_of_a_sweep_function_is_checked(refused, tmp_path):
    result = refused("-m", "batch_size=choice(8,0)")
    assert_one_line_error(result, "batch_size=0", "positive")
    assert not (tmp_path / "runs").exists()


def test_several_values_need_multirun(refused, tmp_path):
    assert_one_line_error(refused("norm=bn,gn"), "norm=bn,gn gives several values", "-m")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("flags, key", [([], "hydra.run.dir"), (["-m"], "hydra.sweep.dir")])
def test_hydra_output_folder_under_a_file(refused, tmp_path, flags, key):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert_one_line_error(refused(*flags, f"{key}={blocker}/out"), "cannot be written", f"set {key}=")


def test_report_on_path_without_runs(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "normbench.report", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "no runs found" in result.stderr


@pytest.fixture
def training_elsewhere(tmp_path, monkeypatch):
    """Another process registered as training (in a registry of this test's own)."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from normbench.cli import registered_as_training\n"
         "with registered_as_training():\n    print('ready', flush=True); time.sleep(120)"],
        cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "ready"
    yield holder
    holder.kill()
    holder.wait()


def test_training_registry_sees_live_runs_only(training_elsewhere):
    from normbench.cli import registered_as_training

    with registered_as_training() as others:
        assert others == [training_elsewhere.pid]
    training_elsewhere.kill()
    training_elsewhere.wait()
    with registered_as_training() as others:
        assert others == []  # a killed run's file is not a run


def test_warns_when_another_run_shares_the_cores(tiny_data, tmp_path, training_elsewhere, capsys):
    """A CPU run with torch's default threads beside a training one is told to set threads; with
    threads set it is not."""
    from omegaconf import OmegaConf

    from normbench.cli import warn_if_sharing_cores

    all_cores = str(len(os.sched_getaffinity(0)))
    result = run_cli([*TINY_OVERRIDES, f"data.root={tiny_data}", f"out_dir={tmp_path / 'runs'}"],
                     env_extra={"NORMBENCH_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": all_cores})
    assert result.returncode == 0, result.stderr
    warning = "another normbench process is training on this machine"
    assert warning in result.stderr and f"pid {training_elsewhere.pid}" in result.stderr
    assert "threads=" in result.stderr
    threads = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    try:
        warn_if_sharing_cores(OmegaConf.create({"threads": None, "device": "cpu"}), [training_elsewhere.pid])
    finally:
        torch.set_num_threads(threads)
    assert warning in capsys.readouterr().err
    warn_if_sharing_cores(OmegaConf.create({"threads": 1, "device": "cpu"}), [training_elsewhere.pid])
    warn_if_sharing_cores(OmegaConf.create({"threads": None, "device": "cpu"}), [])
    assert warning not in capsys.readouterr().err


@pytest.mark.parametrize("override", ["identity_ignores=[out_dir]", "data.identity_ignores=[]"])
def test_identity_ignores_is_not_a_setting(refused, override):
    """What conf/ declares outside a run's identity is read from conf/: an override would change nothing."""
    assert_one_line_error(refused(override), "identity_ignores is declared in conf/")
