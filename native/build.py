"""cffi builder for thaw's C boundary (API mode, compiled at install by setup.py).

API mode means the C compiler checks every declaration below against the system headers, and
constants declared `#define X ...` are read from those headers at build time rather than copied
by hand. Optional libraries that may be absent at run time (Intel QPL) are bound separately in
ABI mode with `ffi.dlopen`, never here.
"""

import re
import subprocess
import tempfile
from pathlib import Path

from cffi import FFI

# setuptools insists on source paths relative to the project root (where setup.py runs).
SRC = Path("native") / "src"

# Constants read from the headers at build time. Grouped by the Python IntEnum/IntFlag they feed.
CONSTANTS = {
    "ptrace": """
        PTRACE_TRACEME PTRACE_PEEKDATA PTRACE_POKEDATA PTRACE_CONT PTRACE_KILL PTRACE_SINGLESTEP
        PTRACE_GETREGS PTRACE_SETREGS PTRACE_ATTACH PTRACE_DETACH PTRACE_SYSCALL PTRACE_SETOPTIONS
        PTRACE_GETEVENTMSG PTRACE_GETSIGINFO PTRACE_GETREGSET PTRACE_SETREGSET PTRACE_SEIZE
        PTRACE_INTERRUPT PTRACE_LISTEN PTRACE_GET_RSEQ_CONFIGURATION PTRACE_GETSIGMASK
        PTRACE_SETSIGMASK
        PTRACE_O_TRACESYSGOOD PTRACE_O_EXITKILL PTRACE_EVENT_STOP NT_PRSTATUS NT_X86_XSTATE
    """,
    "uffd": """
        UFFD_API UFFD_USER_MODE_ONLY UFFDIO_REGISTER_MODE_MISSING UFFDIO_REGISTER_MODE_WP
        UFFDIO_REGISTER_MODE_MINOR UFFDIO_COPY_MODE_DONTWAKE UFFDIO_COPY_MODE_WP
        UFFDIO_ZEROPAGE_MODE_DONTWAKE UFFD_EVENT_PAGEFAULT UFFD_EVENT_FORK UFFD_EVENT_REMAP
        UFFD_EVENT_REMOVE UFFD_EVENT_UNMAP UFFD_PAGEFAULT_FLAG_WRITE UFFD_PAGEFAULT_FLAG_WP
        UFFD_PAGEFAULT_FLAG_MINOR
        UFFD_FEATURE_PAGEFAULT_FLAG_WP UFFD_FEATURE_EVENT_FORK UFFD_FEATURE_EVENT_REMAP
        UFFD_FEATURE_EVENT_REMOVE UFFD_FEATURE_MISSING_HUGETLBFS UFFD_FEATURE_MISSING_SHMEM
        UFFD_FEATURE_EVENT_UNMAP UFFD_FEATURE_SIGBUS UFFD_FEATURE_THREAD_ID
        UFFD_FEATURE_MINOR_HUGETLBFS UFFD_FEATURE_MINOR_SHMEM UFFD_FEATURE_EXACT_ADDRESS
        UFFD_FEATURE_WP_HUGETLBFS_SHMEM
        _UFFDIO_REGISTER _UFFDIO_UNREGISTER _UFFDIO_WAKE _UFFDIO_COPY _UFFDIO_ZEROPAGE
        _UFFDIO_WRITEPROTECT _UFFDIO_CONTINUE _UFFDIO_API UFFDIO_API UFFDIO_REGISTER
    """,
    "mempolicy": """
        MPOL_DEFAULT MPOL_PREFERRED MPOL_BIND MPOL_INTERLEAVE MPOL_LOCAL
        MPOL_F_NODE MPOL_F_ADDR MPOL_F_MEMS_ALLOWED MPOL_MF_STRICT MPOL_MF_MOVE MPOL_MF_MOVE_ALL
    """,
    "mount": """
        MS_RDONLY MS_NOSUID MS_NODEV MS_NOEXEC MS_REMOUNT MS_BIND MS_MOVE MS_REC MS_PRIVATE
        MS_SLAVE MS_SHARED MS_UNBINDABLE MS_NOATIME MS_STRICTATIME MNT_FORCE MNT_DETACH
        MNT_EXPIRE UMOUNT_NOFOLLOW
    """,
    "clone": """
        CLONE_NEWNS CLONE_NEWUTS CLONE_NEWIPC CLONE_NEWUSER CLONE_NEWPID CLONE_NEWNET
        CLONE_NEWCGROUP CLONE_NEWTIME CLONE_FILES CLONE_FS CLONE_SYSVSEM
    """,
    "prctl": """
        PR_SET_PDEATHSIG PR_GET_DUMPABLE PR_SET_DUMPABLE PR_SET_NAME PR_GET_NAME PR_CAPBSET_DROP
        PR_SET_MM PR_SET_MM_MAP PR_SET_MM_MAP_SIZE PR_SET_CHILD_SUBREAPER PR_SET_NO_NEW_PRIVS
        PR_GET_NO_NEW_PRIVS PR_GET_TID_ADDRESS PR_SET_PTRACER PR_SET_KEEPCAPS
    """,
    "mman": """
        PROT_NONE PROT_READ PROT_WRITE PROT_EXEC MAP_SHARED MAP_PRIVATE MAP_SHARED_VALIDATE
        MAP_FIXED MAP_FIXED_NOREPLACE MAP_ANONYMOUS MAP_NORESERVE MAP_POPULATE MAP_HUGETLB
        MAP_SYNC MAP_GROWSDOWN MREMAP_MAYMOVE MREMAP_FIXED
        MFD_CLOEXEC MFD_ALLOW_SEALING MFD_HUGETLB MFD_HUGE_2MB MFD_HUGE_1GB
    """,
    "syscall": """
        SYS_read SYS_mmap SYS_munmap SYS_mprotect SYS_mremap SYS_madvise SYS_brk SYS_rt_sigaction
        SYS_rt_sigprocmask SYS_sigaltstack SYS_prctl SYS_set_tid_address SYS_set_robust_list
        SYS_get_robust_list SYS_rseq SYS_openat SYS_dup3 SYS_lseek SYS_close SYS_close_range
        SYS_userfaultfd SYS_ioctl SYS_setresuid SYS_setresgid SYS_setgroups SYS_capset
        SYS_personality SYS_getpid SYS_kill SYS_seccomp SYS_rt_tgsigqueueinfo SYS_rt_sigqueueinfo
        SYS_clone SYS_clone3 SYS_fork SYS_vfork
    """,
    "seccomp": """
        SECCOMP_SET_MODE_FILTER SCMP_ACT_ALLOW SCMP_ACT_KILL_PROCESS SCMP_ARCH_NATIVE SCMP_ARCH_X86_64
        __NR_SCMP_ERROR
    """,
    "restorer": """
        THAW_RESTORER_MAGIC THAW_OP_SYSCALL THAW_OP_PREAD THAW_OP_OPEN_FD THAW_OP_PAUSE
        THAW_OP_CLEAN_STUB THAW_OP_DROP_BOUNDING THAW_SPECIALS_MAX THAW_SPECIALS_DIFFER
        THAW_STUB_REPORT THAW_STUB_REPORT_MAGIC
        THAW_OPF_ALLOW_ERROR THAW_OPF_SAVE
        THAW_OPF_ARG0_SAVED THAW_OPF_STORE32 THAW_STUB_SCRATCH THAW_STUB_SCRATCH_SIZE
        THAW_OP_THREADS THAW_OP_THREADS_GO THAW_OPF_ARG1_SAVED THAW_THREAD_SETTING_UP THAW_THREAD_READY
        THAW_THREAD_FAILED THAW_AFFINITY_BYTES THAW_OP_PIPE THAW_FIRST_RESTORE_FD THAW_OP_RECEIVE_FDS
        THAW_OPF_WRITE_ARG0
    """,
    "agent": """
        THAW_AGENT_PING THAW_AGENT_STUB THAW_AGENT_SPAWN THAW_AGENT_MOUNT_FUNCTION THAW_AGENT_FRESH_TMP
        THAW_AGENT_HOSTNAME THAW_AGENT_NETLINK THAW_AGENT_CGROUPS THAW_AGENT_OK THAW_AGENT_ERROR
        THAW_AGENT_EXITED THAW_AGENT_READY THAW_AGENT_MAX_PAYLOAD THAW_AGENT_MAX_FDS
    """,
    "tracer": """
        THAW_TRACE_SEIZE THAW_TRACE_NOT_STOPPED THAW_TRACE_EXITED THAW_TRACE_REGS THAW_TRACE_WRITE
        THAW_TRACE_RESUME THAW_TRACE_STRAY_STOP THAW_TRACE_READ THAW_TRACE_INJECTED THAW_TRACE_FINAL
        THAW_TRACE_DETACH
    """,
    "pager": """
        THAW_CODEC_LZ4 THAW_CODEC_ZSTD THAW_CODEC_DEFLATE THAW_RANGE_PLAIN THAW_RANGE_COLD THAW_COLD_MAX_CHUNK
    """,
    "misc": """
        CLOSE_RANGE_UNSHARE CLOSE_RANGE_CLOEXEC ADDR_NO_RANDOMIZE READ_IMPLIES_EXEC
        PIDFD_NONBLOCK
    """,
}


