"""The world wire format (``worlds/wire.py``) without any process group.

Covers:
- ``encode`` then ``parse_header`` then ``decode`` gives back the same kind, request ids,
  meta and tensors (values, dtype, shape) for every dtype the wire carries, for 0-row,
  0-dim and many-dimension tensors, for no ids, no meta and no tensors, and for
  non-contiguous inputs; the payload is 8-byte aligned, and empty only for header-only messages;
- ``encode`` refuses what the format cannot carry (too many tensors or dimensions, an
  unsupported dtype) with ValueError;
- ``parse_header`` rejects each malformed header with ``MalformedMessage`` naming the
  problem: wrong length, bad magic, unknown version, unknown kind, tensor count out of
  range, negative id count or meta length, unknown dtype code, ndim out of range, negative
  or huge dimension, payload over the limit, a size that disagrees with the header;
- ``decode`` rejects meta that is not JSON, not UTF-8, or not a JSON object.
"""

from __future__ import annotations

import pytest
import torch

from worldmesh_worker.worlds.wire import (
    DTYPES,
    HEADER_LEN,
    MAGIC,
    MAX_NDIM,
    MAX_TENSORS,
    VERSION,
    MalformedMessage,
    Message,
    MessageKind,
    decode,
    encode,
    parse_header,
)

LIMIT = 1 << 20


def round_trip(message: Message, limit: int = LIMIT) -> Message:
    header, payload = encode(message)
    assert header.dtype == torch.int64 and header.shape == (HEADER_LEN,)
    assert payload.dtype == torch.uint8
    layout = parse_header(header.clone(), limit)
    assert layout.payload_nbytes == payload.numel()
    # The receiver gets a buffer of its own, never the sender's tensor.
    return decode(layout, payload.clone())


def assert_same(got: Message, sent: Message) -> None:
    assert got.kind is sent.kind
    assert got.request_ids == tuple(sent.request_ids)
    assert got.meta == sent.meta
    assert len(got.tensors) == len(sent.tensors)
    for a, b in zip(got.tensors, sent.tensors, strict=True):
        assert a.dtype == b.dtype
        assert a.shape == b.shape
        assert torch.equal(a, b)


def sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Distinct, exactly representable values of ``dtype`` (signed where it can be)."""
    values = torch.arange(torch.Size(shape).numel(), dtype=torch.int64).reshape(shape)
    if dtype is torch.bool:
        return values.remainder(2) == 1
    if dtype is torch.uint8:
        return values.remainder(256).to(dtype)
    if dtype in (torch.int8, torch.int16):
        return (values.remainder(200) - 100).to(dtype)
    if dtype.is_floating_point:
        return (values.to(torch.float64) - 3).div(4).to(dtype)  # quarters: exact in bf16
    return (values - 3).to(dtype)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=str)
@pytest.mark.parametrize("shape", [(3, 5), (0, 16), (1,), (), (2, 1, 3, 1, 2, 1, 2)], ids=str)
def test_round_trip_every_dtype_and_shape(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    message = Message(MessageKind.BATCH, (7, 8, 9), (sample(dtype, shape),), {"seq": 3})
    assert_same(round_trip(message), message)


@pytest.mark.parametrize("kind", list(MessageKind))
def test_round_trip_every_kind(kind: MessageKind) -> None:
    message = Message(kind, (1,), (torch.ones(1, 2),), {"error": "x"})
    assert_same(round_trip(message), message)


def test_round_trip_several_tensors_of_mixed_dtypes_ids_and_meta() -> None:
    tensors = (
        torch.randn(4, 32),
        torch.tensor([1.5, -2.25, 3.0, 0.0], dtype=torch.bfloat16),
        torch.tensor([True, False, True, True]),
        torch.arange(-2, 2, dtype=torch.int64),
    )
    ids = (0, 1, -5, 2**62)
    meta = {"error": "naïve ünïcode ✓", "nested": {"a": [1, 2.5, None, True]}, "seq": 12}
    message = Message(MessageKind.RESULT, ids, tensors, meta)
    assert_same(round_trip(message), message)


def test_round_trip_empty_message_control() -> None:
    """A CONTROL message has no rows; a message with nothing at all is its header alone."""
    message = Message(MessageKind.CONTROL, (), (), {"accepting": False, "seq": 2})
    _, payload = encode(message)
    assert payload.numel() % 8 == 0 and payload.numel() >= 8
    assert_same(round_trip(message), message)
    for kind in (MessageKind.CONTROL, MessageKind.KEEPALIVE, MessageKind.CLOSE):
        bare = Message(kind, ())
        header, payload = encode(bare)
        assert payload.numel() == 0 and header[6] == 0  # no payload send is made
        assert_same(round_trip(bare), bare)


def test_round_trip_ids_without_tensors() -> None:
    message = Message(MessageKind.FAILED, tuple(range(17)), (), {"error": "stage 2 failed"})
    assert_same(round_trip(message), message)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.arange(48, dtype=torch.float32).reshape(6, 8).t(),  # transposed
        lambda: torch.arange(64, dtype=torch.int64).reshape(8, 8)[::2, 1::3],  # strided
        lambda: torch.arange(10, dtype=torch.float16).expand(3, 10),  # stride 0
        lambda: torch.arange(30, dtype=torch.bfloat16).reshape(5, 6)[:, 2:],  # offset
    ],
    ids=["transposed", "strided", "expanded", "offset"],
)
def test_round_trip_non_contiguous_input(make) -> None:  # type: ignore[no-untyped-def]
    tensor = make()
    assert not tensor.is_contiguous()
    message = Message(MessageKind.BATCH, tuple(range(tensor.shape[0])), (tensor,))
    got = round_trip(message)
    assert_same(got, message)
    assert got.tensors[0].is_contiguous()


def test_round_trip_tensor_that_requires_grad() -> None:
    tensor = torch.ones(2, 3, requires_grad=True) * 2
    got = round_trip(Message(MessageKind.BATCH, (1, 2), (tensor,)))
    assert torch.equal(got.tensors[0], torch.full((2, 3), 2.0))


def test_sections_are_eight_byte_aligned() -> None:
    """Odd-sized ids, meta and tensors: every tensor still starts 8-byte aligned."""
    tensors = (torch.ones(3, dtype=torch.int8), torch.ones(5, dtype=torch.float64))
    message = Message(MessageKind.BATCH, (1,), tensors, {"k": "abc"})
    header, payload = encode(message)
    assert payload.numel() % 8 == 0
    got = decode(parse_header(header, LIMIT), payload)
    for tensor in got.tensors:
        assert (tensor.data_ptr() - payload.data_ptr()) % 8 == 0
    assert_same(got, message)


def test_decoded_tensors_are_views_into_the_payload() -> None:
    message = Message(MessageKind.BATCH, (1, 2), (torch.zeros(2, 4),))
    header, payload = encode(message)
    got = decode(parse_header(header, LIMIT), payload)
    payload.fill_(0)
    got.tensors[0].fill_(1.0)
    assert payload.count_nonzero() > 0  # writing the view wrote the payload: no copy made


def test_encode_refuses_what_the_format_cannot_carry() -> None:
    with pytest.raises(ValueError, match="at most 4 tensors"):
        encode(Message(MessageKind.BATCH, (1,), tuple(torch.ones(1) for _ in range(5))))
    with pytest.raises(ValueError, match="dimensions"):
        encode(Message(MessageKind.BATCH, (1,), (torch.ones([1] * (MAX_NDIM + 1)),)))
    with pytest.raises(ValueError, match=r"tensor 1: dtype torch\.complex64"):
        encode(
            Message(MessageKind.BATCH, (1,), (torch.ones(1), torch.ones(1, dtype=torch.complex64)))
        )


# -- malformed headers -------------------------------------------------------------------


def good_header() -> torch.Tensor:
    """A valid header: 2 ids, meta, one FP32 [2, 3] tensor."""
    header, _ = encode(Message(MessageKind.BATCH, (1, 2), (torch.ones(2, 3),), {"a": 1}))
    parse_header(header, LIMIT)  # sanity: the unmodified header is valid
    return header


def tensor_base(i: int) -> int:
    return 8 + i * (2 + MAX_NDIM)


def corrupt(**changes: int) -> torch.Tensor:
    header = good_header()
    for index, value in changes.items():
        header[int(index.lstrip("_"))] = value
    return header


@pytest.mark.parametrize(
    ("header", "limit", "match"),
    [
        (good_header()[:-1], LIMIT, f"header has {HEADER_LEN - 1} values"),
        (corrupt(_0=0x12345678), LIMIT, "bad magic 0x12345678"),
        (corrupt(_1=VERSION + 1), LIMIT, f"unsupported wire version {VERSION + 1}"),
        (corrupt(_2=0), LIMIT, "unknown message kind 0"),
        (corrupt(_2=99), LIMIT, "unknown message kind 99"),
        (corrupt(_3=MAX_TENSORS + 1), LIMIT, f"tensor count {MAX_TENSORS + 1} outside"),
        (corrupt(_3=-1), LIMIT, "tensor count -1 outside"),
        (corrupt(_4=-1), LIMIT, "negative id count -1"),
        (corrupt(_5=-3), LIMIT, "meta length -3"),
        (corrupt(_6=-8), LIMIT, "payload of -8 bytes outside"),
        (good_header(), 16, "payload of .* bytes outside 0..16"),
        (corrupt(**{f"_{tensor_base(0)}": 0}), LIMIT, "tensor 0: unknown dtype code 0"),
        (corrupt(**{f"_{tensor_base(0)}": 42}), LIMIT, "tensor 0: unknown dtype code 42"),
        (corrupt(**{f"_{tensor_base(0) + 1}": MAX_NDIM + 1}), LIMIT, "tensor 0: 8 dimensions"),
        (corrupt(**{f"_{tensor_base(0) + 1}": -1}), LIMIT, "tensor 0: -1 dimensions"),
        (corrupt(**{f"_{tensor_base(0) + 2}": -2}), LIMIT, r"tensor 0: bad shape \[-2, 3\]"),
        (corrupt(**{f"_{tensor_base(0) + 3}": 2**40}), LIMIT, "tensor 0: bad shape"),
        (
            corrupt(**{f"_{tensor_base(0) + 2}": 1 << 15, f"_{tensor_base(0) + 3}": 1 << 15}),
            LIMIT,
            "tensor 0: shape .* exceeds the payload limit",
        ),
        (corrupt(_6=1024), LIMIT, "payload size 1024 does not match"),
        (corrupt(_4=3), LIMIT, "does not match"),  # one more id than the payload holds
        (corrupt(_5=100), LIMIT, "does not match"),  # meta longer than the payload holds
        (corrupt(_3=0), LIMIT, "does not match"),  # the tensor's bytes are unaccounted for
        (corrupt(**{f"_{tensor_base(0) + 3}": 4}), LIMIT, "does not match"),  # [2, 4] != [2, 3]
    ],
    ids=[
        "short",
        "magic",
        "version",
        "kind-0",
        "kind-99",
        "tensors-high",
        "tensors-negative",
        "ids-negative",
        "meta-negative",
        "payload-negative",
        "payload-over-limit",
        "dtype-0",
        "dtype-42",
        "ndim-high",
        "ndim-negative",
        "dim-negative",
        "dim-huge",
        "shape-over-limit",
        "size-mismatch",
        "ids-mismatch",
        "meta-mismatch",
        "count-mismatch",
        "shape-mismatch",
    ],
)
def test_parse_header_rejects_malformed(header: torch.Tensor, limit: int, match: str) -> None:
    with pytest.raises(MalformedMessage, match=match):
        parse_header(header, limit)


def test_malformed_message_is_a_value_error() -> None:
    assert issubclass(MalformedMessage, ValueError)


def test_parse_header_accepts_payload_exactly_at_the_limit() -> None:
    header, payload = encode(Message(MessageKind.BATCH, (1,), (torch.ones(1, 6),)))
    assert parse_header(header, payload.numel()).payload_nbytes == payload.numel()
    with pytest.raises(MalformedMessage, match="outside"):
        parse_header(header, payload.numel() - 1)


def test_magic_is_the_first_value() -> None:
    assert int(good_header()[0]) == MAGIC


# -- malformed meta ----------------------------------------------------------------------


def with_meta(raw: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """A header and payload whose meta section holds ``raw`` (same length as a valid meta)."""
    placeholder = "x" * (len(raw) - 8)
    header, payload = encode(Message(MessageKind.CONTROL, (5,), (), {"k": placeholder}))
    assert int(header[5]) == len(raw)
    payload[8 : 8 + len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return header, payload


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"{not json at all}", "meta is not JSON"),
        (b'{"a": 1, "b":', "meta is not JSON"),
        (b'{"k": "\xff\xfe\xfd"}    ', "meta is not JSON"),
        (b"[1, 2, 3, 4, 5, 6, 7]", "meta is not a JSON object"),
        (b'"just a string here"', "meta is not a JSON object"),
    ],
    ids=["garbage", "truncated", "not-utf8", "list", "string"],
)
def test_decode_rejects_bad_meta(raw: bytes, match: str) -> None:
    header, payload = with_meta(raw)
    layout = parse_header(header, LIMIT)
    with pytest.raises(MalformedMessage, match=match):
        decode(layout, payload)
