"""The seccomp filter of guests and instances: a deny-list built with libseccomp, exported as BPF.

Some facts about seccomp filters, which decide how thaw uses them:

- A filter is a classic-BPF program the kernel runs at the entry of every syscall of the threads
  that carry it. It sees the syscall number, the ABI (`arch`), the instruction pointer and the six
  argument registers, and answers ALLOW, ERRNO(e) (the syscall does not run and returns -e),
  KILL_PROCESS, and a few more.
- Installing one (`seccomp(SECCOMP_SET_MODE_FILTER, 0, &sock_fprog)`) needs no_new_privs or
  CAP_SYS_ADMIN: a filter must not make a setuid program fail where it never fails otherwise.
  Filters are never removed; they are inherited across fork, clone and execve, and every filter a
  process has runs (the most restrictive answer wins), so a function can add its own but never
  loosen ours.
- A filter also judges syscalls a ptrace tracer injects. The restore therefore installs it last,
  after no_new_privs, when every privileged step (PR_SET_MM_MAP, setresuid, capset) is done; after
  it the tracer only injects `close` and `munmap`, which the filter allows. A stub gets no filter
  when it is forked (the restore needs what the filter denies); a guest gets it just before execve.
- A filter sees argument values, never the memory a pointer argument points to (reading it would
  race with another thread rewriting it). clone3 passes its flags in a struct, so clone3 cannot be
  judged by flag: it answers ENOSYS, and glibc (>= 2.34: pthread_create, posix_spawn) falls back to
  clone, whose flags are a register the filter reads. Docker does the same.
- x86-64 has three syscall ABIs: native (AUDIT_ARCH_X86_64), x32 (the same arch value, numbers
  with bit 30 set) and i386 through `int 0x80` (AUDIT_ARCH_I386, other numbers: mount is 21
  there). A deny-list of x86-64 numbers would be bypassed through the others, so the filter kills
  the process for a foreign arch, and libseccomp adds the x32 check to an x86-64-only filter
  (`python -m native.seccomp --pfc` shows both).
- libseccomp allows one comparison per argument in a rule and ORs the rules of a syscall. "Deny
  personality(x) unless x is one of five values" becomes 33 masked comparisons (`_only_bits`).
- Attaching a filter costs the kernel a JIT compile and a pass over every syscall number (for the
  cache below): ~60 us for 100 instructions here, ~0.2 us more per instruction. That is paid at
  every restore, so the filter is kept short.
- The kernel caches, per syscall number, that a filter allows it whatever the arguments (5.11+):
  allowed syscalls that no rule names cost no BPF at all.

The policy is Docker's default profile turned around: the default action is ALLOW, and a
deny-list answers EPERM (the errno an unprivileged process gets for these anyway). The guest
already runs as an unprivileged uid with no capabilities, so the kernel refuses most of these
calls too; the filter closes what an unprivileged process *can* reach and what gives it more
kernel to attack. Denied:

- creating or joining namespaces: `unshare`, `setns`, `clone` with any CLONE_NEW* flag,
  `clone3` (ENOSYS, above). An unprivileged user namespace would make the process root over new
  mount, network and other namespaces, and reach code written for root (the whole point of the
  review that asked for this filter);
- mounts and views of the file system: `mount`, `umount2`, `pivot_root`, `chroot`, the new mount
  API (`open_tree`, `open_tree_attr`, `move_mount`, `fsopen`, `fsconfig`, `fsmount`, `fspick`,
  `mount_setattr`), and file handles (`name_to_handle_at`, `open_by_handle_at`: the latter opens
  any inode of a file system by number, the "shocker" escape);
- kernel attack surface no function needs: `bpf`, `perf_event_open`, `userfaultfd` (stalls the
  kernel at will inside a copy, the classic way to win a race; a lazy restore creates the
  instance's userfaultfd by injection before the filter), `io_uring_*` (Docker denies it too, for
  its record of exploits), keyrings (`add_key`, `request_key`, `keyctl`), `fanotify_init`,
  `lookup_dcookie`, `modify_ldt` (16-bit segments: Wine, not Python), `syslog`;
- other processes: `ptrace`, `process_vm_readv`, `process_vm_writev`, `kcmp`, `pidfd_getfd`;
- the machine: kernel modules (`init_module`, `finit_module`, `delete_module`, and the long gone
  `create_module`, `get_kernel_syms`, `query_module`), `kexec_load`, `kexec_file_load`,
  `reboot`, `swapon`, `swapoff`, `acct`, `quotactl`, `quotactl_fd`, setting the clock
  (`settimeofday`, `clock_settime`), `sethostname`, `setdomainname` (the sandbox sets the
  hostname), port I/O (`iopl`, `ioperm`), `vhangup`, `nfsservctl`, `uselib`, `ustat`, `sysfs`,
  `_sysctl`;
- memory policy (`mbind`, `set_mempolicy`, `set_mempolicy_home_node`, `migrate_pages`,
  `move_pages`): the sandbox's cpuset decides where an instance's pages go; libraries that try
  (OpenBLAS's buffers) ignore the EPERM, as they do under Docker;
- `personality` but for the values Docker allows: PER_LINUX, PER_LINUX32, UNAME26, both, and the
  query 0xffffffff. The rest turns off address randomisation or makes all memory executable.

Allowed on purpose: `adjtimex` and `clock_adjtime` (glibc's ntp_gettime reads the clock through
them; changing it needs CAP_SYS_TIME, which no instance has), `get_mempolicy` (read only: libnuma's
numa_available() asks it), `pidfd_open` and `pidfd_send_signal` (asyncio watches children with
pidfds), `process_madvise`, `seccomp` and `prctl` (a function may confine itself further),
`clone` without namespace flags (threads, fork, vfork: subprocess and multiprocessing).

A function opts out of named entries only (`"syscalls": ["ptrace"]` in its spec), each removing
that syscall's rules; names that are not on the deny-list are refused (`check_opt_outs`).
`program(allow)` builds the filter once per set of opt-outs and keeps it.
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import struct
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum

from native._native import ffi, lib

SET_MODE_FILTER: int = lib.SECCOMP_SET_MODE_FILTER
INSTRUCTION_SIZE = 8  # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k
MAX_INSTRUCTIONS = 4096  # BPF_MAXINSNS: the kernel refuses a longer program
_SOCK_FPROG = struct.Struct("<H6xQ")  # struct sock_fprog: u16 len, (padding), struct sock_filter *filter
_OPTIMIZE_BINARY_TREE = 2  # SCMP_FLTATR_CTL_OPTIMIZE: dispatch on the syscall number in log(n) steps
# Syscalls newer than the libseccomp thaw builds with (Debian 12's 2.5.4): their x86-64 numbers.
_NEWER_SYSCALLS = {"open_tree_attr": 467}


class Compare(IntEnum):
    NE = lib.SCMP_CMP_NE
    LT = lib.SCMP_CMP_LT
    LE = lib.SCMP_CMP_LE
    EQ = lib.SCMP_CMP_EQ
    GE = lib.SCMP_CMP_GE
    GT = lib.SCMP_CMP_GT
    MASKED_EQ = lib.SCMP_CMP_MASKED_EQ  # (arg & a) == b


class SeccompError(Exception):
    """libseccomp could not build or export the filter; the message names the step."""


class BadOptOut(ValueError):
    """A function asked to opt out of syscalls that are not on the deny-list (or do not exist)."""

    def __init__(self, message: str, names: Sequence[str]) -> None:
        super().__init__(message)
        self.names = list(names)


@dataclass(frozen=True)
class Arg:
    """One comparison of argument `index`: `op` against `a` (for MASKED_EQ: mask `a`, value `b`)."""

    index: int
    op: Compare
    a: int
    b: int = 0


@dataclass(frozen=True)
class Deny:
    """A deny-list entry: `name` answers -errno when any of `when` holds (each an AND of argument
    comparisons; the default, one empty rule, always holds)."""

    name: str
    errno: int = errno.EPERM
    when: tuple[tuple[Arg, ...], ...] = ((),)


def _flag_set(index: int, flag: int) -> tuple[Arg, ...]:
    return (Arg(index, Compare.MASKED_EQ, flag, flag),)


def only_bits(free: int, width: int = 32) -> list[tuple[int, int]]:
    """(mask, value) pairs such that `x & mask == value` for one of them exactly when the
    `width`-bit x is neither all ones nor made of `free` bits only (x & ~free != 0).

    x must have a bit outside `free` set (b) and some bit clear (c): one pair per edge b -> c
    of a cycle through the bits outside `free`, plus an edge into each free bit. Whatever set of
    bits x has, some edge leaves it unless x is all ones, or holds no bit outside `free`. That
    is width pairs, where the ranges between the allowed values would need ~80 aligned blocks."""
    fixed = [b for b in range(width) if not free >> b & 1]
    edges = [(b, fixed[(i + 1) % len(fixed)]) for i, b in enumerate(fixed)]
    edges += [(fixed[0], b) for b in range(width) if free >> b & 1]
    return [((1 << b) | (1 << c), 1 << b) for b, c in edges]


def _only(index: int, free: int) -> tuple[tuple[Arg, ...], ...]:
    """Rules that hold for every 64-bit value of the argument but the 32-bit ones made of `free`
    bits only and 0xffffffff."""
    wide = (Arg(index, Compare.GT, 0xFFFF_FFFF),)  # the kernel would truncate it to 32 bits
    return (wide, *((Arg(index, Compare.MASKED_EQ, mask, value),) for mask, value in only_bits(free)))


# clone's flags word (argument 0 on x86-64). CLONE_NEWTIME (0x80) is not among them: in clone it
# lies in the exit-signal byte, and only clone3 and unshare take it.
_CLONE_NAMESPACES = (
    lib.CLONE_NEWNS,
    lib.CLONE_NEWCGROUP,
    lib.CLONE_NEWUTS,
    lib.CLONE_NEWIPC,
    lib.CLONE_NEWUSER,
    lib.CLONE_NEWPID,
    lib.CLONE_NEWNET,
)
# personality values Docker allows: PER_LINUX, PER_LINUX32, UNAME26, UNAME26 | PER_LINUX32, and the
# query 0xffffffff: the values made of these two bits only, and all ones.
_PERSONALITY_BITS = 0x0008 | 0x20000

_ALWAYS = """
    unshare setns
    mount umount2 pivot_root chroot open_tree open_tree_attr move_mount fsopen fsconfig fsmount fspick
    mount_setattr name_to_handle_at open_by_handle_at
    bpf perf_event_open userfaultfd io_uring_setup io_uring_enter io_uring_register add_key request_key keyctl
    fanotify_init lookup_dcookie modify_ldt syslog
    ptrace process_vm_readv process_vm_writev kcmp pidfd_getfd
    init_module finit_module delete_module create_module get_kernel_syms query_module kexec_load kexec_file_load
    reboot swapon swapoff acct quotactl quotactl_fd settimeofday clock_settime sethostname setdomainname
    iopl ioperm vhangup nfsservctl uselib ustat sysfs _sysctl
    mbind set_mempolicy set_mempolicy_home_node migrate_pages move_pages