def _constant_decls() -> str:
    names = " ".join(CONSTANTS.values()).split()
    return "\n".join(f"#define {name} ..." for name in names)


CDEF = """
typedef int... pid_t;
typedef long... off_t;

struct user_regs_struct {
    unsigned long long r15, r14, r13, r12, rbp, rbx, r11, r10, r9, r8, rax, rcx, rdx, rsi, rdi,
        orig_rax, rip, cs, eflags, rsp, ss, fs_base, gs_base, ds, es, fs, gs;
};
struct iovec { void *iov_base; size_t iov_len; };
struct thaw_rseq_config {
    uint64_t rseq_abi_pointer;
    uint32_t rseq_abi_size;
    uint32_t signature;
    uint32_t flags;
    uint32_t pad;
};

long thaw_ptrace(long request, pid_t pid, uintptr_t addr, uintptr_t data);
long thaw_ptrace_getregset(pid_t pid, unsigned long type, void *buf, size_t *len);
long thaw_ptrace_setregset(pid_t pid, unsigned long type, void *buf, size_t len);
ssize_t process_vm_readv(pid_t pid, const struct iovec *local_iov, unsigned long liovcnt,
                         const struct iovec *remote_iov, unsigned long riovcnt, unsigned long flags);
ssize_t process_vm_writev(pid_t pid, const struct iovec *local_iov, unsigned long liovcnt,
                          const struct iovec *remote_iov, unsigned long riovcnt, unsigned long flags);

int thaw_pidfd_open(pid_t pid, unsigned int flags);
int thaw_pidfd_getfd(int pidfd, int targetfd, unsigned int flags);
int thaw_pidfd_send_signal(int pidfd, int sig, unsigned int flags);
int thaw_userfaultfd_syscall(int flags);
int thaw_userfaultfd_dev(int flags);
int memfd_create(const char *name, unsigned int flags);
long thaw_mbind(uintptr_t addr, unsigned long len, int mode, const unsigned long *nodemask,
                unsigned long maxnode, unsigned int flags);
long thaw_set_mempolicy(int mode, const unsigned long *nodemask, unsigned long maxnode);
long thaw_get_mempolicy(int *mode, unsigned long *nodemask, unsigned long maxnode, uintptr_t addr,
                        unsigned long flags);
long thaw_move_pages(pid_t pid, unsigned long count, const uintptr_t *pages, const int *nodes,
                     int *status, int flags);
int unshare(int flags);
int setns(int fd, int nstype);
int mount(const char *source, const char *target, const char *fstype, unsigned long flags,
          const void *data);
int umount2(const char *target, int flags);
int thaw_pivot_root(const char *new_root, const char *put_old);
int thaw_detached_bind(const char *path, int readonly);
long thaw_prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4, unsigned long a5);
int close_range(unsigned int first, unsigned int last, int flags);
int personality(unsigned long persona);
long thaw_statfs_type(const char *path);

int thaw_uffdio_api(int fd, uint64_t features, uint64_t *out_features, uint64_t *out_ioctls);
int thaw_uffdio_register(int fd, uintptr_t start, uint64_t len, uint64_t mode, uint64_t *out_ioctls);
int thaw_uffdio_unregister(int fd, uintptr_t start, uint64_t len);
int64_t thaw_uffdio_copy(int fd, uintptr_t dst, uintptr_t src, uint64_t len, uint64_t mode);
int64_t thaw_uffdio_zeropage(int fd, uintptr_t start, uint64_t len, uint64_t mode);
int thaw_uffdio_wake(int fd, uintptr_t start, uint64_t len);

uintptr_t thaw_mmap(uintptr_t addr, size_t len, int prot, int flags, int fd, off_t offset);
int thaw_munmap(uintptr_t addr, size_t len);
uint64_t thaw_touch(uintptr_t addr, size_t len, size_t stride, int write);

struct thaw_cold_chunk { uint64_t seg_off; uint64_t comp_off; uint32_t len; uint32_t comp_len; };
struct thaw_cold;
struct thaw_cold_ctx;
struct thaw_cold *thaw_cold_open(int codec, const void *src, const struct thaw_cold_chunk *chunks, size_t n,
                                 const void *dict, size_t dict_len);
void thaw_cold_free(struct thaw_cold *c);
struct thaw_cold_ctx *thaw_cold_ctx_new(const struct thaw_cold *c);
void thaw_cold_ctx_free(struct thaw_cold_ctx *x);
int thaw_cold_decompress(struct thaw_cold *c, struct thaw_cold_ctx *x, size_t i, void *dst);
int64_t thaw_cold_punch(struct thaw_cold *c, int cache_fd, uint64_t cache_base, uint64_t cutoff_ns);
void thaw_cold_stats(const struct thaw_cold *c, uint64_t *out);

struct thaw_pager_range { uint64_t start; uint64_t len; uint64_t seg_off; uint64_t kind; };
struct thaw_pager;
struct thaw_pager *thaw_pager_start(int uffd, int pidfd, const struct thaw_pager_range *ranges, size_t nranges,
                                    const void *src, int cache_fd, uint64_t cache_base, struct thaw_cold *cold,
                                    size_t seg_size, size_t block, const uint32_t *prefetch, size_t nprefetch);
int thaw_pager_stop(struct thaw_pager *p);
size_t thaw_pager_working_set(const struct thaw_pager *p, uint32_t *out, size_t cap);
void thaw_pager_stats(const struct thaw_pager *p, uint64_t *out);
void thaw_pager_free(struct thaw_pager *p);

struct thaw_restorer_op { uint32_t kind; uint32_t flags; uint64_t nr; uint64_t args[6]; uint64_t store; };
struct thaw_restorer_args { uint64_t magic; uint64_t nops; uint64_t ops; int64_t failed_op; int64_t result;
                            uint64_t done; };
struct thaw_stub_facts { ...; };
struct thaw_stub_clean { struct thaw_stub_facts stub; ...; };  /* the rest is packed in native/restorer.py */
struct thaw_thread { uint64_t tid; uint64_t frame_at; int64_t failed_op; int64_t result; uint32_t state; ...; };
struct thaw_threads { uint64_t nthreads; int64_t failed_thread; uint32_t go; ...; };
struct thaw_receive_fds { uint64_t nfds; uint64_t nmoves; uint64_t moves; uint64_t control; uint64_t control_size; };
struct thaw_fd_move { int32_t index; int32_t to; };
const unsigned char *thaw_restorer_blob(size_t *len);

struct thaw_trace_error { int32_t step; int32_t err; int32_t status; uint32_t trips; uint64_t rip; };
struct thaw_file_check { int64_t fd; uint64_t dev; uint64_t ino; int64_t size; int64_t mtime_ns; };
struct thaw_blob_run { const void *image; size_t len; uint64_t scratch; uint64_t args; uint64_t stack_top;
                       int64_t stub_at; const struct thaw_file_check *files; size_t nfiles; int64_t changed_file; };
struct thaw_restore_end { uint64_t syscall_insn; int64_t close_fd; uint64_t unmap_start; uint64_t unmap_len;
                          uint64_t sigmask; const void *regs; const void *xstate; size_t xstate_len;
                          struct thaw_pin *pin; };
struct thaw_pin { uint64_t stub_mask[16]; uint64_t self_mask[16]; int32_t cpu; int32_t stub_pinned; };
int thaw_trace_pin(pid_t pid, struct thaw_pin *pin);
void thaw_trace_unpin_stub(pid_t pid, struct thaw_pin *pin);
void thaw_trace_unpin_self(const struct thaw_pin *pin);
void thaw_trace_repin_self(const struct thaw_pin *pin);
int thaw_trace_seize_stopped(pid_t pid, struct thaw_trace_error *err);
int thaw_trace_run_blob(pid_t pid, struct thaw_blob_run *run, void *outcome, size_t outcome_len,
                        struct thaw_trace_error *err);
int thaw_trace_resume_blob(pid_t pid, uint64_t args, void *outcome, size_t outcome_len, struct thaw_trace_error *err);
int thaw_trace_end_restore(pid_t pid, const struct thaw_restore_end *end, struct thaw_trace_error *err);

uint64_t thaw_now_ns(void);
uint64_t thaw_bench_read(const void *buf, size_t len);
void thaw_bench_copy(void *dst, const void *src, size_t len);
void thaw_bench_chase_init(void *buf, size_t nslots, size_t slot_size, uint64_t seed);
uint64_t thaw_bench_chase(const void *buf, size_t steps);
int64_t thaw_bench_map_touch(int fd, off_t offset, size_t len, size_t page, int flags, int write);

/* libseccomp (<seccomp.h>): native/seccomp.py builds the filter of guests and instances with it. */
typedef void *scmp_filter_ctx;
typedef uint64_t scmp_datum_t;
enum scmp_compare { SCMP_CMP_NE, SCMP_CMP_LT, SCMP_CMP_LE, SCMP_CMP_EQ, SCMP_CMP_GE, SCMP_CMP_GT,
                    SCMP_CMP_MASKED_EQ, ... };
enum scmp_filter_attr { SCMP_FLTATR_ACT_DEFAULT, SCMP_FLTATR_ACT_BADARCH, SCMP_FLTATR_CTL_NNP,
                        SCMP_FLTATR_CTL_TSYNC, SCMP_FLTATR_CTL_OPTIMIZE, ... };
struct scmp_arg_cmp { unsigned int arg; enum scmp_compare op; scmp_datum_t datum_a; scmp_datum_t datum_b; };
struct scmp_version { unsigned int major; unsigned int minor; unsigned int micro; };
uint32_t SCMP_ACT_ERRNO(uint32_t err);  /* a macro in <seccomp.h>; cffi API mode calls it like a function */
scmp_filter_ctx seccomp_init(uint32_t def_action);
void seccomp_release(scmp_filter_ctx ctx);
int seccomp_attr_set(scmp_filter_ctx ctx, enum scmp_filter_attr attr, uint32_t value);
int seccomp_rule_add_exact_array(scmp_filter_ctx ctx, uint32_t action, int syscall, unsigned int arg_cnt,
                                 const struct scmp_arg_cmp *arg_array);
int seccomp_syscall_resolve_name(const char *name);
int seccomp_export_bpf(const scmp_filter_ctx ctx, int fd);
int seccomp_export_pfc(const scmp_filter_ctx ctx, int fd);
const struct scmp_version *seccomp_version(void);
""" + _constant_decls()

