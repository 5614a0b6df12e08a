"""A world's rendezvous store (``worlds/rendezvous.py``) between two ends of a socket pair.

Covers:
- every Store call the joining end makes reaches the host's store and answers as the
  host's own call would (set, get, wait, check, add, compare_set, delete, num_keys), and
  a Gloo group of two ranks builds over it;
- a wait for a key nobody sets ends after its timeout with an error naming the key, on
  either end, and the host goes on serving;
- after DONE the joiner's store no longer touches the channel: what follows on it is the
  heartbeats';
- a bad frame (an unknown op, a field over the limit) or a peer that hangs up ends the
  host's serving with an error that names it, and wakes the host's own waits.
"""

from __future__ import annotations

import datetime
import socket
import threading

import pytest
import torch
import torch.distributed as dist

from worldmesh_worker.worlds.rendezvous import PairStore, RendezvousError


class Pair:
    """A host store serving on one end of a socket pair, a joiner store on the other."""

    def __init__(self, timeout_s: float = 5.0) -> None:
        self.host_end, self.join_end = socket.socketpair()
        self.host = PairStore(timeout_s)
        self.joiner = PairStore(timeout_s, self.join_end)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            self.host.serve(self.host_end)
        except BaseException as exc:
            self.error = exc

    def close(self) -> None:
        self.joiner.finish()
        self.thread.join(10)
        self.host_end.close()
        self.join_end.close()


def test_the_joiners_calls_reach_the_hosts_store():
    pair = Pair()
    try:
        pair.joiner.set("a", b"1")
        assert pair.host.get("a") == b"1"
        pair.host.set("b", "two")
        assert pair.joiner.get("b") == b"two"
        assert pair.joiner.check(["a", "b"]) and not pair.joiner.check(["a", "c"])
        assert pair.joiner.add("n", 2) == 2 and pair.host.add("n", 3) == 5
        assert pair.joiner.compare_set("a", b"1", b"x") == b"x"
        assert pair.joiner.compare_set("a", b"1", b"y") == b"x"  # not the expected: kept
        assert pair.joiner.num_keys() == pair.host.num_keys() == 3
        assert pair.joiner.delete_key("a") and not pair.joiner.delete_key("a")
        later = threading.Timer(0.2, lambda: pair.host.set("late", b"v"))
        later.start()
        pair.joiner.wait(["late"])
        assert pair.joiner.get("late") == b"v"
    finally:
        pair.close()
    assert pair.error is None


def test_a_wait_for_a_key_nobody_sets_times_out_naming_it():
    pair = Pair()
    try:
        with pytest.raises(RendezvousError, match="'never'"):
            pair.joiner.wait(["never"], datetime.timedelta(seconds=0.2))
        with pytest.raises(RendezvousError, match="'never'"):
            pair.host.wait(["never"], datetime.timedelta(seconds=0.2))
        pair.joiner.set("still", b"served")
        assert pair.host.get("still") == b"served"
    finally:
        pair.close()


def test_after_done_the_joiners_store_leaves_the_channel_alone():
    pair = Pair()
    pair.joiner.set("k", b"v")
    pair.joiner.finish()
    pair.thread.join(5)
    assert not pair.thread.is_alive() and pair.error is None
    pair.join_end.sendall(b".")  # a heartbeat: the host reads it, not the store
    pair.joiner.set("local", b"1")
    assert pair.joiner.check(["local"]) and pair.host_end.recv(1) == b"."
    assert not pair.host.check(["local"])


def test_a_gloo_group_of_two_builds_over_it():
    pair = Pair()
    groups: dict[int, dist.ProcessGroup] = {}
    device = dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")

    def build(rank: int, store: PairStore) -> None:
        options = dist.ProcessGroupGloo._Options()
        options._devices = [device]
        options._timeout = datetime.timedelta(seconds=10)
        groups[rank] = dist.ProcessGroupGloo(store, rank, 2, options)

    threads = [threading.Thread(target=build, args=a) for a in ((0, pair.host), (1, pair.joiner))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    pair.close()
    sent, received = torch.arange(4.0), torch.zeros(4)
    receiving = groups[1].recv([received], 0, 0)
    groups[0].send([sent], 1, 0).wait()
    receiving.wait()
    assert torch.equal(sent, received)


@pytest.mark.parametrize(
    "frame, reason",
    [
        (b"\x00\x00", "unknown op byte 0"),
        (b"S\x01\xff\xff\xff\xff", "field of 4294967295 bytes"),
        (b"G\x01\x00\x00", "hung up"),  # a field cut short: the peer is gone
    ],
    ids=["unknown-op", "oversized-field", "cut-short"],
)
def test_a_bad_frame_ends_serving_with_a_reason_and_wakes_the_host(frame, reason):
    pair = Pair()
    waited: list[BaseException] = []

    def host_waits() -> None:
        try:
            pair.host.wait(["rank-1"])
        except RendezvousError as exc:
            waited.append(exc)

    waiter = threading.Thread(target=host_waits)
    waiter.start()
    pair.join_end.sendall(frame)
    pair.join_end.shutdown(socket.SHUT_WR)
    pair.thread.join(5)
    waiter.join(5)
    assert reason in str(pair.error), pair.error
    assert waited and reason in str(waited[0])
    pair.host_end.close()
    pair.join_end.close()
