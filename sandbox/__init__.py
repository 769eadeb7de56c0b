"""Type-agnostic sandboxes (namespaces, cgroups, network, rootfs) and the guest. Not built yet (issue 4).

Uses shmpool and native only; never imports snapshot or daemon.
"""
