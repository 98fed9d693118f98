"""Several processes, one per GPU, started by torchrun: who am I, and what the others computed."""

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cars.errors import UserError


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Only the main process writes the run folder, prints and shows progress bars."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def gather(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Every process's tensors concatenated, in rank order (CPU tensors, any length per process)."""
        if self.size == 1:
            return list(tensors)
        parts = [None] * self.size
        dist.all_gather_object(parts, tensors)
        return [torch.cat([part[i] for part in parts]) for i in range(len(tensors))]

    def all(self, values: dict) -> list[dict]:
        """`values` of every process."""
        if self.size == 1:
            return [values]
        parts = [None] * self.size
        dist.all_gather_object(parts, values)
        return parts


def world_size() -> int:
    """How many processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_job(cfg, device_type: str) -> None:
    """What a torchrun job needs, checked before the processes join: a refused one must not leave the others waiting."""
    processes = world_size()
    if cfg.batch_size % processes:
        raise UserError(
            f"--batch-size {cfg.batch_size} is the global batch; it must divide evenly over {processes} processes"
        )
    if (
        cfg.skip_bad_images and cfg.cache == "off" and processes > 1
    ):  # only the cache knows the unreadable images in advance
        raise UserError(
            "--skip-bad-images under torchrun needs the preprocessing cache, which finds unreadable images before "
            "training so that every process skips the same steps; drop --cache off"
        )
    if cfg.sync_bn and processes > 1 and device_type != "cuda":
        raise UserError("--sync-bn needs CUDA (NCCL); on CPUs drop it")


def init_world(device_type: str) -> World:
    """The torchrun environment (WORLD_SIZE, RANK, LOCAL_RANK), or a world of one."""
    size = world_size()
    if size == 1:
        return World()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    # a process that dies makes the others fail within the timeout instead of waiting forever
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=10))
    return World(dist.get_rank(), size, local_rank)


def shutdown(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