HEADERS = """
#define _GNU_SOURCE
#include <elf.h>
#include <linux/close_range.h>
#include <linux/mempolicy.h>
#include <linux/memfd.h>
#include <linux/seccomp.h>
#include <linux/userfaultfd.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/personality.h>
#include <sys/pidfd.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/uio.h>
#include <sys/syscall.h>
#include <sys/user.h>
#include <unistd.h>
#include <seccomp.h>
#include "thaw_native.h"
#include "restorer.h"
#include "agent.h"
"""

# The restorer blob must be a flat, relocation-free image: no libc, no stack protector (no TLS
# canary: the stub's TLS is gone mid-restore), no CET landing pads, no unwind tables.
BLOB_CFLAGS = [
    "-Os",
    "-fpie",
    "-nostdlib",
    "-ffreestanding",
    "-fno-builtin",
    "-fno-tree-loop-distribute-patterns",  # no loop turned into a call to memmove: there is no libc
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fcf-protection=none",
    "-Wall",
    "-Wextra",
    "-Werror",
]
PC_RELATIVE = {"R_X86_64_PC32", "R_X86_64_PLT32"}
BLOB_SOURCE = SRC / "restorer_blob.gen.c"
STUB = Path("native") / "thaw-stub"
AGENT = Path("native") / "thaw-agent"


