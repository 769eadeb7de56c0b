"""Tensors from a pool tensor store, zero-copy on the CPU, in pinned overlapped chunks to a GPU.

A worker holds only a read-only fd of the store's segment (its sandbox cannot see the pool). It maps
the segment MAP_PRIVATE (a read-only fd allows a private writable mapping): every worker of one base
model then reads the very same pool pages, and nothing is copied until someone writes, which the
decoder never does (a merged adapter goes to separate tensors). `torch.frombuffer` + `as_strided`
make the tensors; they keep the mapping alive.

To a GPU: tensors are packed back to back into a device buffer through two pinned staging buffers,
so the host memcpy of chunk n+1 overlaps the DMA of chunk n (ServerlessLLM's loader, on one GPU).
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from shmpool.backends import round_up
from shmpool.tensors import DTYPE_SIZES, TensorEntry, TensorIndex

TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
STORE_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}
PAGE = mmap.PAGESIZE


@dataclass
class MappedStore:
    """A store mapped into this process: its index and its tensors (views of the mapping)."""

    index: TensorIndex
    mapping: mmap.mmap
    tensors: dict[str, torch.Tensor]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def raw(self, name: str) -> bytes:
        """A tensor's bytes (for U8 blobs such as tokenizer.json)."""
        e = self.index.tensors[name]
        return bytes(self.mapping[e.offset : e.offset + e.nbytes])


def _view(whole: torch.Tensor, e: TensorEntry) -> torch.Tensor:
    dtype = TORCH_DTYPES[e.dtype]
    if e.nbytes == 0:
        return torch.empty(e.shape, dtype=dtype)
    return whole[e.offset : e.offset + e.nbytes].view(dtype).as_strided(e.shape, e.stride)


def map_store(fd: int, base: int = 0) -> MappedStore:
    """Map the store at `base` in `fd` (checked header and index) and view every tensor, no copy."""
    index = TensorIndex.read(fd, base)
    mapping = mmap.mmap(fd, round_up(index.size, PAGE), mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE, offset=base)
    whole = torch.frombuffer(mapping, dtype=torch.uint8)
    return MappedStore(index, mapping, {name: _view(whole, e) for name, e in index.tensors.items()})


def to_device(store: MappedStore, device: torch.device, chunk_bytes: int = 64 << 20) -> dict[str, torch.Tensor]:
    """Every tensor of `store` on `device`. CPU: the zero-copy views themselves."""
    if device.type == "cpu":
        return dict(store.tensors)
    return _to_cuda(store, device, chunk_bytes)


def _packing(index: TensorIndex) -> Iterator[tuple[TensorEntry, int]]:
    """(entry, offset in the device buffer) for each tensor, 256-byte aligned like CUDA allocations."""
    pos = 0
    for e in index.tensors.values():
        yield e, pos
        pos = round_up(pos + e.nbytes, 256)


def _to_cuda(store: MappedStore, device: torch.device, chunk_bytes: int) -> dict[str, torch.Tensor]:
    placed = list(_packing(store.index))
    total = max((off + e.nbytes for e, off in placed), default=0)
    dest = torch.empty(round_up(total, 256), dtype=torch.uint8, device=device)
    source = torch.frombuffer(store.mapping, dtype=torch.uint8)
    staging = [torch.empty(chunk_bytes, dtype=torch.uint8).pin_memory() for _ in range(2)]
    done = [torch.cuda.Event(), torch.cuda.Event()]  # type: ignore[no-untyped-call]
    copy_stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
    turn = 0
    # Walk the data as (source offset, destination offset, length) pieces no longer than a chunk.
    for e, off in placed:
        for start in range(0, e.nbytes, chunk_bytes):
            n = min(chunk_bytes, e.nbytes - start)
            buf = staging[turn]
            done[turn].synchronize()  # the DMA that last read this staging buffer has finished
            buf[:n].copy_(source[e.offset + start : e.offset + start + n])
            with torch.cuda.stream(copy_stream):
                dest[off + start : off + start + n].copy_(buf[:n], non_blocking=True)
                done[turn].record(copy_stream)
            turn ^= 1
    copy_stream.synchronize()
    out = {}
    for e, off in placed:
        dtype = TORCH_DTYPES[e.dtype]
        count = e.nbytes // DTYPE_SIZES[e.dtype]
        flat = dest[off : off + e.nbytes].view(dtype) if count else torch.empty(0, dtype=dtype, device=device)
        out[e.name] = flat.as_strided(e.shape, e.stride)
    return out
