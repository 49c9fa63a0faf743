"""One full file from a sharded model's tensors: gathered one tensor at a time, written on rank 0.

``emakit.save`` of a sharded EMA, and ``KeepBest`` / ``write_weights`` of a sharded model state,
are collectives: every rank calls them; each DTensor is gathered in turn to rank 0 (dim-0
shards, FSDP2's layout: each rank sends its rows into one reused buffer on rank 0; other layouts:
``full_tensor()``) and rank 0 streams it into the file before the next one is gathered, so
rank 0 holds about one full tensor at a time, never the model. Rank 0 writes atomically; every
rank returns only once the file is in place (a barrier), so a rank may read it right after.
Without a process group (one process), this is a plain write.

If rank 0 fails while writing, the other ranks may wait in the next gather: a failed save of a
sharded EMA is an error to stop the job on, as any failed collective.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from emakit.distributed.shards import gather, is_dtensor

__all__ = ["checked_by_rank0", "gathered", "has_shards", "rank", "write_gathered"]


def has_shards(tensors: Mapping[str, Any]) -> bool:
    """True if any value is a DTensor (the write must then be a collective)."""
    return any(is_dtensor(t) for t in tensors.values())


def rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _full(name: str, x: Any) -> Any:
    return gather(x) if is_dtensor(x) else x


class _Gatherer:
    """Full tensors of dim-0 shards on a 1-D mesh (FSDP2's layout), sent to rank 0 only.

    Each rank sends its rows to rank 0 (point to point), which receives them in place into one
    buffer reused for every tensor: the rows arrive in order, so the full tensor is the front of
    the buffer. Rank 0's peak memory is the largest tensor, once; the other ranks hold nothing
    extra (an all-gather would make every rank hold the full tensor, and gloo's a second copy).
    Other layouts use ``full_tensor()``. The result is a view of the buffer, valid until the next
    call (None on ranks other than 0).
    """

    def __init__(self) -> None:
        self.buffer: Any = None

    def full(self, x: Any) -> Any:
        import torch
        import torch.distributed as dist
        from torch.distributed.tensor import Shard

        if not is_dtensor(x):
            return x
        mesh, places = x.device_mesh, tuple(x.placements)
        ranks = mesh.mesh.tolist() if mesh.ndim == 1 else []
        if places != (Shard(0),) or x.ndim == 0 or not ranks or ranks[0] != 0:
            return gather(x)
        n, world = x.shape[0], len(ranks)
        rows = -(-n // world)  # torch.chunk: ceil(n / world) rows per rank, the last fewer
        sizes = [max(0, min(rows, n - k * rows)) for k in range(world)]
        piece = x.to_local().detach()
        me = ranks.index(rank())
        if me != 0:
            if sizes[me]:
                dist.send(piece.contiguous(), dst=ranks[0])
            return None
        nbytes = n * piece[:1].numel() * piece.element_size() if n else 0
        if self.buffer is None or self.buffer.numel() < nbytes or \
                self.buffer.device != piece.device:
            self.buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=piece.device)
        out = self.buffer[:nbytes].view(piece.dtype).view(tuple(x.shape))
        start = 0
        with torch.no_grad():
            for k, size in enumerate(sizes):
                if size and k == 0:
                    out[:size].copy_(piece)
                elif size:
                    dist.recv(out[start:start + size], src=ranks[k])
                start += size
        return out


def write_gathered(dest: Path, tensors: Mapping[str, Any],
                   metadata: Callable[[Mapping[str, str]], Mapping[str, str]]) -> None:
    """Write ``tensors`` (DTensors gathered) as one safetensors file on rank 0.

    Args:
        dest: the file (rank 0 writes it atomically).
        tensors: name -> tensor or DTensor, the same names in the same order on every rank.
        metadata: the CRC-32 of each tensor (by name) -> the file's metadata.
    """
    from emakit.io.atomic import atomic_write
    from emakit.io.safetensors_stream import CODES, Raw, raw_bytes, write_safetensors_lazily

    checked_by_rank0(dest)
    layout = {n: (CODES[str(t.dtype).removeprefix("torch.")], list(t.shape))
              for n, t in tensors.items()}
    writer = rank() == 0
    gatherer = _Gatherer()

    def produce(name: str) -> Raw | None:
        full = gatherer.full(tensors[name])  # a collective for a DTensor: every rank runs it
        return raw_bytes(full, name) if writer and full is not None else None

    if writer:
        with atomic_write(dest) as f:
            write_safetensors_lazily(f, layout, produce, metadata)
    else:
        write_safetensors_lazily(None, layout, produce, metadata)
    _barrier()


def checked_by_rank0(dest: Path) -> None:
    """Rank 0 checks that it can write ``dest`` and every rank learns the outcome: a missing
    or read-only folder raises on every rank instead of leaving the others in the gather."""
    from emakit.distributed.agree import from_rank0
    from emakit.io.atomic import check_target

    from_rank0(lambda: check_target(dest), collective=True)


def gathered(tensors: Mapping[str, Any], write: Callable[[dict[str, Any]], None]) -> None:
    """Gather every DTensor of ``tensors`` and call ``write`` with the full tensors on rank 0.

    For formats written in one piece (``.pt``, ``.npz``): rank 0 holds the whole model while it
    writes. Every rank must call it.
    """
    writer = rank() == 0
    full = {}
    for name, t in tensors.items():
        x = _full(name, t)  # a collective for a DTensor: every rank runs it
        if writer:
            full[name] = x
    if writer:
        write(full)
    _barrier()