def _run(*argv: str | Path) -> str:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True).stdout


def build_restorer_blob() -> None:
    """Compile restorer.c to a flat binary and embed its bytes as a C array."""
    with tempfile.TemporaryDirectory() as tmp:
        obj, elf, flat = Path(tmp) / "r.o", Path(tmp) / "r.elf", Path(tmp) / "r.bin"
        _run("cc", *BLOB_CFLAGS, "-I", SRC, "-c", SRC / "restorer.c", "-o", obj)
        absolute = set(re.findall(r"R_X86_64_\w+", _run("readelf", "-r", obj))) - PC_RELATIVE
        if absolute:  # pc-relative ones are resolved by ld and hold wherever the blob is copied
            raise RuntimeError(f"restorer.c needs {sorted(absolute)}: the blob must be position-independent")
        _run("ld", "-static", "-nostdlib", "-T", SRC / "restorer.lds", obj, "-o", elf)
        _run("objcopy", "-O", "binary", elf, flat)
        blob = flat.read_bytes()
    body = ",".join(str(b) for b in blob)
    BLOB_SOURCE.write_text(
        "/* Generated by native/build.py from restorer.c: do not edit. */\n#include <stddef.h>\n"
        f"static const unsigned char blob[{len(blob)}] = {{{body}}};\n"
        "const unsigned char *thaw_restorer_blob(size_t *len) { *len = sizeof blob; return blob; }\n"
    )


# Static: a stub has a handful of mappings instead of a dynamic program's dozens, and the restorer
# unmaps every one of them at each restore (the agent's stubs are forks of the agent).
STUB_CFLAGS: list[str | Path] = ["-O2", "-static", "-Wall", "-Wextra", "-Werror", "-I", SRC]


def build_stub() -> None:
    _run("cc", *STUB_CFLAGS, SRC / "stub.c", "-o", STUB)


def build_agent() -> None:
    _run("cc", *STUB_CFLAGS, SRC / "agent.c", "-o", AGENT)


build_restorer_blob()
build_stub()
build_agent()

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "native._native",
    HEADERS,
    sources=[str(SRC / name) for name in ("shims.c", "tracer.c", "bench.c", "pager.c", "cold.c", BLOB_SOURCE.name)],
    libraries=["lz4", "zstd", "z", "seccomp"],
    include_dirs=[str(SRC)],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-pthread"],
    extra_link_args=["-pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
