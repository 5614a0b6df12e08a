"""The wire format of a world: every message is a fixed header, then one payload.

A message carries a kind, the request ids it concerns, a small JSON ``meta`` object
and up to ``MAX_TENSORS`` tensors. On the wire it is two Gloo/NCCL sends on the
world's data tag, always in this order from one sender thread:

1. the header, ``HEADER_LEN`` int64 values::

     [MAGIC, VERSION, kind, n_tensors, n_ids, meta_len, payload_nbytes, 0,
      then per tensor: dtype code, ndim, dim_0 .. dim_{MAX_NDIM-1}]

2. the payload, ``payload_nbytes`` uint8: the ids (int64), the meta bytes, then
   each tensor's bytes; every section starts 8-byte aligned, so the receiver
   views tensors in place without a copy. A message with nothing to carry
   (KEEPALIVE, CLOSE) has no payload and is sent as its header alone.

The receiver must size its payload buffer from the header, so a header that does
not add up (bad magic or version, unknown dtype, negative or huge dimension, sizes
that disagree, a payload over the world's limit) cannot be resynchronised: it
raises ``MalformedMessage`` and the world is broken, never the worker.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch

MAGIC = 0x574D5348  # "WMSH"
VERSION = 1
MAX_TENSORS = 4
MAX_NDIM = 7
HEADER_LEN = 8 + MAX_TENSORS * (2 + MAX_NDIM)
_ALIGN = 8

DTYPES: dict[int, torch.dtype] = {
    1: torch.float32,
    2: torch.float16,
    3: torch.bfloat16,
    4: torch.float64,
    5: torch.int64,
    6: torch.int32,
    7: torch.int16,
    8: torch.int8,
    9: torch.uint8,
    10: torch.bool,
}
_CODES = {dtype: code for code, dtype in DTYPES.items()}


class MessageKind(enum.IntEnum):
    BATCH = 1  #: rows to compute, travelling downstream
    RESULT = 2  #: last-stage rows for the same request ids, travelling back upstream
    FAILED = 3  #: the request ids failed downstream for good (meta["error"] says why)
    CONTROL = 4  #: no rows: meta carries flow control ("accepting", "ack")
    KEEPALIVE = 5  #: header only, sent when a direction is idle (see ``world``)
    CLOSE = 6  #: header only, the sender closes the world on purpose; its last message
    EXIT = 7  #: ramp answers travelling upstream: logits [ramps, ids, classes], meta "ramps"
    CANCEL = 8  #: no tensors: the sender no longer wants these ids (their client went away)


class MalformedMessage(ValueError):
    """A peer sent bytes that are not a valid message."""


@dataclass(frozen=True, slots=True)
class Message:
    kind: MessageKind
    request_ids: tuple[int, ...]
    tensors: tuple[torch.Tensor, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def encode(message: Message) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (header, payload) for ``message``; raises ValueError for what the format cannot carry."""
    tensors = message.tensors
    if len(tensors) > MAX_TENSORS:
        raise ValueError(f"a message carries at most {MAX_TENSORS} tensors, got {len(tensors)}")
    meta = json.dumps(message.meta, separators=(",", ":")).encode() if message.meta else b""
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    ids_nbytes = 8 * len(message.request_ids)
    offset = _aligned(ids_nbytes) + _aligned(len(meta))
    layout: list[tuple[int, torch.Tensor]] = []
    values = [MAGIC, VERSION, int(message.kind), len(tensors), len(message.request_ids), len(meta)]
    header[: len(values)] = torch.tensor(values, dtype=torch.int64)
    for i, tensor in enumerate(tensors):
        if tensor.dtype not in _CODES:
            raise ValueError(f"tensor {i}: dtype {tensor.dtype} cannot travel on a world")
        if tensor.dim() > MAX_NDIM:
            raise ValueError(f"tensor {i}: {tensor.dim()} dimensions, at most {MAX_NDIM}")
        base = 8 + i * (2 + MAX_NDIM)
        header[base] = _CODES[tensor.dtype]
        header[base + 1] = tensor.dim()
        if tensor.dim():
            header[base + 2 : base + 2 + tensor.dim()] = torch.tensor(tensor.shape)
        layout.append((offset, tensor))
        offset = _aligned(offset + tensor.numel() * tensor.element_size())
    total = offset  # 0: a header-only message (Gloo refuses zero-byte sends: none is made)
    header[6] = total
    payload = torch.empty(total, dtype=torch.uint8)
    if message.request_ids:
        payload[:ids_nbytes].view(torch.int64).copy_(torch.tensor(message.request_ids))
    if meta:
        start = _aligned(ids_nbytes)
        payload[start : start + len(meta)].copy_(
            torch.frombuffer(bytearray(meta), dtype=torch.uint8)
        )
    for start, tensor in layout:
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes:
            dst = payload[start : start + nbytes].view(tensor.dtype).view(tensor.shape)
            dst.copy_(tensor.detach().to("cpu"))
    return header, payload


