"""Capture a guest into a template and restore instances (cow | copy | lazy).

Built so far (issue 3 is in progress): the building blocks of capture —
- `procfs`  mappings, present pages (pagemap), threads and run state of a process
- `inject`  seizing a parked process and running syscalls inside it with ptrace
`capture()` / `restore()`, the restorer blob and the lazy pager are not built yet.

Uses shmpool and native only; never imports sandbox or daemon.
"""
