"""torch.distributed glue: rank, world size, collectives and sharding; every helper is a no-op in one process.

Launch any script that calls influencer under ``torchrun`` and initialise the group first::

    import influencer.distributed as dist
    dist.init()                      # env:// rendezvous (torchrun sets it); gloo on CPU, NCCL with CUDA
    model.to(dist.local_device())
    curv = inf.fit_curvature(model, task, train)   # each rank fits its share; every rank gets the result

Outside a process group (plain ``python``), ``rank()`` is 0, ``world_size()`` is 1, collectives return their
input unchanged and ``barrier()`` returns at once, so library code calls them unconditionally.

Objects travel between ranks as JSON and tensors as safetensors bytes (never pickle).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as tdist
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------------
# Who am I
# --------------------------------------------------------------------------------------------------------


def is_distributed() -> bool:
    """True inside an initialised process group (of any size)."""
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    """The rank within this node (``LOCAL_RANK`` set by torchrun), 0 otherwise."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def init(backend: str | None = None, **kwargs: Any) -> bool:
    """Join the process group described by the environment (torchrun's ``env://``) if there is one.

    backend: None → "nccl" when CUDA is available, else "gloo". Returns True when a group of more than one
    process is (now) initialised; does nothing (returns False) when ``WORLD_SIZE`` is unset or 1.
    """
    if is_distributed():
        return world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_device())
    tdist.init_process_group(backend=backend, **kwargs)
    return True


def shutdown() -> None:
    """Leave the process group (no-op outside one)."""
    if is_distributed():
        tdist.destroy_process_group()


# --------------------------------------------------------------------------------------------------------
# Sharding
# --------------------------------------------------------------------------------------------------------


