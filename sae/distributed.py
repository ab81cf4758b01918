"""Several processes through torch.distributed, launched by ``torchrun`` (one per GPU).

    torchrun --nproc_per_node 8 train.py configs/llama3.1-8b-topk.yaml
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_backend c10d \
        --rdzv_endpoint host0:29500 train.py ...          # and node_rank 1 on the other node

``torchrun`` sets RANK, WORLD_SIZE and LOCAL_RANK; ``Dist.from_env`` reads them, joins the
group (NCCL on GPUs, gloo on CPUs) with ``distributed.timeout_s`` as the collective
timeout, and binds each process to GPU LOCAL_RANK. Without torchrun (WORLD_SIZE unset or
1) everything runs as one process and no collective is ever called.

What the ranks share depends on ``distributed.mode`` (sae.training.trainer and sae.training.run use these):

* data: each rank harvests every world-th context (``Shard``); SAEs are replicated; the
  loss is normalised by the global batch (its token count and total variance) and the
  gradients are summed, so one step equals a one-process step on the union of the batches.
* hooks: each rank harvests its share too, but trains only the SAEs of 1/N of the hook
  points, on each of their batches gathered whole from all ranks.
* latents: every TopK SAE split by latents; each rank trains its slice on the whole
  batch (``sae.architectures.sharded_topk``).

Only rank 0 prints, logs and writes checkpoints (and SAEs, except in hooks mode, where each
rank writes its own); a checkpoint holds every rank's data position.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from sae.errors import DistributedError


@dataclass(frozen=True)
class Shard:
    """This process's share of the context stream: contexts i with i % world == rank."""

    rank: int
    world: int

    def label(self) -> str:
        return f"rank{self.rank}-of-{self.world}"

    def rows(self, batch_tokens: int) -> int:
        """This process's rows of each batch of ``batch_tokens`` (train.batch_tokens, the
        whole batch; a run refuses one that does not split evenly)."""
        return batch_tokens // self.world


@dataclass
class Dist:
    """This process's place among the run's processes (world 1: a plain single process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> Shard | None:
        return Shard(self.rank, self.world) if self.active else None

    @classmethod
    def from_env(cls, timeout_s: int = 600, device: str = "auto") -> Dist:
        """Join the process group torchrun describes in the environment (if any)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = (
            torch.cuda.is_available() and device in ("auto", "cuda") or device.startswith("cuda")
        )
        if use_cuda:
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            join_group(
                "nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s)
            )
        return cls(rank, world, local_rank)

    def device_setting(self, device: str) -> str:
        """model.device for this rank: each process gets its own GPU."""
        if not self.active or not torch.cuda.is_available() or device not in ("auto", "cuda"):
            return device
        return f"cuda:{self.local_rank}"

    # ---- collectives (no-ops for one process) -----------------------------------------------

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In place: the sum of ``t`` over ranks."""
        if self.active:
            collective(dist.all_reduce, t, op=dist.ReduceOp.SUM)
        return t

    def min_(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            collective(dist.all_reduce, t, op=dist.ReduceOp.MIN)
        return t

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            collective(dist.all_reduce, t, op=dist.ReduceOp.MAX)
        return t

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """[world * n, ...]: every rank's ``x`` [n, ...] (same shape on all), rank order."""
        if not self.active:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        collective(dist.all_gather, parts, x.contiguous())
        return torch.cat(parts)

    def gather_to(self, x: torch.Tensor, dst: int) -> torch.Tensor | None:
        """On rank ``dst``: every rank's ``x`` [n, ...] concatenated in rank order; None elsewhere."""
        if not self.active:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)] if self.rank == dst else None
        collective(dist.gather, x.contiguous(), parts, dst=dst)
        return torch.cat(parts) if parts is not None else None

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj`` (JSON-able), rank order."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        collective(dist.all_gather_object, out, obj)
        return out

    def agree(self, flag: bool) -> bool:
        """True on every rank if it is true on any (a stop request, an error)."""
        if not self.active:
            return flag
        t = torch.tensor([int(flag)], device=self._device())
        self.max_(t)
        return bool(t.item())

    def barrier(self) -> None:
        if self.active:
            collective(dist.barrier)

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()

    def _device(self) -> torch.device:
        return (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend() == "nccl"
            else torch.device("cpu")
        )


def join_group(backend: str, **kwargs) -> None:
    """``dist.init_process_group(backend, **kwargs)``, arranged so that ``close`` really ends it.

    torch._dynamo, imported lazily by the first optimizer a trainer makes, keeps a
    reference to a process group that exists when it is imported. destroy_process_group
    then leaves that group and its native threads (gloo's ``gloo_tcp_loop`` and
    ``pt_gloo_runloop``) alive until interpreter shutdown, where tearing them down aborted
    processes at random ("terminate called without an active exception", SIGABRT).
    Imported first, it holds no group, and closing the group stops its threads
    (tests/test_distributed.py checks that none is left).
    """
    import torch._dynamo  # noqa: F401 - imported for its side effect, see above

    dist.init_process_group(backend, **kwargs)


def native_threads(prefix: str) -> list[str]:
    """Names of this process's threads (Linux: /proc/self/task) that start with ``prefix``."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return []
    names = []
    for task in tasks.iterdir():
        with contextlib.suppress(OSError):  # a thread may end while we look
            names.append((task / "comm").read_text().strip())
    return [n for n in names if n.startswith(prefix)]


def collective(fn, *args, **kwargs):
    """Run a collective; a rank that died or timed out becomes one line, not a hang or a trace."""
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, dist.DistError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise DistributedError(
            f"rank {dist.get_rank()}: another process stopped or timed out "
            f"(distributed.timeout_s); {first}"
        ) from None


def sharded(items: list, world: int, what: str) -> None:
    """Refuse a split of ``items`` that is not even across ``world`` ranks."""
    if len(items) % world:
        raise DistributedError(
            f"distributed.mode: {len(items)} {what} do not divide evenly over {world} processes; "
            f"use a process count that divides {len(items)}"
        )