"""

DENY_LIST: tuple[Deny, ...] = (
    *(Deny(name) for name in _ALWAYS.split()),
    Deny("clone", when=tuple(_flag_set(0, flag) for flag in _CLONE_NAMESPACES)),
    Deny("clone3", errno.ENOSYS),
    Deny("personality", when=_only(0, _PERSONALITY_BITS)),
)
DENIED: dict[str, Deny] = {deny.name: deny for deny in DENY_LIST}


# -- building -------------------------------------------------------------------------------------
def syscall_number(name: str) -> int | None:
    """The x86-64 number of syscall `name`, None when there is no such syscall on x86-64."""
    number = int(lib.seccomp_syscall_resolve_name(name.encode()))
    if number >= 0:
        return number
    return _NEWER_SYSCALLS.get(name)  # negative: unknown to libseccomp, or a syscall of other arches


def check_opt_outs(names: Iterable[str]) -> frozenset[str]:
    """The opt-outs as a set; BadOptOut naming every name that is not on the deny-list."""
    names = list(names)
    if not all(isinstance(name, str) for name in names):
        raise BadOptOut(f"syscall opt-outs must be syscall names, not {names!r}", [repr(n) for n in names])
    unknown = [name for name in names if syscall_number(name) is None]
    allowed = [name for name in names if name not in DENIED and name not in unknown]
    problems = []
    if unknown:
        problems.append(f"no such syscall on x86-64: {', '.join(unknown)}")
    if allowed:
        problems.append(f"not denied by thaw's seccomp filter (allowed already): {', '.join(allowed)}")
    if problems:
        raise BadOptOut(
            "; ".join(problems) + f". A function may opt out of: {', '.join(sorted(DENIED))}", unknown + allowed
        )
    return frozenset(names)


@functools.cache
def program(allow: frozenset[str] = frozenset()) -> bytes:
    """The filter as a BPF program (struct sock_filter[]), without the deny-list entries named in
    `allow` (checked: see `check_opt_outs`). Built once per set of opt-outs."""
    check_opt_outs(allow)
    ctx = lib.seccomp_init(lib.SCMP_ACT_ALLOW)
    if ctx == ffi.NULL:
        raise SeccompError("seccomp_init failed (out of memory?)")
    try:
        _check(lib.seccomp_attr_set(ctx, lib.SCMP_FLTATR_ACT_BADARCH, lib.SCMP_ACT_KILL_PROCESS), "foreign arches")
        _check(lib.seccomp_attr_set(ctx, lib.SCMP_FLTATR_CTL_OPTIMIZE, _OPTIMIZE_BINARY_TREE), "binary tree")
        for deny in DENY_LIST:
            if deny.name not in allow:
                _add(ctx, deny)
        bpf = _export(ctx, lib.seccomp_export_bpf, "seccomp_export_bpf")
    finally:
        lib.seccomp_release(ctx)
    check_program(bpf)
    return bpf


def pseudo_code(allow: frozenset[str] = frozenset()) -> str:
    """The filter in libseccomp's readable pseudo filter code (PFC), for people."""
    ctx = lib.seccomp_init(lib.SCMP_ACT_ALLOW)
    if ctx == ffi.NULL:
        raise SeccompError("seccomp_init failed (out of memory?)")
    try:
        _check(lib.seccomp_attr_set(ctx, lib.SCMP_FLTATR_ACT_BADARCH, lib.SCMP_ACT_KILL_PROCESS), "foreign arches")
        for deny in DENY_LIST:
            if deny.name not in check_opt_outs(allow):
                _add(ctx, deny)
        return _export(ctx, lib.seccomp_export_pfc, "seccomp_export_pfc").decode()
    finally:
        lib.seccomp_release(ctx)


