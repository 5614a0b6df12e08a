"""A world's rendezvous: a ``torch.distributed.Store`` kept by the host end and reached by
the joining end over the world's own heartbeat channel, before that carries heartbeats.

Why not ``TCPStore``: its client turns every address it connects to into a name
(``getnameinfo`` without ``NI_NUMERICHOST``), so every open waited on a reverse DNS
lookup, and about one in fifty waited for the resolver's 5 s timeout (world-open p99
5.0 s). Its server was also one more port per world, open to anyone who reached it,
and one more thread for the life of the world. The heartbeat channel is already
connected, and both ends have proved who they are on it (``manager._hello``), so the
rendezvous adds no port, no thread after the open, and no lookup.

The store lives on the host: its own calls are local, and the joiner's go over the
channel as requests, one at a time, each answered. When its group is built the joiner
says DONE; the host stops serving, and from then on the channel carries heartbeats only
(neither end writes a heartbeat before that). After the open, the joiner's store is a
local one: a late call on it (NCCL's monitor may check a key) never touches the channel.

Frames: one op byte, a field count byte, and each field as a 4-byte big-endian length
and its bytes. A frame that breaks these rules, or a field over ``MAX_FIELD`` bytes,
ends the open with an error that says so.
"""

from __future__ import annotations

import datetime
import socket
import struct
import threading
import time
from enum import IntEnum

import torch.distributed as dist

MAX_FIELD = 1 << 20  # rendezvous values are addresses and ids: a few hundred bytes
_LENGTH = struct.Struct(">I")


class Op(IntEnum):
    """A frame's first byte: requests (joiner -> host), then answers (host -> joiner)."""

    SET = ord("S")  # key, value
    GET = ord("G")  # key
    WAIT = ord("W")  # seconds, keys...
    CHECK = ord("C")  # keys...
    ADD = ord("A")  # key, amount
    COMPARE_SET = ord("X")  # key, expected, desired
    DELETE = ord("K")  # key
    NUM_KEYS = ord("N")
    DONE = ord("F")  # the joiner's group is built: the rendezvous is over
    OK = ord("R")  # the answer's fields
    ERROR = ord("E")  # the error's message


class RendezvousError(dist.DistStoreError):
    """The rendezvous failed: timed out, the peer hung up, or it sent a bad frame."""


