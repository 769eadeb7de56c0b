"""thawd: API server, CLI, function registry, instance manager, keep-alive, FaaS gateway, LoRA workers.

Not built yet (later issues). Imports flow one way: daemon -> snapshot | sandbox -> shmpool -> native;
nothing imports daemon.
"""
