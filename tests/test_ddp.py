"""Data-parallel runs on the CPU (gloo): torchrun, submitit's local tasks, synchronized BN, exact
resume of a killed 2-process run, a crashing rank. Two processes share the machine's cores."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from normbench.cli import run_job
from tests.conftest import REPO, TINY_OVERRIDES, make_image_folder
from tests.test_train import read_metrics, scalars

RUN_DIR = "cnn/{norm}/bs4x2dev/lr0.1/ep1/seed0"  # per-device batch 4 on 2 devices


def torchrun(args: list[str], env: dict, timeout: int = 240, script: list[str] | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 -m normbench ARGS` (or a script), one CPU thread per process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *(script or ["-m", "normbench"]), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "NORMBENCH_NO_DOWNLOAD": "1", "OMP_NUM_THREADS": "1", **env})


def cli_args(data_root, out_dir, *extra) -> list[str]:
    return [*TINY_OVERRIDES, f"data.root={data_root}", f"out_dir={out_dir}", "batch_size=4", "dist_timeout_s=60", *extra]


def bn_buffers(state: dict, kind: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.endswith(kind)}


def assert_one_set_of_logs(run_dir: Path) -> dict:
    files = sorted(p.name for p in run_dir.iterdir() if p.is_file())
    assert len([f for f in files if f.startswith("events.out.tfevents")]) == 1, files
    assert not [f for f in files if f.startswith("error") or f.endswith(".tmp")], files
    assert {"metrics.csv", "summary.json", "checkpoint.pt"} <= set(files), files
    return json.loads((run_dir / "summary.json").read_text())


# ---------------------------------------------------------------------------------- the data


def test_the_ranks_slices_are_the_global_batch_and_their_shards_the_test_set():
    from normbench import data

    split = data.Split(torch.randint(0, 256, (22, 3, 32, 32), dtype=torch.uint8), torch.arange(22))
    whole = data.Batches(split, 6, "cpu", train=True, seed=3)
    ranks = [data.Batches(split, 3, "cpu", train=True, seed=3, rank=r, world_size=2) for r in (0, 1)]
    assert len(whole) == len(ranks[0]) == 3  # global batch 6; the incomplete rest is dropped
    for epoch in (0, 1):
        for (x, y), *slices in zip(whole.epoch(epoch), *(r.epoch(epoch) for r in ranks)):
            assert torch.equal(x, torch.cat([xs for xs, _ in slices])) and torch.equal(y, torch.cat([ys for _, ys in slices]))
        resumed = [b for b in ranks[1].epoch(epoch, start=2)]  # exact resume inside an epoch
        assert torch.equal(resumed[0][1], list(ranks[1].epoch(epoch))[2][1])
    shards = [data.Batches(split, 4, "cpu", train=False, rank=r, world_size=2) for r in (0, 1)]
    labels = sorted(int(v) for shard in shards for _, ys in shard.epoch() for v in ys)
    assert labels == list(range(22))  # every test image exactly once


# ---------------------------------------------------------------------------------- the layer


def _layer_worker(rank: int, store_file: str, world: int = 2) -> None:
    """Each rank normalizes its half of one batch with sync=True; the result must be BN's (BRN's) on the
    whole batch in one process: outputs, input and weight gradients, running statistics."""
    from normbench.norms import build_norm, precise_bn_update, set_training_length

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)
        channels, per_rank = 6, 4
        x_all = 2.0 + 3.0 * torch.randn(world * per_rank, channels, 5, 5, generator=g)
        upstream = torch.randn(x_all.shape, generator=g)  # a loss that weights every output differently
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        options = {"brn": {"relax_unit": "steps", "relax_start": 0, "r_relax": 0, "d_relax": 0, "r_max": 1.5, "d_max": 0.5}}
        for name in ("bn", "brn"):
            layers = {sync: set_training_length(build_norm(name, channels, sync=sync, **options.get(name, {})), 10)
                      for sync in (True, False)}
            for layer in layers.values():
                with torch.no_grad():
                    layer.weight.copy_(torch.linspace(0.5, 1.5, channels))
                    layer.bias.copy_(torch.linspace(-1, 1, channels))
            reference = set_training_length(build_norm(name, channels, **options.get(name, {})), 10)
            reference.load_state_dict(layers[True].state_dict())
            for step in range(2):  # BRN's second step corrects towards the first step's running statistics
                x_ref = (x_all + step).requires_grad_()
                reference.zero_grad()
                y_ref = reference(x_ref)
                (y_ref * upstream).sum().backward()
                for sync, layer in layers.items():
                    x = (x_all[mine] + step).requires_grad_()
                    layer.zero_grad()
                    y = layer(x)
                    (y * upstream[mine]).sum().backward()
                    weight_grad = layer.weight.grad.clone()
                    dist.all_reduce(weight_grad)  # what DDP's gradient average does (times the rank count)
                    same = (torch.allclose(y, y_ref[mine].detach(), atol=1e-5)
                            and torch.allclose(x.grad, x_ref.grad[mine], atol=1e-5)
                            and torch.allclose(weight_grad, reference.weight.grad, atol=1e-4)
                            and torch.allclose(layer.running_mean, reference.running_mean, atol=1e-6)
                            and torch.allclose(layer.running_var, reference.running_var, atol=1e-5))
                    # Without sync each rank normalizes its own half: not the whole batch's BN.
                    assert same == sync, (name, step, sync)
        # PreciseBN: the population statistics of every rank's batches.
        precise = {sync: build_norm("bn", channels, sync=sync) for sync in (True, False)}
        precise_bn_update(precise[True], [x_all[mine]], 1)
        precise_bn_update(precise[False], [x_all], 1)
        torch.testing.assert_close(precise[True].running_mean, precise[False].running_mean)
        torch.testing.assert_close(precise[True].running_var, precise[False].running_var)
        # With a virtual batch each group keeps its own statistics: sync changes nothing.
        ghost = {sync: build_norm("bn", channels, sync=sync, virtual_batch=2) for sync in (True, False)}
        outputs = [layer(x_all[mine]) for layer in ghost.values()]
        assert torch.equal(outputs[0], outputs[1])
    finally:
        dist.destroy_process_group()


def test_sync_layer_forward_and_backward_on_two_ranks_equal_bn_on_the_whole_batch(tmp_path):
    mp.spawn(_layer_worker, args=(str(tmp_path / "store"),), nprocs=2)


def test_sync_in_a_single_process_is_the_unsynchronized_norm(make_cfg, capsys):
    from normbench.norms import build_norm

    x = torch.randn(8, 4, 3, 3)
    assert torch.equal(build_norm("bn", 4, sync=True)(x), build_norm("bn", 4)(x))
    record = run_job(make_cfg("norm=bn", "norm.sync=true"))
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "norm.sync=true in a single process" in warnings[0]
    assert record["norm_label"] == "bn-syncTrue" and record["norm_batch"] == 8 and record["devices"] == 1


# ---------------------------------------------------------------------------------- torchrun


def test_torchrun_bn_and_sync_bn(tiny_data, tmp_path, make_cfg):
    """Two processes, one epoch: one set of logs per run; synchronized BN's running statistics are the same
    on both ranks and those of one process on the whole batch; plain BN's differ between the ranks, and
    their mean is ghost BN's (virtual_batch = the per-device batch) in one process."""
    out = tmp_path / "ddp"
    result = torchrun(["-m", *cli_args(tiny_data, out, "norm=bn", "norm.sync=false,true")],
                      env={"NORMBENCH_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("epoch 1/1") == 2  # rank 0 alone logs
    summaries = {norm: assert_one_set_of_logs(out / RUN_DIR.format(norm=norm)) for norm in ("bn", "bn-syncTrue")}
    for norm, record in summaries.items():
        assert record["status"] == "completed" and record["devices"] == 2 and record["batch_size"] == 4
        assert record["test_size"] == 80 and record["train_size"] == 160  # each image once over the ranks
        assert record["lr_effective"] == pytest.approx(0.1 * 8 / 128)  # the global batch's rate
        assert record["norm_batch"] == (8 if norm == "bn-syncTrue" else 4)
        assert len(read_metrics(out / RUN_DIR.format(norm=norm))) == 1
    ckpt = {norm: torch.load(out / RUN_DIR.format(norm=norm) / "checkpoint.pt", weights_only=True)
            for norm in summaries}

    # One process on the whole (global) batch, and ghost BN with the per-device batch as virtual batch.
    single, single_ckpt = {}, {}
    for name, overrides in (("whole", []), ("ghost", ["norm.virtual_batch=4"])):
        cfg = make_cfg("norm=bn", "batch_size=8", *overrides, out_dir=tmp_path / "single")
        single[name] = run_job(cfg)
        single_ckpt[name] = torch.load(tmp_path / "single" / cfg.run_name / "checkpoint.pt", weights_only=True)["model"]

    # 20 steps of float32 training apart, rounding may flip a max-pool choice here and there (about 1e-4
    # apart then); the per-rank statistics of plain BN differ from the whole batch's by about 0.1.
    close = {"rtol": 0, "atol": 3e-3}
    for kind in ("running_mean", "running_var"):
        rank0, rank1 = (bn_buffers(r["buffers"], kind) for r in ckpt["bn-syncTrue"]["ranks"])
        assert rank0 and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
        for k, v in bn_buffers(single_ckpt["whole"], kind).items():
            torch.testing.assert_close(rank0[k], v, **close)

        rank0, rank1 = (bn_buffers(r["buffers"], kind) for r in ckpt["bn"]["ranks"])
        assert all(not torch.allclose(rank0[k], rank1[k], **close) for k in rank0)
        for k, v in bn_buffers(single_ckpt["ghost"], kind).items():
            torch.testing.assert_close((rank0[k] + rank1[k]) / 2, v, **close)
    # The checkpoint's model is rank 0's.
    assert all(torch.equal(ckpt["bn"]["model"][k], v) for k, v in ckpt["bn"]["ranks"][0]["buffers"].items())
    # Same global batches, same rate: the synchronized run trains like one process on the whole batch.
    assert summaries["bn-syncTrue"]["train_loss"] == pytest.approx(single["whole"]["train_loss"], rel=1e-3)
    assert summaries["bn"]["train_loss"] == pytest.approx(single["ghost"]["train_loss"], rel=1e-3)


@pytest.mark.slow  # submitit spawns and polls two tasks; make test-all
def test_submitit_local_job_with_two_tasks_is_one_data_parallel_run(tiny_data, tmp_path):
    """hydra/launcher=local_ddp: submitit starts 2 tasks per job as SLURM would (no torchrun); they join
    one process group from submitit's environment and train one run."""
    out = tmp_path / "sweep"
    result = subprocess.run([sys.executable, "-m", "normbench", "-m", *cli_args(tiny_data, out, "norm=bn", "norm.sync=true"),
                             "hydra/launcher=local_ddp", "hydra.launcher.timeout_min=5"],
                            cwd=REPO, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "NORMBENCH_NO_DOWNLOAD": "1", "OMP_NUM_THREADS": "1",
                                 "NORMBENCH_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    record = assert_one_set_of_logs(out / RUN_DIR.format(norm="bn-syncTrue"))
    assert record["status"] == "completed" and record["devices"] == 2 and record["norm_batch"] == 8
    ranks = torch.load(out / RUN_DIR.format(norm="bn-syncTrue") / "checkpoint.pt", weights_only=True)["ranks"]
    assert len(ranks) == 2


# ---------------------------------------------------------------------------------- resume, failures


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid` (torchrun starts its workers in sessions of their own)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            children.append(int(stat.parent.name))
    return children


@pytest.mark.slow  # three two-process runs; exact resume is also tested in one process by make test
def test_killed_two_process_run_resumes_to_the_metrics_of_an_uninterrupted_one(tmp_path):
    """Batch Renorm: its training forward uses each rank's own running statistics, so an exact resume
    needs every rank's (the checkpoint holds them), not just rank 0's."""
    data_root = make_image_folder(tmp_path / "data", n_train=20, n_test=8)  # 200 images: 50 steps per epoch
    env = {"NORMBENCH_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "runs"
    args = cli_args(data_root, out, "norm=brn", "batch_size=2", "epochs=2", "log_every=10", "stat_gap_every=0",
                    "ckpt_every=20")
    run_dir, straight_dir = (out / f"cnn/brn/bs2x2dev/lr0.1/ep2/{variant}/seed0" for variant in ("killed", "straight"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "normbench",
           *args, "variant=killed"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **env, "NORMBENCH_NO_DOWNLOAD": "1", "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Kill both ranks and torchrun right after a checkpoint inside epoch 2 (step > 50).
        deadline, seen = time.time() + 180, None
        while time.time() < deadline and proc.poll() is None:
            ckpt = run_dir / "checkpoint.pt"
            mtime = ckpt.stat().st_mtime_ns if ckpt.exists() else None
            if mtime != seen:
                seen = mtime
                try:
                    if torch.load(ckpt, weights_only=True)["run"]["step"] > 50:
                        break
                except (OSError, RuntimeError, EOFError):  # replaced while read: look again
                    seen = None
            time.sleep(0.01)
        assert proc.poll() is None, "the run finished before it could be killed"
    finally:
        for pid in [*child_pids(proc.pid), proc.pid]:
            os.kill(pid, signal.SIGKILL)
        proc.wait()
    time.sleep(0.5)
    assert not (run_dir / "summary.json").exists()

    # One sweep resumes the killed run and trains the same run uninterrupted (variant is only a label).
    result = torchrun(["-m", *args, "variant=killed,straight"], env)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed_at = re.search(r"resuming .* from epoch (\d+) batch (\d+)", result.stdout)
    assert resumed_at and resumed_at.groups() != ("1", "0"), result.stdout  # inside epoch 2

    a = json.loads((run_dir / "summary.json").read_text())
    b = json.loads((straight_dir / "summary.json").read_text())
    for key in ("test_acc", "best_test_acc", "test_loss", "train_loss", "train_acc", "epochs_done", "steps_done"):
        assert a[key] == b[key], key
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(read_metrics(run_dir)) == drop(read_metrics(straight_dir))
    assert [s for s, _ in scalars(run_dir)["test/acc"]] == [200, 400]  # one point per epoch, none twice


CRASH_RANK_1 = """
import os
import normbench.train as train
if os.environ["RANK"] == "1":
    def crash(self, bar=None):
        raise RuntimeError("injected crash")
    train.Run.train_epoch = crash
from normbench.cli import main
main()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_crashing_rank_ends_the_job_with_a_recorded_failure(tiny_data, tmp_path):
    """Two ranks started without torchrun (as a scheduler starts tasks), so nothing stops rank 0 for it:
    rank 1 crashes and records why; rank 0 fails on the broken connection instead of waiting, and
    keeps rank 1's record."""
    script = tmp_path / "crash_rank_1.py"
    script.write_text(CRASH_RANK_1)
    env = {**os.environ, "NORMBENCH_NO_DOWNLOAD": "1", "OMP_NUM_THREADS": "1", "NORMBENCH_CACHE": str(tmp_path / "cache"),
           "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    ranks = [subprocess.Popen([sys.executable, str(script), *cli_args(tiny_data, tmp_path / "runs", "norm=bn")],
                              cwd=REPO, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    try:
        outputs = [rank.communicate(timeout=120) for rank in ranks]  # no hang
    finally:
        for rank in ranks:
            rank.kill()
    assert [rank.returncode for rank in ranks] == [1, 1], outputs
    run_dir = tmp_path / "runs" / RUN_DIR.format(norm="bn")
    record = json.loads((run_dir / "summary.json").read_text())
    assert record["status"] == "failed" and record["reason"] == "rank 1: RuntimeError: injected crash"
    assert "injected crash" in (run_dir / "error.rank1.log").read_text()
    assert (run_dir / "error.rank0.log").exists()  # rank 0's own error: the lost peer
