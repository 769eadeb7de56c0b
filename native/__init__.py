"""thaw's C boundary: the only package that imports cffi (or ctypes).

Layout, one module per kernel facility, each a thin typed wrapper over `native._native` (built by
`native/build.py` in cffi API mode at install time):

- `errors`      how a failed syscall becomes `OSError(errno, "... (originated from <syscall>)")`
- `constants`   kernel constants as IntEnum/IntFlag, read from the system headers at build time
- `ptrace`      seize/interrupt/regs/xstate/peek/poke/step/syscall/cont/detach/rseq config
- `memory`      process_vm_readv/writev, memfd, mmap/munmap, mbind/set_mempolicy/get_mempolicy,
                move_pages
- `uffd`        userfaultfd (via /dev/userfaultfd or the syscall) and its ioctls
- `pidfd`       pidfd_open, pidfd_getfd, pidfd_send_signal
- `mounts`      mount, umount2, pivot_root, statfs f_type
- `namespaces`  unshare, setns
- `process`     prctl, close_range, personality
- `bench`       C hot loops of the microbenchmarks
- `kerndat`     kernel features probed once (`python -m native.kerndat`)

C returns plain values or fills caller-owned buffers; all policy lives in the callers.
"""
