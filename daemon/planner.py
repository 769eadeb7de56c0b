"""thawd's keep-alive: the policy of daemon/keepalive.py applied to live functions.

Two decisions, both made on the event loop from plain bookkeeping (no I/O here):

- **How long idle instances stay warm.** The function's own idle timeout where it has one; else,
  with the `fixed` policy, the instances' idle timeout, and with `hybrid`, the keep-alive window
  that the function's idle-time histogram gives after each invocation; where the histogram says
  "unload, then pre-warm later" (a pre-warm window above 0) idle instances go at once: a restore
  from the template takes milliseconds, so holding an instance through the gap buys little, and
  the template stays.
- **What is held of each idle function's template** (CodeCrunch): for every function without a
  live instance, `plan()` chooses warm (the template as captured), compressed (its cold pages in
  a compressed image, snapshot/compress.py) or evicted (no template: the next start captures it
  again from its code, a cold start), minimising the expected start latency within the memory
  budget. Functions with live instances stay warm and their templates count against the budget
  first. It needs the hybrid policy (its histograms) and the measured costs (`load_costs`: the
  JSON `scripts/bench_restore --json` and `scripts/bench_codecs --json` wrote); without either,
  templates are never compressed or evicted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from daemon.keepalive import (
    FixedKeepAlive,
    Form,
    HybridHistogramPolicy,
    KeepAlivePolicy,
    MeasuredCosts,
    plan,
)

MIB = 1 << 20


@dataclass(frozen=True)
class Held:
    """One function's template as the planner sees it."""

    function: str
    memory_mib: float  # its pages uncompressed (what warm holds)
    working_set_mib: float  # what a start touches
    idle_s: float  # since its last invocation ended
    busy: bool  # it has live instances: it stays warm


@dataclass
class Planner:
    policy: KeepAlivePolicy
    costs: MeasuredCosts | None = None
    budget_mib: float = 0.0  # 0: no budget, nothing is compressed or evicted
    horizon_s: float = 60.0
    last_end: dict[str, float] = field(default_factory=dict)  # monotonic end of the last invocation

    @classmethod
    def create(
        cls, policy: str, idle_timeout: float, costs: MeasuredCosts | None, budget_mib: float, horizon_s: float
    ) -> Planner:
        if policy == "fixed":
            return cls(FixedKeepAlive(idle_timeout), costs, budget_mib, horizon_s)
        if policy == "hybrid":
            return cls(HybridHistogramPolicy(), costs, budget_mib, horizon_s)
        raise ValueError(f"keep-alive policy must be fixed or hybrid, not {policy!r}")

    @property
    def plans_templates(self) -> bool:
        return self.budget_mib > 0 and self.costs is not None and isinstance(self.policy, HybridHistogramPolicy)

    # -- bookkeeping -----------------------------------------------------------------------------
    def arrived(self, function: str, now: float) -> None:
        """An invocation arrived: its idle time (since the last one ended) goes into the histogram."""
        end = self.last_end.get(function)
        if end is not None:
            self.policy.record(function, max(now - end, 0.0))

    def finished(self, function: str, now: float) -> None:
        self.last_end[function] = now

    def forget(self, function: str) -> None:
        self.last_end.pop(function, None)
        if isinstance(self.policy, HybridHistogramPolicy):
            self.policy.histograms.pop(function, None)

    def idle_s(self, function: str, now: float) -> float:
        end = self.last_end.get(function)
        return now - end if end is not None else 0.0

    # -- decisions -------------------------------------------------------------------------------
    def instance_keepalive_s(self, function: str, own_timeout: float | None) -> float:
        """How long an idle instance of `function` stays warm after its last invocation: the
        function's own idle timeout where it has one, else what the policy says."""
        if own_timeout is not None:
            return own_timeout
        if isinstance(self.policy, FixedKeepAlive):
            return self.policy.keepalive_s
        windows = self.policy.windows(function)
        return 0.0 if windows.prewarm_s > 0 else windows.keepalive_s

    def forms(self, functions: list[Held]) -> dict[str, Form]:
        """The form each idle function's template should take now (busy ones are warm)."""
        if not self.plans_templates:
            return {h.function: Form.WARM for h in functions}
        assert isinstance(self.policy, HybridHistogramPolicy) and self.costs is not None
        budget = self.budget_mib - sum(h.memory_mib for h in functions if h.busy)
        candidates = []
        for h in functions:
            if h.busy:
                continue
            costs = self.costs.for_function(h.memory_mib, h.working_set_mib)
            windows = self.policy.windows(h.function)
            window_end = windows.prewarm_s + windows.keepalive_s
            candidates.append(self.policy.candidate(h.function, costs, h.idle_s, window_end, self.horizon_s))
        chosen = plan(candidates, max(budget, 0.0))
        return {h.function: Form.WARM if h.busy else chosen[h.function] for h in functions}
