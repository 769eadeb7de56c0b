"""Kernel constants as IntEnum/IntFlag. Values come from the system headers at build time."""

from __future__ import annotations

from enum import IntEnum, IntFlag

from native._native import lib

WALL = 0x40000000  # __WALL (wait for every child, clone or not); <sys/wait.h>, absent from `os`.


class PtraceRequest(IntEnum):
    TRACEME = lib.PTRACE_TRACEME
    PEEKDATA = lib.PTRACE_PEEKDATA
    POKEDATA = lib.PTRACE_POKEDATA
    CONT = lib.PTRACE_CONT
    KILL = lib.PTRACE_KILL
    SINGLESTEP = lib.PTRACE_SINGLESTEP
    GETREGS = lib.PTRACE_GETREGS
    SETREGS = lib.PTRACE_SETREGS
    ATTACH = lib.PTRACE_ATTACH
    DETACH = lib.PTRACE_DETACH
    SYSCALL = lib.PTRACE_SYSCALL
    SETOPTIONS = lib.PTRACE_SETOPTIONS
    GETEVENTMSG = lib.PTRACE_GETEVENTMSG
    GETSIGINFO = lib.PTRACE_GETSIGINFO
    GETREGSET = lib.PTRACE_GETREGSET
    SETREGSET = lib.PTRACE_SETREGSET
    SEIZE = lib.PTRACE_SEIZE
    INTERRUPT = lib.PTRACE_INTERRUPT
    LISTEN = lib.PTRACE_LISTEN
    GET_RSEQ_CONFIGURATION = lib.PTRACE_GET_RSEQ_CONFIGURATION
    GETSIGMASK = lib.PTRACE_GETSIGMASK
    SETSIGMASK = lib.PTRACE_SETSIGMASK


class PtraceOption(IntFlag):
    TRACESYSGOOD = lib.PTRACE_O_TRACESYSGOOD
    EXITKILL = lib.PTRACE_O_EXITKILL


PTRACE_EVENT_STOP: int = lib.PTRACE_EVENT_STOP


class RegSet(IntEnum):
    PRSTATUS = lib.NT_PRSTATUS
    X86_XSTATE = lib.NT_X86_XSTATE


class UffdFeature(IntFlag):
    PAGEFAULT_FLAG_WP = lib.UFFD_FEATURE_PAGEFAULT_FLAG_WP
    EVENT_FORK = lib.UFFD_FEATURE_EVENT_FORK
    EVENT_REMAP = lib.UFFD_FEATURE_EVENT_REMAP
    EVENT_REMOVE = lib.UFFD_FEATURE_EVENT_REMOVE
    MISSING_HUGETLBFS = lib.UFFD_FEATURE_MISSING_HUGETLBFS
    MISSING_SHMEM = lib.UFFD_FEATURE_MISSING_SHMEM
    EVENT_UNMAP = lib.UFFD_FEATURE_EVENT_UNMAP
    SIGBUS = lib.UFFD_FEATURE_SIGBUS
    THREAD_ID = lib.UFFD_FEATURE_THREAD_ID
    MINOR_HUGETLBFS = lib.UFFD_FEATURE_MINOR_HUGETLBFS
    MINOR_SHMEM = lib.UFFD_FEATURE_MINOR_SHMEM
    EXACT_ADDRESS = lib.UFFD_FEATURE_EXACT_ADDRESS
    WP_HUGETLBFS_SHMEM = lib.UFFD_FEATURE_WP_HUGETLBFS_SHMEM


class UffdRegisterMode(IntFlag):
    MISSING = lib.UFFDIO_REGISTER_MODE_MISSING
    WP = lib.UFFDIO_REGISTER_MODE_WP
    MINOR = lib.UFFDIO_REGISTER_MODE_MINOR


class UffdIoctl(IntFlag):
    """Bits of the `ioctls` masks UFFDIO_API and UFFDIO_REGISTER report."""

    API = 1 << lib._UFFDIO_API
    REGISTER = 1 << lib._UFFDIO_REGISTER
    UNREGISTER = 1 << lib._UFFDIO_UNREGISTER
    WAKE = 1 << lib._UFFDIO_WAKE
    COPY = 1 << lib._UFFDIO_COPY
    ZEROPAGE = 1 << lib._UFFDIO_ZEROPAGE
    WRITEPROTECT = 1 << lib._UFFDIO_WRITEPROTECT
    CONTINUE = 1 << lib._UFFDIO_CONTINUE


