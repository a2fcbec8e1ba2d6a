"""Data parallel training across processes: SLURM tasks (srun, as submitit runs them) or torchrun.

    world = init(cuda)   # from the environment; World() (rank 0 of 1) for a single process
    ...
    world.close()

Every rank loads only its contiguous part of each global batch (trainer.batch_size images, same
order), augments it with the draws a one-process run makes for the whole batch (same (seed, epoch,
step) generator), and trains on it; DistributedDataParallel averages the gradients. So 1 and N processes see the same samples
with the same crops, and only the float summation order differs (except that N processes leave out an epoch's last
batch when it has fewer than N images: some rank would have none). Rank 0 alone writes results.json,
checkpoints and W&B.
"""
from __future__ import annotations

import gc
import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def part(self, n: int) -> slice:
        """This rank's contiguous part of n items (sizes differ by at most one, as tensor_split's)."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of a tensor (sizes differ by at most one)."""
        return x if self.size == 1 else x[self.part(len(x))]

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """In place: the sum over ranks."""
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def max_int(self, value: int, device) -> int:
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def close(self, completed: bool = False) -> None:
        """Leave the process group. After a completed run the ranks first wait for each other (not after
        a failure: a rank that died would never arrive), and objects that still hold the group (the DDP
        reducer is freed only by the garbage collector) are freed while the interpreter is whole. Once,
        in CI, a rank that had completed aborted at exit ("terminate called without an active
        exception"), as gloo's threads do when the group outlives destroy_process_group."""
        if self.size > 1 and dist.is_initialized():
            if completed:
                dist.barrier()
            gc.collect()
            dist.destroy_process_group()


def _first_host(nodelist: str) -> str:
    """The first host of a SLURM node list ("gpu[01-04]" -> "gpu01")."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                         timeout=30, check=True).stdout.split()
    return out[0]


def world_from_env(env=os.environ) -> tuple[World, dict]:
    """The process layout and the rendezvous variables torch.distributed's env:// needs."""
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (or a user's own launcher) set everything
        world = World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
        return world, {}
    # Inside an srun step (submitit runs every task through srun): one process per task.
    if int(env.get("SLURM_NTASKS", 1)) > 1 and "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        world = World(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
        nodelist = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
        rendezvous = {"MASTER_ADDR": env.get("MASTER_ADDR") or _first_host(nodelist),
                      # one port per job, the same after a requeue (the old processes are gone by then)
                      "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + int(env["SLURM_JOB_ID"]) % 20000),
                      "RANK": str(world.rank), "WORLD_SIZE": str(world.size), "LOCAL_RANK": str(world.local_rank)}
        return world, rendezvous
    return World(), {}


def init(cuda: bool) -> World:
    """Join the process group when there is more than one process (NCCL on GPUs, gloo on CPUs)."""
    world, rendezvous = world_from_env()
    if world.size == 1:
        return world
    os.environ.update(rendezvous)
    if cuda:
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method="env://", rank=world.rank,
                            world_size=world.size)
    return world
