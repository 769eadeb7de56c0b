"""Memory of this and other processes: cross-process copies, memfds, raw mappings, NUMA policy.

Some facts about NUMA placement that shape this module:

- Placement happens at first touch, under the policy in force for that address then: the VMA's
  policy (`mbind`), else the thread's (`set_mempolicy`), else local. A tmpfs mounted with
  `mpol=bind:N` gives its files' pages node N regardless of who touches them.
- `move_pages(pid, pages, nodes=NULL)` moves nothing: it reports the node of each page in
  `status` (or -errno, e.g. -ENOENT for a page not present). That is how placement is verified.
- Node masks are arrays of unsigned long; `maxnode` counts bits, and the kernel wants one more
  than the highest node it should look at.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from native._native import ffi, lib
from native.constants import GetMempolicyFlag, Mempolicy
from native.errors import check, raise_oserror

_ULONG_BITS = 64
MAX_NODES = 1024  # the kernel's default MAX_NUMNODES bound for a mask we hand it


def address_of(buffer: object) -> int:
    """Address of a writable or read-only Python buffer (mmap, bytearray, bytes, memoryview).

    Safety: valid only while the caller keeps `buffer` alive and does not resize it.
    """
    return int(ffi.cast("uintptr_t", ffi.from_buffer(buffer)))


# ---------------------------------------------------------------------------------------------
# Cross-process copies


def process_vm_readv(pid: int, remote: Sequence[tuple[int, int]], into: object) -> int:
    """Scatter-read `remote` (address, length) ranges of `pid` contiguously into buffer `into`.

    Returns the bytes read, which is short when a range hits an unmapped page; callers that need
    all of it loop (see `read_exact`).
    """
    dest = ffi.from_buffer(into, require_writable=True)
    total = sum(length for _, length in remote)
    if total > len(dest):
        raise ValueError(f"{total} bytes requested into a {len(dest)}-byte buffer")
    local = ffi.new("struct iovec *", {"iov_base": dest, "iov_len": total})
    rem = ffi.new("struct iovec[]", len(remote))
    for i, (addr, length) in enumerate(remote):
        rem[i].iov_base = ffi.cast("void *", addr)
        rem[i].iov_len = length
    return check(lib.process_vm_readv(pid, local, 1, rem, len(remote), 0), "process_vm_readv", f"pid {pid}")


def read_exact(pid: int, addr: int, length: int) -> bytes:
    """Read exactly `length` bytes at `addr` of `pid`; EFAULT if any of it is not mapped."""
    buf = bytearray(length)
    done = 0
    view = memoryview(buf)
    while done < length:
        got = process_vm_readv(pid, [(addr + done, length - done)], view[done:])
        if got == 0:
            raise_oserror("process_vm_readv", f"pid {pid} address {addr + done:#x}", 14)  # EFAULT
        done += got
    return bytes(buf)


def process_vm_writev(pid: int, addr: int, data: bytes) -> int:
    src = ffi.from_buffer(data)
    local = ffi.new("struct iovec *", {"iov_base": src, "iov_len": len(data)})
    remote = ffi.new("struct iovec *", {"iov_base": ffi.cast("void *", addr), "iov_len": len(data)})
    return check(lib.process_vm_writev(pid, local, 1, remote, 1, 0), "process_vm_writev", f"pid {pid}")


# ---------------------------------------------------------------------------------------------
# memfd and raw mappings


def memfd_create(name: str, flags: int) -> int:
    return check(lib.memfd_create(name.encode(), flags), "memfd_create", name)


def mmap(addr: int, length: int, prot: int, flags: int, fd: int = -1, offset: int = 0) -> int:
    """Raw mmap returning the address (Python's mmap module cannot place or report addresses)."""
    ret = int(lib.thaw_mmap(addr, length, prot, flags, fd, offset))
    if ret == 0xFFFF_FFFF_FFFF_FFFF:
        raise_oserror("mmap", f"{length} bytes fd {fd} offset {offset}")
    return ret


def munmap(addr: int, length: int) -> None:
    check(lib.thaw_munmap(addr, length), "munmap", f"{addr:#x}+{length}")


def touch(addr: int, length: int, stride: int, write: bool) -> int:
    """Touch one byte every `stride` bytes (faulting pages in) with the GIL released."""
    if stride <= 0:
        raise ValueError(f"stride must be positive, not {stride}")
    return int(lib.thaw_touch(addr, length, stride, 1 if write else 0))


# ---------------------------------------------------------------------------------------------
# NUMA policy


def _nodemask(nodes: Iterable[int]) -> tuple[object, int]:
    words = ffi.new("unsigned long[]", MAX_NODES // _ULONG_BITS)
    for node in nodes:
        if not 0 <= node < MAX_NODES:
            raise ValueError(f"node {node} is outside 0..{MAX_NODES - 1}")
        words[node // _ULONG_BITS] |= 1 << (node % _ULONG_BITS)
    return words, MAX_NODES + 1


def _nodes_of(words: object, count: int) -> list[int]:
    return [
        w * _ULONG_BITS + b
        for w in range(count)
        for b in range(_ULONG_BITS)
        if words[w] >> b & 1  # type: ignore[index]
    ]


def mbind(addr: int, length: int, mode: Mempolicy, nodes: Iterable[int], flags: int = 0) -> None:
    mask, maxnode = _nodemask(nodes)
    check(int(lib.thaw_mbind(addr, length, mode, mask, maxnode, flags)), "mbind", f"{addr:#x}+{length}")


def set_mempolicy(mode: Mempolicy, nodes: Iterable[int] = ()) -> None:
    """Set this *thread's* policy (it is per thread, inherited by threads and children it makes)."""
    mask, maxnode = _nodemask(nodes)
    empty = mode in (Mempolicy.DEFAULT, Mempolicy.LOCAL)
    check(
        int(lib.thaw_set_mempolicy(mode, ffi.NULL if empty else mask, 0 if empty else maxnode)),
        "set_mempolicy",
        mode.name,
    )


def get_mempolicy(addr: int | None = None) -> tuple[Mempolicy, list[int]]:
    """Policy and node set of this thread, or of the VMA holding `addr`."""
    mode = ffi.new("int *")
    mask, maxnode = _nodemask(())
    flags = GetMempolicyFlag.ADDR if addr is not None else 0
    check(
        int(lib.thaw_get_mempolicy(mode, mask, maxnode, addr or 0, flags)),
        "get_mempolicy",
        f"address {addr:#x}" if addr is not None else "thread",
    )
    return Mempolicy(mode[0]), _nodes_of(mask, MAX_NODES // _ULONG_BITS)


def node_of_address(addr: int) -> int:
    """Node of the page at `addr` of this process (it must be present: touch it first)."""
    mode = ffi.new("int *")
    check(
        int(lib.thaw_get_mempolicy(mode, ffi.NULL, 0, addr, GetMempolicyFlag.NODE | GetMempolicyFlag.ADDR)),
        "get_mempolicy",
        f"MPOL_F_NODE address {addr:#x}",
    )
    return int(mode[0])


def move_pages(pid: int, pages: Sequence[int], nodes: Sequence[int] | None = None, flags: int = 0) -> list[int]:
    """Move `pages` of `pid` to `nodes`, or with `nodes=None` only report where they are.

    Returns one status per page: its node, or a negative errno (-ENOENT: not present).
    """
    count = len(pages)
    c_pages = ffi.new("uintptr_t[]", list(pages))
    c_nodes = ffi.NULL if nodes is None else ffi.new("int[]", list(nodes))
    status = ffi.new("int[]", count)
    check(int(lib.thaw_move_pages(pid, count, c_pages, c_nodes, status, flags)), "move_pages", f"pid {pid}")
    return [int(status[i]) for i in range(count)]