class UffdEvent(IntEnum):
    PAGEFAULT = lib.UFFD_EVENT_PAGEFAULT
    FORK = lib.UFFD_EVENT_FORK
    REMAP = lib.UFFD_EVENT_REMAP
    REMOVE = lib.UFFD_EVENT_REMOVE
    UNMAP = lib.UFFD_EVENT_UNMAP


class UffdFaultFlag(IntFlag):
    WRITE = lib.UFFD_PAGEFAULT_FLAG_WRITE
    WP = lib.UFFD_PAGEFAULT_FLAG_WP
    MINOR = lib.UFFD_PAGEFAULT_FLAG_MINOR


UFFDIO_COPY_MODE_DONTWAKE = lib.UFFDIO_COPY_MODE_DONTWAKE
UFFDIO_ZEROPAGE_MODE_DONTWAKE = lib.UFFDIO_ZEROPAGE_MODE_DONTWAKE
UFFD_USER_MODE_ONLY = lib.UFFD_USER_MODE_ONLY


class Mempolicy(IntEnum):
    DEFAULT = lib.MPOL_DEFAULT
    PREFERRED = lib.MPOL_PREFERRED
    BIND = lib.MPOL_BIND
    INTERLEAVE = lib.MPOL_INTERLEAVE
    LOCAL = lib.MPOL_LOCAL


class GetMempolicyFlag(IntFlag):
    NODE = lib.MPOL_F_NODE
    ADDR = lib.MPOL_F_ADDR
    MEMS_ALLOWED = lib.MPOL_F_MEMS_ALLOWED


class MbindFlag(IntFlag):
    STRICT = lib.MPOL_MF_STRICT
    MOVE = lib.MPOL_MF_MOVE
    MOVE_ALL = lib.MPOL_MF_MOVE_ALL


class MountFlag(IntFlag):
    RDONLY = lib.MS_RDONLY
    NOSUID = lib.MS_NOSUID
    NODEV = lib.MS_NODEV
    NOEXEC = lib.MS_NOEXEC
    REMOUNT = lib.MS_REMOUNT
    BIND = lib.MS_BIND
    MOVE = lib.MS_MOVE
    REC = lib.MS_REC
    PRIVATE = lib.MS_PRIVATE
    SLAVE = lib.MS_SLAVE
    SHARED = lib.MS_SHARED
    UNBINDABLE = lib.MS_UNBINDABLE
    NOATIME = lib.MS_NOATIME
    STRICTATIME = lib.MS_STRICTATIME


class UmountFlag(IntFlag):
    FORCE = lib.MNT_FORCE
    DETACH = lib.MNT_DETACH
    EXPIRE = lib.MNT_EXPIRE
    NOFOLLOW = lib.UMOUNT_NOFOLLOW


class CloneFlag(IntFlag):
    NEWNS = lib.CLONE_NEWNS
    NEWUTS = lib.CLONE_NEWUTS
    NEWIPC = lib.CLONE_NEWIPC
    NEWUSER = lib.CLONE_NEWUSER
    NEWPID = lib.CLONE_NEWPID
    NEWNET = lib.CLONE_NEWNET
    NEWCGROUP = lib.CLONE_NEWCGROUP
    NEWTIME = lib.CLONE_NEWTIME
    FILES = lib.CLONE_FILES
    FS = lib.CLONE_FS
    SYSVSEM = lib.CLONE_SYSVSEM


class Prctl(IntEnum):
    SET_PDEATHSIG = lib.PR_SET_PDEATHSIG
    GET_DUMPABLE = lib.PR_GET_DUMPABLE
    SET_DUMPABLE = lib.PR_SET_DUMPABLE
    SET_NAME = lib.PR_SET_NAME
    GET_NAME = lib.PR_GET_NAME
    CAPBSET_DROP = lib.PR_CAPBSET_DROP
    SET_MM = lib.PR_SET_MM
    SET_CHILD_SUBREAPER = lib.PR_SET_CHILD_SUBREAPER
    SET_NO_NEW_PRIVS = lib.PR_SET_NO_NEW_PRIVS
    GET_NO_NEW_PRIVS = lib.PR_GET_NO_NEW_PRIVS
    GET_TID_ADDRESS = lib.PR_GET_TID_ADDRESS
    SET_PTRACER = lib.PR_SET_PTRACER
    SET_KEEPCAPS = lib.PR_SET_KEEPCAPS


