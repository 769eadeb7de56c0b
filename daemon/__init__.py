"""thawd: API server, CLI, function registry, instance manager, keep-alive, FaaS gateway, LoRA workers.

The daemon is not built yet (later issues). What exists: `demo`, which wires the guest launcher
(sandbox.guest) to the snapshot engine as the daemon will (`python -m daemon.demo`, the main job
of scripts/quickstart). Imports flow one way: daemon -> snapshot | sandbox -> shmpool -> native;
nothing imports daemon.
"""