def _add(ctx: object, deny: Deny) -> None:
    number = syscall_number(deny.name)
    if number is None:
        raise SeccompError(f"libseccomp {version()} does not know the syscall {deny.name}")
    action = lib.SCMP_ACT_ERRNO(deny.errno)
    for rule in deny.when:
        # safety: the array lives until the call returns; libseccomp copies the comparisons
        args = ffi.new("struct scmp_arg_cmp[]", [(a.index, a.op, a.a, a.b) for a in rule]) if rule else ffi.NULL
        _check(lib.seccomp_rule_add_exact_array(ctx, action, number, len(rule), args), f"the rule for {deny.name}")


def _export(ctx: object, export: object, what: str) -> bytes:
    fd = os.memfd_create("thaw-seccomp", os.MFD_CLOEXEC)  # libseccomp 2.5 exports only to an fd
    try:
        _check(export(ctx, fd), "exporting the filter", what)  # type: ignore[operator]
        return os.pread(fd, os.fstat(fd).st_size, 0)
    finally:
        os.close(fd)


def _check(rc: int, step: str, call: str = "seccomp_rule_add_exact_array") -> None:
    if rc < 0:  # libseccomp returns -errno
        raise SeccompError(f"building the seccomp filter, {step}: {os.strerror(-rc)} (originated from {call})")


