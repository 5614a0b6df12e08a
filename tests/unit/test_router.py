"""Next-stage routing (``router.py``) against fake worlds: no process groups, no sockets.

``FakeWorld`` is a test double of the transport: it records every message sent, and
raises ``WorldBroken`` from ``send`` once marked broken. The clock is a fake one.

Covers:
- nothing is sent to a world until its peer says it is accepting (``set_accepting``);
  rows dispatched before then are parked and go out, whole, when it accepts;
- the choice: the accepting world with the fewest outstanding rows; ties rotate, so
  equal worlds share the load; a world that stops accepting gets nothing new;
- a RESULT completes exactly its rows (``on_results`` with those rows' tensors), only
  from the world the rows were sent on; duplicates and strangers are ignored; a RESULT
  that mixes known and unknown rows delivers the known rows' slices;
- ``world_down`` resends exactly that world's unanswered rows, with their own row
  tensors (every tensor of the batch), to another accepting world; it counts retries;
  a late result from the dead world is ignored;
- with no accepting world the rows are parked, then sent when one accepts;
- a send that raises ``WorldBroken`` moves the batch to another world (or parks it);
- retries are bounded by ``max_retries``; beyond it ``on_failures`` names the limit;
- ``sweep`` fails the rows past their deadline (parked or in flight), per the
  injected clock, and only those;
- FAILED messages reach ``on_failures`` with the peer's error;
- ``cancel`` drops rows and sends each world a CANCEL for exactly its rows in flight
  (none for parked or unknown rows, nothing raised for a broken world); ``outstanding``,
  ``in_flight`` and ``has_live`` report state.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from worldmesh_worker.router import Router
from worldmesh_worker.worlds import Message, MessageKind, WorldBroken


class FakeWorld:
    """Records what is sent; ``broken`` makes ``send`` raise as a dead world's does."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sent: list[Message] = []
        self.broken = False

    def send(self, message: Message) -> None:
        if self.broken:
            raise WorldBroken(self.name, "peer gone")
        self.sent.append(message)

    def rows(self) -> list[int]:
        return [row for m in self.sent for row in m.request_ids]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Calls:
    results: list[tuple[list[int], tuple[torch.Tensor, ...]]] = field(default_factory=list)
    failures: list[tuple[list[int], str]] = field(default_factory=list)
    retries: list[int] = field(default_factory=list)

    def answered(self) -> list[int]:
        return [row for rows, _ in self.results for row in rows]

    def failed(self) -> list[int]:
        return [row for rows, _ in self.failures for row in rows]


def make(max_retries: int = 3, timeout_s: float = 10.0) -> tuple[Router, Calls, Clock]:
    calls = Calls()
    clock = Clock()
    router = Router(
        lambda rows, tensors: calls.results.append((list(rows), tensors)),
        lambda rows, error: calls.failures.append((list(rows), error)),
        max_retries,
        timeout_s,
        on_retry=calls.retries.append,
        clock=clock,
    )
    return router, calls, clock


def worlds(router: Router, *names: str, accepting: bool = True) -> list[FakeWorld]:
    out = []
    for name in names:
        world = FakeWorld(name)
        router.add_world(world)  # type: ignore[arg-type]
        if accepting:
            router.set_accepting(name, True)
        out.append(world)
    return out