PR_SET_MM_MAP = lib.PR_SET_MM_MAP
PR_SET_MM_MAP_SIZE = lib.PR_SET_MM_MAP_SIZE


class Prot(IntFlag):
    NONE = lib.PROT_NONE
    READ = lib.PROT_READ
    WRITE = lib.PROT_WRITE
    EXEC = lib.PROT_EXEC


class MapFlag(IntFlag):
    SHARED = lib.MAP_SHARED
    PRIVATE = lib.MAP_PRIVATE
    SHARED_VALIDATE = lib.MAP_SHARED_VALIDATE
    FIXED = lib.MAP_FIXED
    FIXED_NOREPLACE = lib.MAP_FIXED_NOREPLACE
    ANONYMOUS = lib.MAP_ANONYMOUS
    NORESERVE = lib.MAP_NORESERVE
    POPULATE = lib.MAP_POPULATE
    HUGETLB = lib.MAP_HUGETLB
    SYNC = lib.MAP_SYNC
    GROWSDOWN = lib.MAP_GROWSDOWN


class MremapFlag(IntFlag):
    MAYMOVE = lib.MREMAP_MAYMOVE
    FIXED = lib.MREMAP_FIXED


class Syscall(IntEnum):
    """x86-64 syscall numbers (from <sys/syscall.h>) of the syscalls thaw runs inside other processes."""

    READ = lib.SYS_read
    MMAP = lib.SYS_mmap
    MUNMAP = lib.SYS_munmap
    MPROTECT = lib.SYS_mprotect
    MREMAP = lib.SYS_mremap
    MADVISE = lib.SYS_madvise
    BRK = lib.SYS_brk
    RT_SIGACTION = lib.SYS_rt_sigaction
    RT_SIGPROCMASK = lib.SYS_rt_sigprocmask
    SIGALTSTACK = lib.SYS_sigaltstack
    PRCTL = lib.SYS_prctl
    SET_TID_ADDRESS = lib.SYS_set_tid_address
    SET_ROBUST_LIST = lib.SYS_set_robust_list
    GET_ROBUST_LIST = lib.SYS_get_robust_list
    RSEQ = lib.SYS_rseq
    OPENAT = lib.SYS_openat
    DUP3 = lib.SYS_dup3
    LSEEK = lib.SYS_lseek
    CLOSE = lib.SYS_close
    CLOSE_RANGE = lib.SYS_close_range
    USERFAULTFD = lib.SYS_userfaultfd
    IOCTL = lib.SYS_ioctl
    SETRESUID = lib.SYS_setresuid
    SETRESGID = lib.SYS_setresgid
    SETGROUPS = lib.SYS_setgroups
    CAPSET = lib.SYS_capset
    PERSONALITY = lib.SYS_personality
    GETPID = lib.SYS_getpid
    KILL = lib.SYS_kill
    SECCOMP = lib.SYS_seccomp
    RT_TGSIGQUEUEINFO = lib.SYS_rt_tgsigqueueinfo
    RT_SIGQUEUEINFO = lib.SYS_rt_sigqueueinfo
    CLONE = lib.SYS_clone
    CLONE3 = lib.SYS_clone3
    FORK = lib.SYS_fork
    VFORK = lib.SYS_vfork


UFFDIO_API: int = lib.UFFDIO_API
UFFDIO_REGISTER: int = lib.UFFDIO_REGISTER


class MfdFlag(IntFlag):
    CLOEXEC = lib.MFD_CLOEXEC
    ALLOW_SEALING = lib.MFD_ALLOW_SEALING
    HUGETLB = lib.MFD_HUGETLB
    HUGE_2MB = lib.MFD_HUGE_2MB
    HUGE_1GB = lib.MFD_HUGE_1GB


class CloseRangeFlag(IntFlag):
    UNSHARE = lib.CLOSE_RANGE_UNSHARE
    CLOEXEC = lib.CLOSE_RANGE_CLOEXEC


class Persona(IntFlag):
    ADDR_NO_RANDOMIZE = lib.ADDR_NO_RANDOMIZE
    READ_IMPLIES_EXEC = lib.READ_IMPLIES_EXEC


PIDFD_NONBLOCK = lib.PIDFD_NONBLOCK
