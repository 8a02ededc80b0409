"""Data-parallel runs: which process this is, and the process group that joins a run's processes.

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for every process it
starts. The tasks of a SLURM job step started without torchrun (srun, submitit's SLURM tasks, and
submitit's local tasks) carry their scheduler's variables instead; `adopt_cluster_env` writes them
as torchrun's, so everything else reads one set (identity.world_size, tracking, the env://
initialization of the process group).

One process group per process: the runs of a sweep started under torchrun reuse it. Every helper
here is the identity in a single process. Torch-free at import.
"""

from __future__ import annotations

import atexit
import os
import random
from datetime import timedelta


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    """Processes of a data-parallel run; 1 otherwise."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def gpu_index() -> int:
    """This process's GPU: its local rank among the visible GPUs (all of the node's, or the one a
    scheduler bound to the task)."""
    import torch

    return local_rank() % torch.cuda.device_count()


def is_main() -> bool:
    """Whether this process writes the run's files (rank 0, or the only process)."""
    return rank() == 0


def launched_by_submitit() -> bool:
    """A submitit task runs exactly one job (one run), where torchrun's processes run a whole sweep."""
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def _cluster_job():
    """The scheduler's view of this task (submitit's JobEnvironment), or None outside a job step."""
    if launched_by_submitit():
        import submitit

        return submitit.JobEnvironment()
    if "SLURM_STEP_ID" in os.environ and "SLURM_PROCID" in os.environ:  # a task of srun
        from submitit.slurm.slurm import SlurmJobEnvironment

        return SlurmJobEnvironment()
    return None


def adopt_cluster_env() -> None:
    """Inside a job step of several tasks started without torchrun, export torchrun's variables
    (rank, world size, rendezvous address) from SLURM's / submitit's. A no-op elsewhere."""
    if "WORLD_SIZE" in os.environ:  # torchrun (or the user) said it already
        return
    job = _cluster_job()
    if job is None or job.num_tasks < 2:
        return
    # Every task of the job derives the same port from the job id (as submitit's helpers do).
    port = os.environ.get("MASTER_PORT") or str(random.Random(job.job_id).randint(20000, 60000))
    os.environ.update(
        MASTER_ADDR=os.environ.get("MASTER_ADDR") or ("127.0.0.1" if job.num_nodes == 1 else job.hostnames[0]),
        MASTER_PORT=port, RANK=str(job.global_rank), WORLD_SIZE=str(job.num_tasks),
        LOCAL_RANK=str(job.local_rank), LOCAL_WORLD_SIZE=str(job.num_tasks // job.num_nodes))


def is_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def init_process_group(timeout_s: float) -> None:
    """Join the run's processes (once per process): gloo for CPU tensors, NCCL for GPU tensors.

    The timeout bounds every collective: a rank whose peer died or hangs fails after it instead of
    waiting for ever (gloo notices a dead peer at once; NCCL only through this timeout)."""
    import torch
    import torch.distributed as dist

    if world_size() < 2 or is_initialized():
        return
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(gpu_index())  # one GPU per process, before NCCL makes its communicator
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    atexit.register(_destroy)


def _destroy() -> None:
    import torch.distributed as dist

    if is_initialized():
        dist.destroy_process_group()


def broadcast(value):
    """Rank 0's `value` on every rank (a picklable object; through gloo)."""
    if not is_initialized():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value) -> list | None:
    """Every rank's `value` (picklable, CPU tensors) as a list on rank 0, None on the others;
    [value] in a single process."""
    if not is_initialized():
        return [value]
    import torch.distributed as dist

    values = [None] * world_size() if is_main() else None
    dist.gather_object(value, values, dst=0)
    return values
