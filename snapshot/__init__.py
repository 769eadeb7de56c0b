"""Capture a guest into a template and restore instances (cow | copy | lazy).

- `capture`   capture(pid, pool, name) -> Template: a parked guest into a pool segment + manifest
- `restore`   restore(template, stub, mode) -> Instance: a stopped stub becomes an instance, through
              the restorer blob (native/src/restorer.c) running a syscall program inside the stub
- `template`  Template: an opened template (verified), the fds a stub needs, cache and working set
- `compress`  compress(pool, name, codec) -> Template "NAME.z": cold pages in a compressed image the
              pager inflates on fault; expand() gives the plain template back
- `manifest`  the template format (header, manifest, versioning)
- `stub`      launch_stub: thaw's own stub launcher for restores without a sandbox
- `procfs`    mappings, present pages (pagemap), threads and run state of a process
- `inject`    seizing a parked process and running syscalls inside it with ptrace
- `cli`       python -m snapshot show NAME

Uses shmpool and native only; never imports sandbox or daemon. All ptrace calls for one process
must come from one thread (the one that seized it).
"""
