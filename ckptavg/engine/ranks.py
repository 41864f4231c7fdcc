"""One average on many ranks, launched like a trainer: which rank this process is, from the environment
`torchrun` or `srun` gives it, and the process group (gloo: CPU ranks, small collectives) it joins.

    torchrun --nnodes N --nproc-per-node P -m ckptavg average ...     RANK, WORLD_SIZE, LOCAL_RANK,
                                                                       LOCAL_WORLD_SIZE, MASTER_ADDR/PORT
    srun -N N --ntasks-per-node P ckptavg average ...                  SLURM_PROCID, SLURM_NTASKS,
                                                                       SLURM_LOCALID, the step's first host

Without either (or with one rank) nothing changes: `from_environment` gives None.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import OptionError

TIMEOUT = datetime.timedelta(minutes=30)  # a rank waits this long for the others (a slow node, a big share)


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    local_rank: int
    local_world: int  # ranks on this node: they share its cores
    master_addr: str
    master_port: int


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise OptionError(f"{name}={env[name]!r} is not a number") from None


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: `node[03-05,09],gpu1` -> `node03`."""
    m = re.match(r"([^\[,]+)(?:\[([^\]\-,]+))?", nodelist)
    if m is None:
        raise OptionError(f"cannot read the Slurm node list {nodelist!r}")
    return m.group(1) + (m.group(2) or "")


def from_environment(env: Mapping[str, str] = os.environ) -> Ranks | None:
    """This process's place among the ranks of one average, or None when it runs alone."""
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (or any launcher of torch.distributed's kind)
        world = _int(env, "WORLD_SIZE")
        if world <= 1:
            return None
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in env:
                raise OptionError(f"RANK and WORLD_SIZE are set but {name} is not: launch with torchrun")
        return Ranks(_int(env, "RANK"), world, _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
                     _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else 1, env["MASTER_ADDR"],
                     _int(env, "MASTER_PORT"))
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and "SLURM_NTASKS" in env:  # a task of an srun step
        world = _int(env, "SLURM_NTASKS")
        if world <= 1:
            return None
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "localhost"
        per_node = re.match(r"\d+", env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_NTASKS_PER_NODE") or "1")
        port = env.get("MASTER_PORT") or str(20000 + _int(env, "SLURM_JOB_ID") % 20000 if "SLURM_JOB_ID" in env
                                              else 29500)
        return Ranks(_int(env, "SLURM_PROCID"), world, _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
                     int(per_node.group()) if per_node else 1, env.get("MASTER_ADDR") or first_host(nodes),
                     int(port))
    return None


class Group:
    """The ranks of one average, joined (gloo) for its few small collectives."""

    def __init__(self, ranks: Ranks) -> None:
        import torch.distributed as dist

        self.ranks, self.dist = ranks, dist
        if not dist.is_initialized():
            dist.init_process_group("gloo", init_method=f"tcp://{ranks.master_addr}:{ranks.master_port}",
                                    rank=ranks.rank, world_size=ranks.world, timeout=TIMEOUT)

    @property
    def rank(self) -> int:
        return self.ranks.rank

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        out: list[Any] = [None] * self.ranks.world
        self.dist.all_gather_object(out, value)
        return out

    def from_first(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank."""
        box = [value]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()