class PairStore(dist.Store):
    """The two-rank store of one world; ``PairStore(timeout_s)`` on the host (then
    ``serve``), ``PairStore(timeout_s, channel)`` on the joiner (then ``finish``)."""

    def __init__(self, timeout_s: float, channel: socket.socket | None = None) -> None:
        super().__init__()
        self._timeout_s = timeout_s
        self._data: dict[str, bytes] = {}
        self._changed = threading.Condition()
        self._closed: str | None = None  # why waits end at once (the open failed)
        self._channel = channel  # the joiner's way to the host, during the rendezvous only
        self._channel_lock = threading.Lock()

    # -- the Store API (called by Gloo/NCCL from their own threads) ---------------------

    def set(self, key: str, value: bytes | str) -> None:
        value = value.encode() if isinstance(value, str) else bytes(value)
        if self._remote():
            self._request(Op.SET, key.encode(), value)
            return
        with self._changed:
            self._data[key] = value
            self._changed.notify_all()

    def get(self, key: str) -> bytes:
        if self._remote():
            return self._request(Op.GET, key.encode())[0]
        self.wait([key])
        with self._changed:
            return self._data[key]

    def wait(self, keys: list[str], timeout: datetime.timedelta | None = None) -> None:
        seconds = self._timeout_s if timeout is None else timeout.total_seconds()
        if self._remote():
            self._request(Op.WAIT, str(seconds).encode(), *(k.encode() for k in keys))
            return
        deadline = time.monotonic() + seconds
        with self._changed:
            while not all(k in self._data for k in keys):
                left = deadline - time.monotonic()
                if self._closed is not None:
                    raise RendezvousError(self._closed)
                if left <= 0:
                    missing = [k for k in keys if k not in self._data]
                    raise RendezvousError(
                        f"rendezvous timed out after {seconds:g} s waiting for {missing}"
                    )
                self._changed.wait(left)

    def check(self, keys: list[str]) -> bool:
        if self._remote():
            return self._request(Op.CHECK, *(k.encode() for k in keys))[0] == b"1"
        with self._changed:
            return all(k in self._data for k in keys)

    def add(self, key: str, value: int) -> int:
        if self._remote():
            return int(self._request(Op.ADD, key.encode(), str(value).encode())[0])
        with self._changed:
            total = int(self._data.get(key, b"0")) + value
            self._data[key] = str(total).encode()
            self._changed.notify_all()
            return total

    def compare_set(self, key: str, expected: bytes | str, desired: bytes | str) -> bytes:
        expected = expected.encode() if isinstance(expected, str) else bytes(expected)
        desired = desired.encode() if isinstance(desired, str) else bytes(desired)
        if self._remote():
            return self._request(Op.COMPARE_SET, key.encode(), expected, desired)[0]
        with self._changed:
            current = self._data.get(key)
            if (current is None and expected == b"") or current == expected:
                self._data[key] = current = desired
                self._changed.notify_all()
            return expected if current is None else current

    def delete_key(self, key: str) -> bool:
        if self._remote():
            return self._request(Op.DELETE, key.encode())[0] == b"1"
        with self._changed:
            return self._data.pop(key, None) is not None

    def num_keys(self) -> int:
        if self._remote():
            return int(self._request(Op.NUM_KEYS)[0])
        with self._changed:
            return len(self._data)

    def set_timeout(self, timeout: datetime.timedelta) -> None:
        self._timeout_s = timeout.total_seconds()

    # -- the host's side --------------------------------------------------------------

    def serve(self, channel: socket.socket) -> None:
        """Answer the joiner's requests on ``channel`` until it says DONE (blocking,
        bounded by the store's timeout: run on a thread of its own)."""
        deadline = time.monotonic() + self._timeout_s
        try:
            while True:
                op, fields = _read_frame(channel, deadline)
                if op == Op.DONE:
                    return
                try:
                    answer = self._answer(op, fields)
                except (RendezvousError, ValueError, UnicodeDecodeError) as exc:
                    _write_frame(channel, Op.ERROR, str(exc).encode())
                else:
                    _write_frame(channel, Op.OK, *answer)
        except (OSError, ValueError) as exc:  # OSError: timeouts and hang-ups too
            reason = f"rendezvous with the joining end failed: {_describe(exc)}"
            self.close(reason)
            raise RendezvousError(reason) from None

    def _answer(self, op: int, fields: list[bytes]) -> list[bytes]:
        try:
            match op:
                case Op.SET:
                    self.set(fields[0].decode(), fields[1])
                    return []
                case Op.GET:
                    return [self.get(fields[0].decode())]
                case Op.WAIT:
                    seconds = min(float(fields[0]), self._timeout_s)
                    self.wait([f.decode() for f in fields[1:]], datetime.timedelta(seconds=seconds))
                    return []
                case Op.CHECK:
                    return [b"1" if self.check([f.decode() for f in fields]) else b"0"]
                case Op.ADD:
                    return [str(self.add(fields[0].decode(), int(fields[1]))).encode()]
                case Op.COMPARE_SET:
                    return [self.compare_set(fields[0].decode(), fields[1], fields[2])]
                case Op.DELETE:
                    return [b"1" if self.delete_key(fields[0].decode()) else b"0"]
                case Op.NUM_KEYS:
                    return [str(self.num_keys()).encode()]
                case _:
                    raise ValueError(f"rendezvous request {op!r} is not a request")
        except IndexError:
            raise ValueError(f"rendezvous request {chr(op)!r} is missing a field") from None

    def close(self, reason: str) -> None:
        """End every wait at once with ``reason`` (the open failed)."""
        with self._changed:
            self._closed = reason
            self._changed.notify_all()

    # -- the joiner's side ------------------------------------------------------------

    def finish(self) -> None:
        """Tell the host this end's group is built; the channel is the heartbeats' now."""
        with self._channel_lock:
            if self._channel is not None:
                _write_frame(self._channel, Op.DONE)
                self._channel = None

    def _remote(self) -> bool:
        return self._channel is not None

    def _request(self, op: int, *fields: bytes) -> list[bytes]:
        with self._channel_lock:
            if self._channel is None:
                raise RendezvousError("the rendezvous is over")
            deadline = time.monotonic() + self._timeout_s + 1.0  # the host's own wait first
            try:
                _write_frame(self._channel, op, *fields)
                status, answer = _read_frame(self._channel, deadline)
            except (OSError, ValueError) as exc:
                raise RendezvousError(
                    f"rendezvous with the host failed: {_describe(exc)}"
                ) from None
        if status == Op.ERROR:
            raise RendezvousError(answer[0].decode(errors="replace") if answer else "error")
        if status != Op.OK:
            raise RendezvousError(f"rendezvous answer {status!r} is neither OK nor ERROR")
        return answer


def _write_frame(sock: socket.socket, op: int, *fields: bytes) -> None:
    parts = [bytes([op, len(fields)])]
    for field in fields:
        parts += [_LENGTH.pack(len(field)), field]
    sock.sendall(b"".join(parts))


def _read_frame(sock: socket.socket, deadline: float) -> tuple[Op, list[bytes]]:
    byte, count = _read(sock, 2, deadline)
    try:
        op = Op(byte)
    except ValueError:
        raise ValueError(f"rendezvous frame with unknown op byte {byte}") from None
    fields = []
    for _ in range(count):
        (length,) = _LENGTH.unpack(_read(sock, 4, deadline))
        if length > MAX_FIELD:
            raise ValueError(f"rendezvous field of {length} bytes (at most {MAX_FIELD})")
        fields.append(_read(sock, length, deadline))
    return op, fields


def _read(sock: socket.socket, n: int, deadline: float) -> bytes:
    data = b""
    while len(data) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("rendezvous timed out")
        sock.settimeout(left)
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the peer hung up during the rendezvous")
        data += chunk
    return data


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
