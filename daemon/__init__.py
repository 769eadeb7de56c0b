"""thawd: API server, CLI, function registry, instance manager, FaaS gateway, LoRA workers.

- `main`       thawd itself: start-up (pool, orphan reaping, sandbox pool), serving, SIGTERM drain
- `config`     every setting, from the TOML file and flags (`thawd.example.toml` is generated from it)
- `registry`   deployed functions and their revisions on disk
- `keepalive`  the keep-alive policy (hybrid histogram + CodeCrunch cost model; `scripts/simulate_keepalive`)
- `instances`  deploy (capture), invoke (thaw or reuse), keep-alive, the tracer thread
- `server`     the REST API on the Unix socket; `openapi.json` documents it
- `gateway`    the OpenFaaS provider API on TCP
- `cli`        `thaw`, which talks only to the API
- `lora/`      LoRA serving: the daemon's side (host, api, spec) and the worker's (torch)
- `demo`, `quickstart`, `sdnotify`, `logs`, `metrics`, `errors`, `bodies` (JSON request bodies)

Imports flow one way: daemon -> snapshot | sandbox -> shmpool -> native; nothing imports daemon.
torch is imported only in daemon/lora's worker-side modules, never in thawd's process.
"""
