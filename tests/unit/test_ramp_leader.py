"""One ramp state per deployment (``ramp_leader.plan``): who tunes, who must follow.

Covers:
- the oldest ready front worker leads (ties by name); a lone worker is left alone;
- every other worker that applies another state, or follows another worker, gets the
  leader's thresholds and active set; one that already applies them gets nothing, so a
  steady deployment costs no control calls;
- a leader that was following (its leader is gone) is told to lead, and the others follow it;
- workers without a tuning controller, and the fixed policy, are left out.
"""

from __future__ import annotations

from typing import Any

from worldmesh_operator.ramp_leader import leader_of, plan


def state(
    thresholds: dict[int, float],
    active: set[int],
    leader: str | None = None,
    policy: str = "online",
) -> dict[str, Any]:
    return {
        "policy": policy,
        "leader": leader,
        "ramps": [
            {"ramp": s, "threshold": t, "active": s in active, "exits": 0}
            for s, t in thresholds.items()
        ],
    }


LEAD = state({0: 0.1, 2: 0.05}, {0})


def test_the_oldest_ready_front_worker_leads() -> None:
    assert leader_of({"b": 5.0, "a": 9.0, "c": 5.0}) == "b"
    assert leader_of({}) is None
    assert plan({"a": 1.0}, {"a": LEAD}) == {}


def test_the_others_follow_the_leaders_thresholds_and_active_set() -> None:
    other = state({0: 0.0, 2: 0.0}, {0, 2})
    bodies = plan({"a": 1.0, "b": 2.0, "c": 3.0}, {"a": LEAD, "b": other, "c": other})
    want = {
        "leader": "a",
        "ramps": [
            {"ramp": 0, "threshold": 0.1, "active": True},
            {"ramp": 2, "threshold": 0.05, "active": False},
        ],
    }
    assert bodies == {"b": want, "c": want}


def test_a_follower_in_step_gets_nothing() -> None:
    follower = state({0: 0.1, 2: 0.05}, {0}, leader="a")
    assert plan({"a": 1.0, "b": 2.0}, {"a": LEAD, "b": follower}) == {}
    # the same numbers, but following someone else (gone): told who leads now
    stale = state({0: 0.1, 2: 0.05}, {0}, leader="x")
    assert set(plan({"a": 1.0, "b": 2.0}, {"a": LEAD, "b": stale})) == {"b"}


def test_a_follower_whose_leader_is_gone_leads_and_the_others_follow_it() -> None:
    new_leader = state({0: 0.1, 2: 0.05}, {0}, leader="gone")
    behind = state({0: 0.3, 2: 0.05}, {0}, leader="gone")
    bodies = plan({"b": 2.0, "c": 3.0}, {"b": new_leader, "c": behind})
    assert bodies["b"] == {"leader": None}
    assert bodies["c"]["leader"] == "b" and bodies["c"]["ramps"][0]["threshold"] == 0.1


def test_workers_without_a_tuner_and_the_fixed_policy_are_left_out() -> None:
    assert plan({"a": 1.0, "b": 2.0}, {"a": LEAD, "b": {"enabled": True, "active": [0]}}) == {}
    fixed = state({0: 0.1}, {0}, policy="fixed")
    assert plan({"a": 1.0, "b": 2.0}, {"a": fixed, "b": state({0: 0.2}, {0}, policy="fixed")}) == {}
    # a ready worker whose status is not known yet is not planned for
    assert plan({"a": 1.0, "b": 2.0}, {"a": LEAD}) == {}