def version() -> str:
    v = lib.seccomp_version()
    return f"{v.major}.{v.minor}.{v.micro}"


# -- installing -----------------------------------------------------------------------------------
def check_program(bpf: bytes) -> None:
    """ValueError unless `bpf` has the shape of a BPF program the kernel can take."""
    if not bpf or len(bpf) % INSTRUCTION_SIZE or len(bpf) // INSTRUCTION_SIZE > MAX_INSTRUCTIONS:
        raise ValueError(
            f"a seccomp program is 1 to {MAX_INSTRUCTIONS} instructions of {INSTRUCTION_SIZE} bytes, "
            f"not {len(bpf)} bytes"
        )


def sock_fprog(address: int, bpf: bytes) -> bytes:
    """struct sock_fprog for `bpf` placed at `address` (in the process that installs it)."""
    check_program(bpf)
    return _SOCK_FPROG.pack(len(bpf) // INSTRUCTION_SIZE, address)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m native.seccomp", description="thaw's seccomp filter")
    parser.add_argument("--allow", default="", help="comma-separated opt-outs, as a function's `syscalls`")
    parser.add_argument("--pfc", action="store_true", help="print the filter as libseccomp pseudo code")
    args = parser.parse_args(argv)
    allow = frozenset(filter(None, args.allow.split(",")))
    try:
        bpf = program(check_opt_outs(allow))
    except BadOptOut as e:
        print(e, file=sys.stderr)
        return 2
    if args.pfc:
        print(pseudo_code(allow), end="")
        return 0
    print(f"libseccomp {version()}: {len(bpf) // INSTRUCTION_SIZE} BPF instructions; denied:")
    for deny in DENY_LIST:
        if deny.name not in allow:
            rules = "" if deny.when == ((),) else f" ({len(deny.when)} argument rules)"
            print(f"  {deny.name:<24} {errno.errorcode[deny.errno]}{rules}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
