"""Prometheus metrics of one daemon (served at GET /metrics)."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

RESTORE_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.invocations = Counter(
            "thaw_invocations", "Invocations by function and outcome", ["function", "outcome"], registry=self.registry
        )
        self.starts = Counter(
            "thaw_starts",
            "Instance starts: cold (a guest initialised at deploy, from scratch or from the runtime "
            "template), restored (thawed from a template) and warm (an invocation served by a live instance)",
            ["function", "kind"],
            registry=self.registry,
        )
        self.restore_seconds = Histogram(
            "thaw_restore_seconds",
            "From a free sandbox to an instance that said RESTORED",
            buckets=RESTORE_BUCKETS,
            registry=self.registry,
        )
        self.thaw_steps = Histogram(
            "thaw_thaw_step_seconds",
            "The steps of a thaw (daemon/thawing.py): sandbox (a sandbox and its stub, handed its fds), "
            "to_worker (until a ptrace worker starts the restore), restore (restore() on it), from_worker "
            "(until the event loop takes the result), channel (the instance's channel opened), restored "
            "(until the instance said RESTORED)",
            ["step"],
            buckets=RESTORE_BUCKETS,
            registry=self.registry,
        )
        self.invocation_steps = Histogram(
            "thaw_invocation_step_seconds",
            "The steps of an invocation inside the daemon: instance (until it had one: an idle one, or one "
            "thawed for it), exchange (the request to its instance and the reply back)",
            ["step"],
            buckets=RESTORE_BUCKETS,
            registry=self.registry,
        )
        self.invocation_seconds = Histogram(
            "thaw_invocation_seconds", "Invocation latency inside the daemon", ["function"], registry=self.registry
        )
        self.quarantined = Counter(
            "thaw_quarantined_segments",
            "Pool segments that failed a checksum and were taken out of use",
            registry=self.registry,
        )
        self.instances = Gauge("thaw_instances", "Live instances", ["function"], registry=self.registry)
        self.pool_bytes = Gauge("thaw_pool_bytes", "Pool capacity and use", ["kind"], registry=self.registry)
        self.sandboxes = Gauge("thaw_sandboxes", "Sandboxes by state", ["state"], registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def forget(self, function: str) -> None:
        """Drop a deleted function's series."""
        for metric in (self.instances, self.invocation_seconds):
            with contextlib.suppress(KeyError):
                metric.remove(function)
