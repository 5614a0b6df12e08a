"""Heartbeats of every world of a worker, sent and checked on one thread of their own.

A worker's event loop may be busy for a while with its own work (a batch, retuning its
early exits, a model warming up). Liveness must not depend on it: a heartbeat that waited
for a free loop made a busy but healthy worker look frozen to its peers, which broke its
worlds and had it replaced. So the heartbeat channels (one plain TCP connection per world)
are served by one ``Heartbeats`` thread per worker: every ``interval_s`` (and only then)
it writes one byte on each channel, reads whatever arrived since, and reports

- EOF or a reset: the peer's process is gone;
- nothing read for ``timeout_s``: the peer's process is stopped (SIGSTOP) or unreachable
  (its own heartbeat thread runs whatever its loop does, so a busy peer keeps beating);
- a GOODBYE byte: the peer closed the world on purpose.

Each report is handed to the world's callback once, from this thread; the callback moves
it onto the world's event loop. The thread needs only the GIL, which a busy Python process
releases every few milliseconds and torch releases in its kernels.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

HEARTBEAT = b"."
GOODBYE = b"C"

#: ``report(reason, goodbye)``: called once per channel, from the heartbeat thread.
Report = Callable[[str, bool], None]


@dataclass(eq=False)
class Channel:
    """One world's heartbeat connection, watched by ``Heartbeats``."""

    sock: socket.socket
    peer: str
    report: Report
    last_heard: float = field(default_factory=time.monotonic)
    done: bool = False  #: reported, or stopped: never reported (again)


class Heartbeats:
    """The heartbeat thread of one worker; ``watch`` a channel per world, ``close`` at exit."""

    def __init__(self, interval_s: float, timeout_s: float) -> None:
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._channels: set[Channel] = set()
        self._woken = threading.Event()  # a channel watched or stopped, or close()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="heartbeats", daemon=True)
        self._thread.start()

    def watch(self, sock: socket.socket, peer: str, report: Report) -> Channel:
        """Beat on ``sock`` and check it from now on."""
        sock.setblocking(False)
        channel = Channel(sock, peer, report)
        with self._lock:
            self._channels.add(channel)
            self._selector.register(sock, selectors.EVENT_READ, channel)
        self._wake()
        return channel

    def stop(self, channel: Channel, goodbye: bool = False) -> None:
        """Stop watching ``channel`` and close it, after a GOODBYE when asked (a world
        closed on purpose: the peer then closes its end without counting a failure)."""
        with self._lock:
            channel.done = True
            if channel in self._channels:
                self._channels.discard(channel)
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(channel.sock)
        if goodbye:
            with contextlib.suppress(OSError):
                channel.sock.send(GOODBYE)
        channel.sock.close()
        self._wake()

    def close(self) -> None:
        """Stop the thread and close every channel still watched."""
        self._stopped = True
        self._wake()
        self._thread.join(5)
        for channel in list(self._channels):
            self.stop(channel)
        self._selector.close()

    @property
    def watched(self) -> int:
        return len(self._channels)

    # -- the thread ---------------------------------------------------------------------

    def _wake(self) -> None:
        self._woken.set()

    def _run(self) -> None:
        # One wake per beat, whatever the number of channels: whatever arrived since the
        # last beat is read in one go. Waking on every incoming byte cost a wake per
        # channel per beat, the largest part of an idle worker's CPU. A dead peer is
        # still seen within a beat here, and at once by the world's receive (its data
        # connection resets too).
        next_beat = time.monotonic()
        while not self._stopped:
            now = time.monotonic()
            if now >= next_beat:
                self._beat()
                next_beat = now + self.interval_s
            self._woken.wait(max(0.0, next_beat - time.monotonic()))
            self._woken.clear()
            try:
                events = self._selector.select(0)
            except (OSError, ValueError):  # a channel closed meanwhile: select again
                continue
            for key, _ in events:
                self._read(key.data)
            self._check_silence()

    def _beat(self) -> None:
        with self._lock:
            channels = list(self._channels)
        for channel in channels:
            try:
                channel.sock.send(HEARTBEAT)
            except BlockingIOError:
                pass  # the peer reads nothing (frozen): its silence tells us soon
            except OSError as exc:
                self._report(channel, f"heartbeat channel failed: {exc}", goodbye=False)

    def _read(self, channel: Channel) -> None:
        try:
            data = channel.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError as exc:
            self._report(channel, f"heartbeat channel failed: {exc}", goodbye=False)
            return
        if not data:
            self._report(
                channel, f"{channel.peer} closed the heartbeat channel (process gone)", False
            )
        elif GOODBYE in data:
            self._report(channel, "closed by the peer", goodbye=True)
        else:
            channel.last_heard = time.monotonic()

    def _check_silence(self) -> None:
        now = time.monotonic()
        with self._lock:
            silent = [c for c in self._channels if now - c.last_heard > self.timeout_s]
        for channel in silent:
            self._report(
                channel,
                f"no heartbeat from {channel.peer} for {self.timeout_s:g} s "
                "(peer frozen or unreachable)",
                goodbye=False,
            )

    def _report(self, channel: Channel, reason: str, goodbye: bool) -> None:
        with self._lock:
            if channel.done:
                return
            channel.done = True
            self._channels.discard(channel)
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(channel.sock)
        try:
            channel.report(reason, goodbye)
        except Exception:  # a loop already closed: nothing left to tell
            log.debug("heartbeat report for %s dropped", channel.peer, exc_info=True)
