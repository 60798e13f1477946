"""Process-group set-up for `torchrun` launches (single process when not launched by it)."""
from __future__ import annotations

import gc
import hashlib
import os
import sys
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False  # we created the process group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0, what: str = "train.device") -> torch.device:
    """``name`` ("auto", "cpu", "cuda", "cuda:K", ...) as a device; ``what`` names the option in errors."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{what}: unknown device {name!r} (auto, cpu, cuda or cuda:K)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what}: {name!r} requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


def setup(device: str = "auto", what: str = "train.device") -> DistInfo:
    """Join the process group described by torchrun's environment (WORLD_SIZE > 1), else run alone.

    Backend: nccl on CUDA, gloo on CPU. Multi-node works through torchrun's rendezvous.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank, what)
    if world <= 1:
        return DistInfo(device=dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    here = False
    if not dist.is_initialized():
        # Import it while group.WORLD is still None. Its functions take `group=group.WORLD` defaults, evaluated
        # at import; torch imports it lazily (torch._dynamo -> fsdp -> _shard, on the first model forward), and
        # imported after init_process_group those defaults hold the live group, so destroy_process_group could
        # not free it (see teardown).
        import torch.distributed.nn.functional  # noqa: F401

        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
        here = True
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                    device=dev, initialized_here=here)


def teardown(info: DistInfo, sync: bool = True) -> None:
    """Leave and free the process group; call it on every rank and every exit path (in a ``finally``).

    ``sync``: meet the other ranks at a barrier first, so no rank closes its
    connections while a peer may still be talking to it. Pass False on an
    error path, where the peers may never reach the barrier.

    ``destroy_process_group`` only drops torch's own references: the gloo
    group (its ``gloo_tcp_loop`` and ``pt_gloo_runloop`` threads, its sockets)
    lives on while anything else holds it (a DDP wrapper, default arguments
    captured at import). It was then freed during interpreter shutdown, and a
    gloo worker thread dropping the last reference to a collective's tensor
    there must take the GIL of a finalizing interpreter: CPython ends that
    thread with pthread_exit, whose unwinding through a noexcept C++
    destructor calls std::terminate -> SIGABRT. So the group is freed here,
    while Python is fully alive, and a warning says when something still
    keeps it (callers drop their DDP wrappers before this).
    """
    if not (info.initialized_here and dist.is_initialized()):
        return
    group, clean = dist.group.WORLD, False
    try:
        if sync and info.distributed:
            dist.barrier()
        clean = sync  # (on an error path, the exception's traceback may still hold the group for a while)
    finally:
        dist.destroy_process_group()
        gc.collect()  # reference cycles (DDP's among them) that may still hold the group
        others = sys.getrefcount(group) - _local_refcount()  # references beyond this local variable
        del group  # the last reference: the backend joins its threads and closes its sockets now
        if others > 0 and clean:
            warnings.warn(f"the process group is still referenced {others} time(s) after destroy_process_group: "
                          "its gloo threads outlive teardown (a rank can abort at exit)", RuntimeWarning, stacklevel=2)


def _local_refcount() -> int:
    """What ``sys.getrefcount`` reports for an object held by one local variable (it varies across Pythons)."""
    obj = object()
    return sys.getrefcount(obj)


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True when ``flag`` is true on any rank (so all ranks stop at the same step)."""
    if not info.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def max_over_ranks(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Element-wise maximum of ``t`` over ranks (in place; ``t`` itself when alone): flags any rank raised."""
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def sum_over_ranks(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Element-wise sum of ``t`` over ranks (in place; ``t`` itself when alone): NaN or inf on any rank stays."""
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def mean_over_ranks(values: list[float], info: DistInfo) -> list[float]:
    if not info.distributed or not values:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return (t / info.world_size).tolist()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


@torch.no_grad()
def fingerprint(model: torch.nn.Module) -> str:
    """Short digest of all parameter values (bitwise: equal digests mean equal weights, practically)."""
    h = hashlib.sha1()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def check_ranks_agree(model: torch.nn.Module, info: DistInfo) -> list[str]:
    """Every rank's weight fingerprint; raises if the ranks' models have diverged."""
    fp = fingerprint(model)
    if not info.distributed:
        return [fp]
    found: list = [None] * info.world_size
    dist.all_gather_object(found, fp)
    if len(set(found)) > 1:
        raise RuntimeError(f"DDP ranks hold different weights (fingerprints {found})")
    return found