def batch(rows: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two tensors whose row i is recognisable: x[i] = [k, k, k], tag[i] = k (k = start + i)."""
    k = torch.arange(start, start + rows)
    return k.to(torch.float32)[:, None].repeat(1, 3), k * 10


def result(rows: list[int], base: int = 1000) -> Message:
    values = torch.tensor([base + r for r in rows], dtype=torch.float32)[:, None]
    return Message(MessageKind.RESULT, tuple(rows), (values,))


def assert_rows(message: Message, ids: list[int], source: tuple[torch.Tensor, ...], idx: list[int]):
    assert message.kind is MessageKind.BATCH
    assert list(message.request_ids) == ids
    assert len(message.tensors) == len(source)
    for got, full in zip(message.tensors, source, strict=True):
        assert torch.equal(got, full[idx])


# -- accepting -----------------------------------------------------------------------------


def test_nothing_goes_to_a_world_until_it_accepts() -> None:
    router, calls, _ = make()
    (a,) = worlds(router, "a", accepting=False)
    x = batch(2)
    router.dispatch([1, 2], x)
    assert a.sent == []
    assert router.in_flight == 2
    assert not router.has_live()
    router.set_accepting("a", True)
    assert router.has_live()
    assert len(a.sent) == 1
    assert_rows(a.sent[0], [1, 2], x, [0, 1])
    assert router.outstanding() == {"a": 2}
    assert calls.failures == [] and calls.retries == []


def test_a_world_that_stops_accepting_gets_nothing_new() -> None:
    router, _, _ = make()
    a, b = worlds(router, "a", "b")
    router.set_accepting("a", False)
    for row in range(1, 5):
        router.dispatch([row], batch(1, row))
    assert a.sent == []
    assert b.rows() == [1, 2, 3, 4]


def test_set_accepting_of_an_unknown_world_is_ignored() -> None:
    router, _, _ = make()
    router.set_accepting("nobody", True)
    assert not router.has_live()
    assert router.outstanding() == {}


# -- choice ----------------------------------------------------------------------------------


def test_least_outstanding_world_is_chosen() -> None:
    router, _, _ = make()
    a, b = worlds(router, "a", "b")
    router.dispatch([1, 2, 3], batch(3))
    first, other = (a, b) if a.sent else (b, a)
    assert first.rows() == [1, 2, 3]
    router.dispatch([4], batch(1, 4))
    router.dispatch([5], batch(1, 5))
    assert other.rows() == [4, 5]  # 0 then 1 outstanding, both fewer than 3
    router.dispatch([6, 7], batch(2, 6))  # 2 < 3: still the other one
    assert other.rows() == [4, 5, 6, 7]
    router.dispatch([8], batch(1, 8))  # 4 > 3: back to the first
    assert first.rows() == [1, 2, 3, 8]
    assert router.outstanding() == {first.name: 4, other.name: 4}
    assert router.in_flight == 8


def test_answered_rows_free_their_world() -> None:
    router, _, _ = make()
    a, b = worlds(router, "a", "b")
    router.dispatch([1, 2], batch(2))
    busy = a if a.sent else b
    idle = b if busy is a else a
    router.dispatch([3], batch(1, 3))
    assert idle.rows() == [3]
    router.on_message(busy.name, result([1, 2]))
    assert router.outstanding() == {busy.name: 0, idle.name: 1}
    router.dispatch([4], batch(1, 4))
    assert busy.rows() == [1, 2, 4]


def test_ties_rotate_over_the_worlds() -> None:
    router, calls, _ = make()
    ws = worlds(router, "a", "b", "c")
    chosen = []
    for row in range(1, 10):
        router.dispatch([row], batch(1, row))
        (world,) = [w for w in ws if w.rows() and w.rows()[-1] == row]
        chosen.append(world.name)
        router.on_message(world.name, result([row]))  # back to a tie at 0 outstanding
    assert Counter(chosen) == {"a": 3, "b": 3, "c": 3}
    assert len(set(chosen[:3])) == 3  # each takes a turn before any takes a second
    assert calls.answered() == list(range(1, 10))


# -- results ---------------------------------------------------------------------------------


def test_results_complete_rows_and_duplicates_are_ignored() -> None:
    router, calls, _ = make()
    worlds(router, "a")
    router.dispatch([1, 2], batch(2))
    message = result([1, 2])
    router.on_message("a", message)
    assert calls.results == [([1, 2], message.tensors)]
    assert router.in_flight == 0
    assert router.outstanding() == {"a": 0}
    router.on_message("a", result([1, 2]))  # a duplicate: already answered
    router.on_message("a", result([2]))
    assert len(calls.results) == 1
    assert router.outstanding() == {"a": 0}  # never below zero


def test_result_from_another_world_is_ignored() -> None:
    router, calls, _ = make()
    a, _ = worlds(router, "a", "b")
    router.dispatch([1], batch(1))
    wrong = "b" if a.sent else "a"
    router.on_message(wrong, result([1]))
    router.on_message("stranger", result([1]))
    assert calls.results == []
    assert router.in_flight == 1


def test_partly_known_result_delivers_the_known_rows_slices() -> None:
    router, calls, _ = make()
    worlds(router, "a")
    router.dispatch([5, 6, 7], batch(3))
    router.on_message("a", result([6]))
    router.on_message("a", result([99, 5, 6, 7]))  # 99 unknown, 6 already answered
    assert calls.answered() == [6, 5, 7]
    rows, (values,) = calls.results[1]
    assert rows == [5, 7]
    assert values.flatten().tolist() == [1005.0, 1007.0]
    assert router.in_flight == 0


def test_failed_messages_reach_on_failures() -> None:
    router, calls, _ = make()
    worlds(router, "a")
    router.dispatch([1, 2, 3], batch(3))
    router.on_message("a", Message(MessageKind.FAILED, (1, 3), (), {"error": "stage 2: boom"}))
    assert calls.failures == [([1, 3], "stage 2: boom")]
    router.on_message("a", Message(MessageKind.FAILED, (2,), ()))
    assert calls.failures[1] == ([2], "failed downstream")
    router.on_message("a", Message(MessageKind.FAILED, (1,), (), {"error": "again"}))
    assert len(calls.failures) == 2  # rows already failed are not failed twice
    assert calls.results == [] and router.in_flight == 0
    assert router.outstanding() == {"a": 0}


# -- worlds going down -----------------------------------------------------------------------


def test_world_down_resends_exactly_its_in_flight_rows() -> None:
    router, calls, _ = make()
    a, b = worlds(router, "a", "b")
    x = batch(4, start=10)
    router.dispatch([1, 2, 3, 4], x)
    victim, other = (a, b) if a.sent else (b, a)
    y = batch(1, start=50)
    router.dispatch([9], y)
    assert other.rows() == [9]
    router.on_message(victim.name, result([2]))  # row 2 is already answered
    router.world_down(victim.name)
    assert router.outstanding() == {other.name: 4}
    assert calls.retries == [3]
    resent = other.sent[-1]
    assert_rows(resent, [1, 3, 4], x, [0, 2, 3])  # each row with its own tensors
    assert len(victim.sent) == 1  # nothing more to the dead world
    router.on_message(victim.name, result([1, 3, 4]))  # late, from the dead world: ignored
    assert calls.answered() == [2]
    router.on_message(other.name, result([1, 3, 4, 9]))
    assert sorted(calls.answered()) == [1, 2, 3, 4, 9]
    assert router.in_flight == 0 and calls.failures == []


def test_world_down_regathers_rows_from_different_batches() -> None:
    router, _, _ = make()
    a, b = worlds(router, "a", "b")
    router.set_accepting("b", False)
    x, y = batch(2, start=0), batch(3, start=20)
    router.dispatch([1, 2], x)
    router.dispatch([3, 4, 5], y)
    assert a.rows() == [1, 2, 3, 4, 5]
    router.on_message("a", result([4]))
    router.set_accepting("b", True)
    router.world_down("a")
    (resent,) = b.sent
    assert list(resent.request_ids) == [1, 2, 3, 5]
    want = tuple(torch.cat([x[k], y[k][[0, 2]]]) for k in range(2))
    for got, expected in zip(resent.tensors, want, strict=True):
        assert torch.equal(got, expected)


def test_world_down_of_an_unknown_world_does_nothing() -> None:
    router, calls, _ = make()
    worlds(router, "a")
    router.dispatch([1], batch(1))
    router.world_down("zzz")
    router.world_down("a")
    router.world_down("a")  # twice: the second is a no-op
    assert calls.retries == [1]
    assert router.in_flight == 1  # parked, not lost


def test_rows_are_parked_without_an_accepting_world_and_sent_when_one_accepts() -> None:
    router, calls, _ = make()
    worlds(router, "a")
    x = batch(2, start=7)
    router.dispatch([1, 2], x)
    router.world_down("a")  # no other world: parked
    router.dispatch([3], batch(1, start=30))  # nothing accepts: parked as well
    assert router.in_flight == 3
    assert not router.has_live()
    (b,) = worlds(router, "b", accepting=False)
    assert b.sent == []
    router.set_accepting("b", True)
    (sent,) = b.sent
    assert sorted(sent.request_ids) == [1, 2, 3]
    by_row = {row: i for i, row in enumerate(sent.request_ids)}
    assert torch.equal(sent.tensors[0][by_row[1]], x[0][0])
    assert torch.equal(sent.tensors[0][by_row[2]], x[0][1])
    assert torch.equal(sent.tensors[1][by_row[3]], torch.tensor(300))
    router.on_message("b", result([1, 2, 3]))
    assert sorted(calls.answered()) == [1, 2, 3] and calls.failures == []


def test_a_broken_send_moves_the_batch_to_another_world() -> None:
    router, calls, _ = make()
    a, b = worlds(router, "a", "b")
    a.broken = True
    b.broken = True
    router.dispatch([1, 2], batch(2))
    assert router.in_flight == 2 and not router.has_live()  # both refused: parked
    c = worlds(router, "c")[0]
    assert c.rows() == [1, 2]
    b.broken = False
    router.set_accepting("b", True)
    router.dispatch([3], batch(1, 3))
    assert b.rows() == [3]  # fewer outstanding than c; a stays out (not accepting)
    assert a.sent == [] and calls.failures == []


def test_retries_are_bounded() -> None:
    router, calls, _ = make(max_retries=2)
    ws = worlds(router, "w1", accepting=False)
    router.set_accepting("w1", True)
    router.dispatch([1, 2], batch(2))
    for name in ("w2", "w3", "w4"):
        ws += worlds(router, name, accepting=False)
    for step in range(3):  # bounded: each step kills the world holding the rows
        holder = next(w for w in ws if w.sent and w.name in router.outstanding())
        for w in ws:
            if w.name in router.outstanding() and w is not holder:
                router.set_accepting(w.name, True)
        router.world_down(holder.name)
        if step < 2:
            assert calls.failures == []
    assert calls.retries == [2, 2]
    assert calls.failures == [([1, 2], "gave up after 2 retries")]
    assert router.in_flight == 0
    assert sum(len(w.sent) for w in ws) == 3  # first send plus two retries, no more


def test_zero_retries_fail_at_the_first_broken_world() -> None:
    router, calls, _ = make(max_retries=0)
    worlds(router, "a", "b")
    router.dispatch([1], batch(1))
    holder = next(n for n, k in router.outstanding().items() if k)
    router.world_down(holder)
    assert calls.failures == [([1], "gave up after 0 retries")]
    assert calls.retries == []
    assert router.in_flight == 0


# -- deadlines -------------------------------------------------------------------------------


def test_sweep_fails_rows_past_their_deadline() -> None:
    router, calls, clock = make(timeout_s=5.0)
    router.dispatch([1, 2], batch(2))  # parked: no world, deadline 105
    clock.now += 3
    worlds(router, "a", accepting=False)
    router.set_accepting("a", True)  # rows 1, 2 go out now, deadline unchanged
    router.dispatch([3], batch(1, 3))  # deadline 108
    clock.now = 104.999
    router.sweep()
    assert calls.failures == []
    clock.now = 105.0
    router.sweep()
    assert calls.failures == [([1, 2], "no result within 5 s")]
    assert router.outstanding() == {"a": 1}
    assert router.in_flight == 1
    router.on_message("a", result([1, 2]))  # too late: ignored
    assert calls.results == []
    clock.now = 200.0
    router.sweep()
    assert calls.failed() == [1, 2, 3]
    assert router.outstanding() == {"a": 0} and router.in_flight == 0
    router.sweep()
    assert len(calls.failures) == 2  # nothing left to fail


def test_sweep_fails_parked_rows_when_no_world_ever_accepts() -> None:
    router, calls, clock = make(timeout_s=0.5)
    worlds(router, "a", accepting=False)
    router.dispatch([1], batch(1))
    clock.now += 0.5
    router.sweep()
    assert calls.failures == [([1], "no result within 0.5 s")]
    router.set_accepting("a", True)
    assert router.in_flight == 0


def test_cancel_drops_rows_and_their_outstanding_count() -> None:
    router, calls, clock = make(timeout_s=1.0)
    (a,) = worlds(router, "a")
    router.dispatch([1, 2, 3], batch(3))
    assert router.cancel([1, 3, 42]) == 2
    assert router.in_flight == 1
    assert router.outstanding() == {"a": 1}
    assert [(m.kind, m.request_ids) for m in a.sent[1:]] == [(MessageKind.CANCEL, (1, 3))]
    router.on_message("a", result([1, 2, 3]))
    assert calls.answered() == [2]
    clock.now += 10
    router.sweep()
    assert calls.failures == []


def test_cancel_tells_each_world_only_its_own_rows() -> None:
    router, _, _ = make()
    a, b = worlds(router, "a", "b")
    router.dispatch([1, 2], batch(2))
    router.dispatch([3], batch(1))  # the other world: fewer outstanding
    b.broken = True  # a broken world has dropped its rows already: no error
    assert router.cancel([1, 2, 3]) == 3
    assert [m.request_ids for m in a.sent if m.kind is MessageKind.CANCEL] == [(1, 2)]
    assert router.in_flight == 0


def test_cancelling_parked_rows_sends_nothing() -> None:
    router, _, _ = make()
    (a,) = worlds(router, "a", accepting=False)
    router.dispatch([1], batch(1))
    assert router.cancel([1]) == 0
    router.set_accepting("a", True)
    assert a.sent == [] and router.in_flight == 0


@pytest.mark.parametrize("n_worlds", [1, 2, 5])
def test_every_row_is_answered_exactly_once_across_failures(n_worlds: int) -> None:
    """A little scenario: dispatch, kill every world but the last, answer everything twice."""
    router, calls, _ = make(max_retries=n_worlds)
    ws = worlds(router, *(f"w{i}" for i in range(n_worlds)))
    for row in range(1, 21):
        router.dispatch([row], batch(1, row))
    for w in ws[:-1]:
        router.world_down(w.name)
    last: Any = ws[-1]
    for _ in range(2):
        for message in list(last.sent):
            router.on_message(last.name, result(list(message.request_ids)))
    assert sorted(calls.answered()) == list(range(1, 21))
    assert calls.failures == [] and router.in_flight == 0