@dataclass(frozen=True, slots=True)
class Layout:
    """What a valid header announces: enough to receive and then decode the payload."""

    kind: MessageKind
    n_ids: int
    meta_len: int
    payload_nbytes: int
    tensors: tuple[tuple[torch.dtype, tuple[int, ...]], ...]


def parse_header(header: torch.Tensor, max_payload_bytes: int) -> Layout:
    """Check a received header; raise MalformedMessage naming the first thing wrong."""
    h = header.tolist()
    if len(h) != HEADER_LEN:
        raise MalformedMessage(f"header has {len(h)} values, expected {HEADER_LEN}")
    if h[0] != MAGIC:
        raise MalformedMessage(f"bad magic {h[0]:#x} (expected {MAGIC:#x})")
    if h[1] != VERSION:
        raise MalformedMessage(f"unsupported wire version {h[1]} (this worker speaks {VERSION})")
    try:
        kind = MessageKind(h[2])
    except ValueError:
        raise MalformedMessage(f"unknown message kind {h[2]}") from None
    n_tensors, n_ids, meta_len, payload_nbytes = h[3], h[4], h[5], h[6]
    if not 0 <= n_tensors <= MAX_TENSORS:
        raise MalformedMessage(f"tensor count {n_tensors} outside 0..{MAX_TENSORS}")
    if not 0 <= payload_nbytes <= max_payload_bytes:
        raise MalformedMessage(
            f"payload of {payload_nbytes} bytes outside 0..{max_payload_bytes} (the world's limit)"
        )
    if n_ids < 0 or meta_len < 0:
        raise MalformedMessage(f"negative id count {n_ids} or meta length {meta_len}")
    offset = _aligned(8 * n_ids) + _aligned(meta_len)
    tensors = []
    for i in range(n_tensors):
        base = 8 + i * (2 + MAX_NDIM)
        code, ndim = h[base], h[base + 1]
        if code not in DTYPES:
            raise MalformedMessage(f"tensor {i}: unknown dtype code {code}")
        if not 0 <= ndim <= MAX_NDIM:
            raise MalformedMessage(f"tensor {i}: {ndim} dimensions outside 0..{MAX_NDIM}")
        shape = tuple(h[base + 2 : base + 2 + ndim])
        if any(d < 0 or d > max_payload_bytes for d in shape):
            raise MalformedMessage(f"tensor {i}: bad shape {list(shape)}")
        dtype = DTYPES[code]
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > max_payload_bytes:
            raise MalformedMessage(f"tensor {i}: shape {list(shape)} exceeds the payload limit")
        tensors.append((dtype, shape))
        offset = _aligned(offset + nbytes)
    if offset != payload_nbytes:
        raise MalformedMessage(
            f"payload size {payload_nbytes} does not match the {offset} bytes the header describes"
        )
    return Layout(kind, n_ids, meta_len, payload_nbytes, tuple(tensors))


def decode(layout: Layout, payload: torch.Tensor) -> Message:
    """Build the message from a payload received for ``layout`` (tensors are views into it)."""
    ids_nbytes = 8 * layout.n_ids
    ids = tuple(payload[:ids_nbytes].view(torch.int64).tolist()) if layout.n_ids else ()
    meta: dict[str, Any] = {}
    if layout.meta_len:
        start = _aligned(ids_nbytes)
        raw = payload[start : start + layout.meta_len].numpy().tobytes()
        try:
            meta = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MalformedMessage(f"meta is not JSON: {exc}") from None
        if not isinstance(meta, dict):
            raise MalformedMessage("meta is not a JSON object")
    offset = _aligned(ids_nbytes) + _aligned(layout.meta_len)
    tensors = []
    for dtype, shape in layout.tensors:
        nbytes = math.prod(shape) * dtype.itemsize
        tensors.append(payload[offset : offset + nbytes].view(dtype).view(shape))
        offset = _aligned(offset + nbytes)
    return Message(layout.kind, ids, tuple(tensors), meta)
