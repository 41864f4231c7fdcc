"""One average on many ranks, launched like a trainer: which rank this process is, from the environment
`torchrun` or `srun` gives it, and the process group (gloo: CPU ranks, small collectives) it joins.

    torchrun --nnodes N --nproc-per-node P -m ckptavg average ...     RANK, WORLD_SIZE, LOCAL_RANK,
                                                                       LOCAL_WORLD_SIZE, MASTER_ADDR/PORT
    srun -N N --ntasks-per-node P ckptavg average ...                  SLURM_PROCID, SLURM_NTASKS,
                                                                       SLURM_LOCALID, the step's first host

Without either (or with one rank) nothing changes: `from_environment` gives None.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import OptionError, RankError

TIMEOUT_S = 300.0  # how long a rank may be silent (no heartbeat) before the others give up on it
_groups = 0  # groups this process has joined
_stores: dict[tuple, Any] = {}  # (address, port, prefix): this process's connection to the ranks' store


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    local_rank: int
    local_world: int  # ranks on this node: they share its cores
    master_addr: str
    master_port: int
    # torchrun's agent already serves a store at MASTER_ADDR:PORT (TORCHELASTIC_USE_AGENT_STORE): join it, under
    # a prefix of this attempt's own, instead of serving one from rank 0
    agent_store: str | None = None


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
        agent = (f"ckptavg/{env.get('TORCHELASTIC_RUN_ID', '')}/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
                 if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else None)
        return Ranks(_int(env, "RANK"), world, _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
                     _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else 1, env["MASTER_ADDR"],
                     _int(env, "MASTER_PORT"), agent)
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
    """The ranks of one average, joined (gloo) for its few small collectives, each rank beating a heartbeat
    into rank 0's store.

    A rank waits for the others (`wait`) as long as they live, however long their shares take, and no longer
    than `timeout` seconds after one falls silent: a SIGKILLed process or a lost node is noticed in bounded
    time, where a collective alone would wait its whole timeout, which would have to cover the longest share."""

    def __init__(self, ranks: Ranks, timeout: float = TIMEOUT_S) -> None:
        import torch.distributed as dist

        global _groups
        _groups += 1  # (every rank makes its groups in the same order: their keys never meet an earlier group's)
        self.ranks, self.dist, self.timeout = ranks, dist, timeout
        self.prefix = f"group{_groups}/"
        self.beat = min(max(timeout / 6, 0.2), 10.0)
        self._steps = 0
        self._stop = threading.Event()
        wait = datetime.timedelta(seconds=timeout)
        try:
            self.store = self._connect(ranks.rank == 0)
            self._beats = [f"beat/{r}" for r in range(ranks.world)]
            self.store.add(self._beats[ranks.rank], 1)
            self.store.wait(self._beats)  # every rank has joined (each beat exists, for multi_get)
            if not dist.is_initialized():
                dist.init_process_group("gloo", store=dist.PrefixStore("gloo/", self.store), rank=ranks.rank,
                                        world_size=ranks.world, timeout=wait)
        except RuntimeError as e:  # (torch's DistError and its kinds)
            raise RankError(f"rank {ranks.rank} could not join the other {ranks.world - 1} at "
                            f"{ranks.master_addr}:{ranks.master_port} within {timeout:g} s: {_first_line(e)}") from None
        self._beater = threading.Thread(target=self._beat_on, name="ckptavg-heartbeat", daemon=True)
        self._beater.start()

    def _connect(self, serve: bool, joining: bool = True) -> Any:
        """The ranks' store, under this group's prefix: served by rank 0 (`serve`), or torchrun's agent's. The
        connection of each rank `joining` is counted once and kept for the process's later groups (a new server
        on the same port would race the old one's shutdown); the heartbeat's own is neither."""
        ranks, wait, prefix = self.ranks, datetime.timedelta(seconds=self.timeout), self.prefix
        key = (ranks.master_addr, ranks.master_port, ranks.agent_store)
        store = _stores.get(key) if joining else None
        if store is None and ranks.agent_store is None:
            store = self.dist.TCPStore(ranks.master_addr, ranks.master_port, ranks.world if joining else None, serve,
                                       timeout=wait, wait_for_workers=joining)
        elif store is None:
            store = self.dist.TCPStore(ranks.master_addr, ranks.master_port, None, False, timeout=wait,
                                       wait_for_workers=False)
        if joining:
            _stores[key] = store
        return self.dist.PrefixStore((ranks.agent_store or "") + prefix, store)

    def _beat_on(self) -> None:
        store = self._connect(False, joining=False)
        while not self._stop.wait(self.beat):
            try:
                store.add(self._beats[self.ranks.rank], 1)
            except RuntimeError:
                return  # rank 0's store is gone: the main thread finds out at its next step

    @property
    def rank(self) -> int:
        return self.ranks.rank

    def __enter__(self) -> Group:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, tb: object) -> None:
        self.close(finished=error is None)

    def wait(self) -> None:
        """Until every rank has come this far; a `RankError` once one has been silent for `timeout` seconds.
        The last rank to come says so, and the others wake at once (a poll would add its period to every step)."""
        self._steps += 1
        world = self.ranks.world
        done = f"all-here/{self._steps}"
        heard: dict[int, tuple[bytes, float]] = {}
        try:
            if self.store.add(f"arrived/{self._steps}", 1) == world:
                self.store.set(done, b"1")
                return
            while True:
                try:
                    self.store.wait([done], datetime.timedelta(seconds=min(self.beat, 1.0)))
                    return
                except self.dist.DistStoreError:  # not yet: is every rank still there?
                    pass
                now = time.monotonic()
                for r, beat in enumerate(self.store.multi_get(self._beats)):
                    if r not in heard or heard[r][0] != beat:
                        heard[r] = (beat, now)
                    elif now - heard[r][1] > self.timeout:
                        raise RankError(f"rank {r} of {world} has been silent for {self.timeout:g} s (killed, or "
                                        f"its node lost): the others stopped")
        except RuntimeError as e:
            raise RankError(f"lost rank 0 (which holds the ranks' store): {_first_line(e)}") from None

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank (once all are there: `wait`)."""
        self.wait()
        out: list[Any] = [None] * self.ranks.world
        try:
            self.dist.all_gather_object(out, value)
        except RuntimeError as e:
            raise RankError(f"lost a rank while exchanging results: {_first_line(e)}") from None
        return out

    def from_first(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank."""
        self.wait()
        box = [value]
        try:
            self.dist.broadcast_object_list(box, src=0)
        except RuntimeError as e:
            raise RankError(f"lost a rank while hearing from rank 0: {_first_line(e)}") from None
        return box[0]

    def close(self, finished: bool = True) -> None:
        """Leave the group. Rank 0 holds the store the others still touch on their way out, so after a
        `finished` run it waits for every rank to say it is leaving (after a failure, briefly: a dead rank
        never says so, and the live ones are on their way out with their own errors)."""
        try:
            self.store.add("leaving", 1)
            if self.rank == 0:
                deadline = time.monotonic() + (self.timeout if finished else 2 * self.beat)
                while self.store.add("leaving", 0) < self.ranks.world and time.monotonic() < deadline:
                    time.sleep(0.02)
        except RuntimeError:
            pass  # (rank 0 gone: nothing left to tell it)
        self._stop.set()
        self._beater.join()
        if self.dist.is_initialized():
            self.dist.destroy_process_group()


def joined(ranks: Ranks | None, timeout: float = TIMEOUT_S):
    """The ranks' group for a command of several averages, joined once for all of them (a `Group`, or, run alone,
    a context of None)."""
    return Group(ranks, timeout) if ranks is not None else contextlib.nullcontext()


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