def shard_range(start: int, stop: int, *, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """This rank's contiguous share of [start, stop): equal parts, the first ones one larger if uneven."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    n = max(0, stop - start)
    base, extra = divmod(n, w)
    lo = start + r * base + min(r, extra)
    return lo, lo + base + (r < extra)


def assign(costs: list[float], world: int | None = None) -> list[int]:
    """Spread jobs over ranks, largest first onto the least-loaded rank; the owner rank of each job.

    Deterministic (ties by job order, then rank), so every rank computes the same assignment.
    """
    w = world_size() if world is None else world
    load = [0.0] * w
    owner = [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(w), key=lambda i: (load[i], i))
        owner[j] = r
        load[r] += costs[j]
    return owner


# --------------------------------------------------------------------------------------------------------
# Collectives (no-ops in one process)
# --------------------------------------------------------------------------------------------------------


def _comm_device() -> torch.device:
    """Where collectives need their tensors: the current CUDA device for NCCL, the CPU otherwise."""
    if tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _collective_(tensor: torch.Tensor, op: Callable[[torch.Tensor], Any]) -> torch.Tensor:
    dev = _comm_device()
    if tensor.device == dev and tensor.is_contiguous():
        op(tensor)
        return tensor
    buf = tensor.detach().to(dev).contiguous()
    op(buf)
    tensor.copy_(buf)
    return tensor


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (every rank gets the same sum); returns it."""
    if not is_distributed() or world_size() == 1:
        return tensor
    return _collective_(tensor, lambda t: tdist.all_reduce(t, op=tdist.ReduceOp.SUM))


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` on every rank with rank ``src``'s values in place; returns it."""
    if not is_distributed() or world_size() == 1:
        return tensor
    return _collective_(tensor, lambda t: tdist.broadcast(t, src=src))


def barrier() -> None:
    if is_distributed() and world_size() > 1:
        if tdist.get_backend() == "nccl":
            tdist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            tdist.barrier()


def _gather_bytes(payload: bytes) -> list[bytes]:
    """Every rank's byte string, in rank order, on every rank."""
    dev = _comm_device()
    data = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.zeros(0, dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    tdist.all_gather(sizes, size)
    longest = max(int(s) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=dev)
    padded[: data.numel()] = data.to(dev)
    chunks = [torch.zeros_like(padded) for _ in range(world_size())]
    tdist.all_gather(chunks, padded)
    return [c[: int(s)].cpu().numpy().tobytes() for c, s in zip(chunks, sizes, strict=True)]


def _broadcast_bytes(payload: bytes | None, src: int) -> bytes:
    dev = _comm_device()
    size = torch.tensor([len(payload) if rank() == src and payload is not None else 0], dtype=torch.int64, device=dev)
    tdist.broadcast(size, src=src)
    buf = torch.zeros(int(size), dtype=torch.uint8, device=dev)
    if rank() == src and payload:
        buf.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(dev))
    tdist.broadcast(buf, src=src)
    return buf.cpu().numpy().tobytes()


def all_gather_object(obj: Any) -> list[Any]:
    """A JSON-serialisable object from every rank, in rank order (``[obj]`` in one process)."""
    if not is_distributed() or world_size() == 1:
        return [obj]
    return [json.loads(b.decode()) for b in _gather_bytes(json.dumps(obj).encode())]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s JSON-serialisable object on every rank (``obj`` itself in one process)."""
    if not is_distributed() or world_size() == 1:
        return obj
    payload = json.dumps(obj).encode() if rank() == src else None
    return json.loads(_broadcast_bytes(payload, src).decode())


def _pack(tensors: dict[str, torch.Tensor]) -> bytes:
    return _st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}) if tensors else b""


def _unpack(payload: bytes) -> dict[str, torch.Tensor]:
    return dict(_st_load(payload)) if payload else {}


def all_gather_tensors(tensors: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """A dict of (CPU) tensors from every rank, in rank order; keys and shapes may differ between ranks."""
    if not is_distributed() or world_size() == 1:
        return [tensors]
    return [_unpack(b) for b in _gather_bytes(_pack(tensors))]


def broadcast_tensors(tensors: dict[str, torch.Tensor] | None, src: int = 0) -> dict[str, torch.Tensor]:
    """Rank ``src``'s dict of tensors on every rank (as CPU tensors; other ranks may pass None)."""
    if not is_distributed() or world_size() == 1:
        assert tensors is not None
        return tensors
    return _unpack(_broadcast_bytes(_pack(tensors) if rank() == src and tensors is not None else None, src))


# --------------------------------------------------------------------------------------------------------
# Control flow
# --------------------------------------------------------------------------------------------------------


class RankFailedError(RuntimeError):
    """Raised on every other rank when a :func:`run_collectively` block failed on ``rank`` (which raises its own
    error): the echo of a failure reported elsewhere."""

    def __init__(self, rank: int, message: str):
        super().__init__(f"rank {rank} failed: {message}")
        self.rank, self.message = rank, message


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. to build a cache), the others after it (a barrier on each side)."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def only_main(fn: Callable[..., T]) -> Callable[..., T | None]:
    """Decorator: run ``fn`` on rank 0 only (other ranks get None); no barrier."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T | None:
        return fn(*args, **kwargs) if is_main() else None

    return wrapper


def run_collectively(fn: Callable[[], T], *, main_only: bool = True) -> T | None:
    """Run ``fn`` (on rank 0 only when ``main_only``); if it raises anywhere, every rank raises.

    Use around file-system work that one rank does while the others would otherwise wait in a collective. The
    failing rank raises its own exception, the others :class:`RankFailedError`.
    """
    result: T | None = None
    error: BaseException | None = None
    if is_main() or not main_only:
        try:
            result = fn()
        except Exception as e:  # re-raised below, on every rank
            error = e
    if not is_distributed() or world_size() == 1:
        if error is not None:
            raise error
        return result
    reports = all_gather_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    for r, msg in enumerate(reports):
        if msg is not None:
            raise RankFailedError(r, msg)
    return result


@contextlib.contextmanager
def locked(
    directory: str | os.PathLike, *, purpose: str = "run", name: str | None = None, clean: bool = True
) -> Iterator[None]:
    """Hold the run directory's lock (:class:`influencer.io.RunLock`; ``name``/``clean`` as there) for a block; in
    a process group rank 0 holds it for the whole job and every rank raises if it cannot be had."""
    from influencer.io import LOCK_NAME, RunLock

    lock = RunLock(directory, purpose=purpose, name=name or LOCK_NAME, clean=clean)
    run_collectively(lock.acquire)
    try:
        yield
    finally:
        if is_main():
            lock.release()
