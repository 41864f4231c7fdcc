"""Checkpoints as DCP's own writer saves them for the tests: a tiny model's state, and a row-sharded
save from several gloo ranks (DTensor `Shard(0)`, the layout FSDP saves), run as

    python tests/dcpsave.py ROOT RANKS SEED [SEED ...]      # ROOT/stepSEED/ for each seed

With DCPSAVE_NO_COLLECTIVES=1 the ranks save without collectives (`use_collectives=False`): one metadata
file per rank (`__R.metadata`), no global `.metadata`. With DCPSAVE_COLUMNS=1 each tensor is sharded on its
last dimension (tensor parallelism's column shards) instead of its first.
"""

from __future__ import annotations

import os
import socket
import sys

import torch


def model_state(seed: int, rows: int = 48) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"model.blocks.0.attention.w_q.weight": torch.randn(rows, 32, generator=g),
            "model.blocks.0.norm.weight": torch.randn(32, generator=g),
            "model.embeddings.weight": torch.randn(100, 32, generator=g).bfloat16(),
            "model.blocks.0.mlp.w.weight": torch.randn(3, 5, 7, generator=g),
            "model.steps_seen": torch.tensor(seed * 10)}


SHARDED_ROWS = 47  # uneven over 3 ranks


def _worker(rank: int, world: int, port: int, root: str, seeds: list[int]) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    for seed in seeds:
        on = -1 if os.environ.get("DCPSAVE_COLUMNS") else 0
        sd = {k: distribute_tensor(v, mesh, [Shard(v.dim() - 1 if on < 0 else 0)]) if v.dim() else v
              for k, v in model_state(seed, SHARDED_ROWS).items()}
        sd["optim.state.model.blocks.0.norm.weight.exp_avg"] = distribute_tensor(torch.randn(32), mesh, [Shard(0)])
        dcp.save(sd, checkpoint_id=f"{root}/step{seed}", use_collectives=not os.environ.get("DCPSAVE_NO_COLLECTIVES"))
    dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = int(sys.argv[2])
    mp.spawn(_worker, args=(ranks, port, sys.argv[1], [int(a) for a in sys.argv[3:]]), nprocs=ranks)
