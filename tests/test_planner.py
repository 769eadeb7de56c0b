"""thawd's keep-alive decisions (daemon/planner.py): pure bookkeeping over daemon/keepalive.py."""

from __future__ import annotations

import pytest

from daemon.keepalive import Form, MeasuredCosts, SizeCosts
from daemon.planner import Held, Planner

COSTS = MeasuredCosts(
    sizes=(SizeCosts(64.0, 300.0, 3.0),),
    restore_mode="cow",
    codec="zstd",
    level=3,
    data="python-heap",
    ratio=8.0,
    decompress_mb_s=600.0,
)


def test_the_functions_own_idle_timeout_wins_else_the_policy() -> None:
    fixed = Planner.create("fixed", 300.0, None, 0.0, 60.0)
    assert fixed.instance_keepalive_s("f", None) == 300.0
    assert fixed.instance_keepalive_s("f", 0.0) == 0.0
    hybrid = Planner.create("hybrid", 300.0, None, 0.0, 60.0)
    assert hybrid.instance_keepalive_s("f", 5.0) == 5.0
    assert hybrid.instance_keepalive_s("f", None) == 4 * 3600.0  # too few idle times: the 4-hour fallback


def test_idle_times_feed_the_histogram_and_forget_drops_them() -> None:
    planner = Planner.create("hybrid", 300.0, None, 0.0, 60.0)
    planner.arrived("f", 0.0)  # a first arrival has no idle time before it
    for i in range(6):
        planner.finished("f", i * 100.0)
        planner.arrived("f", i * 100.0 + 30.0)
    assert planner.policy.histogram("f").samples == 6  # type: ignore[attr-defined]
    assert planner.idle_s("f", 530.0) == 30.0
    windows = planner.instance_keepalive_s("f", None)
    assert windows < 4 * 3600.0  # six 30 s idle times: a representative histogram, a short window
    planner.forget("f")
    assert planner.idle_s("f", 1000.0) == 0.0
    assert planner.instance_keepalive_s("f", None) == 4 * 3600.0


def test_without_a_budget_or_costs_every_template_stays_warm() -> None:
    held = [Held("a", 100.0, 10.0, 50.0, False), Held("b", 100.0, 10.0, 50.0, True)]
    assert not Planner.create("hybrid", 300.0, None, 1.0, 60.0).plans_templates
    assert Planner.create("hybrid", 300.0, COSTS, 0.0, 60.0).forms(held) == {"a": Form.WARM, "b": Form.WARM}
    assert Planner.create("fixed", 300.0, COSTS, 1.0, 60.0).forms(held) == {"a": Form.WARM, "b": Form.WARM}


def test_a_budget_compresses_idle_templates_and_leaves_busy_ones_warm() -> None:
    planner = Planner.create("hybrid", 300.0, COSTS, 150.0, 60.0)
    held = [Held("busy", 100.0, 10.0, 0.0, True), Held("idle", 100.0, 10.0, 50.0, False)]
    # 50 MiB left after the busy one: the idle one fits compressed (100 / 8), not warm
    assert planner.forms(held) == {"busy": Form.WARM, "idle": Form.COMPRESSED}
    tight = Planner.create("hybrid", 300.0, COSTS, 105.0, 60.0)
    assert tight.forms(held) == {"busy": Form.WARM, "idle": Form.EVICTED}


def test_an_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="fixed or hybrid, not 'lru'"):
        Planner.create("lru", 300.0, None, 0.0, 60.0)
