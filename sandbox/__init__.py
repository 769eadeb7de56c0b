"""Type-agnostic sandboxes (namespaces, cgroups, network, rootfs), their pool, and the guest.

    from sandbox.pool import SandboxPool, PoolSettings
    from sandbox.sandbox import SandboxSpec
    from sandbox.cgroups import Limits

Uses native only; never imports snapshot or daemon (the daemon hands `spawn_stub`'s process to
`snapshot.restore`). The guest package (sandbox/guest) is what runs inside.
"""
