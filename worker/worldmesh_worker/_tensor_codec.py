"""Tensor data of the Open Inference Protocol: datatypes, JSON ``data`` and binary data.

Used by ``protocol.py`` only. Behaviours:
- the OIP datatypes BOOL, UINT8..UINT64, INT8..INT64, FP16, FP32, FP64 and BYTES map to numpy
  dtypes; BYTES is an object array of ``bytes``; BF16 is refused with its own message;
- JSON ``data`` may be flat or nested row-major; nesting is walked level by level (no
  recursion), each list must have the length the shape implies, and nesting deeper than the
  shape or than ``max_depth`` is refused;
- JSON elements are type-checked per datatype: BOOL takes only ``true``/``false``, integer
  types only integers within the dtype's range, float types integers or floats (never
  booleans), BYTES only strings (sent as UTF-8);
- binary data (Triton's binary tensor data extension) is little-endian, one byte per BOOL
  (0 or 1), and each BYTES element is a 4-byte little-endian length then its bytes;
- every error is ``InvalidInput`` whose message starts with the path of the bad element,
  e.g. ``inputs[0].data[1][2]: expected an integer, got string``.
"""

from __future__ import annotations

import math
import struct
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from worldmesh_worker.errors import InvalidInput, WorldmeshError

DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
_UNSUPPORTED = {"BF16": "BF16 is not supported; send FP32 or FP16"}
_LENGTH = struct.Struct("<I")


def check_datatype(value: object, path: str) -> str:
    """``value`` as a supported OIP datatype name, or ``InvalidInput`` naming ``path``."""
    if not isinstance(value, str):
        raise InvalidInput(f"{path}: expected a datatype string, got {kind(value)}")
    if value in _UNSUPPORTED:
        raise InvalidInput(f"{path}: {_UNSUPPORTED[value]}")
    if value not in DTYPES:
        raise InvalidInput(f"{path}: {value!r} is not an OIP datatype; use one of {list(DTYPES)}")
    return value


def kind(value: object) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list"}
    return names.get(type(value), "object" if isinstance(value, dict) else type(value).__name__)


def _index_path(path: str, flat: int, dims: Sequence[int]) -> str:
    """Path of the ``flat``-th element of a row-major nesting whose levels have ``dims``."""
    indices = []
    for dim in reversed(dims):
        flat, rest = divmod(flat, dim)
        indices.append(rest)
    return path + "".join(f"[{i}]" for i in reversed(indices))


def _flatten(
    value: object, shape: tuple[int, ...], path: str, max_depth: int
) -> tuple[list[Any], list[int]]:
    """The leaves of ``value`` in row-major order and the lengths of its nesting levels."""
    if not isinstance(value, list):
        raise InvalidInput(f"{path}: expected a list, got {kind(value)}")
    level: list[list[Any]] = [value]
    dims: list[int] = []
    for depth in range(max(len(shape), 1)):
        nested = next((isinstance(lst[0], list) for lst in level if lst), False)
        if not nested or depth >= len(shape) - 1:
            want = math.prod(shape[depth:])
            for j, lst in enumerate(level):
                if len(lst) != want:
                    where = _index_path(path, j, dims)
                    raise InvalidInput(
                        f"{where}: expected {want} elements for shape {list(shape)}, got {len(lst)}"
                    )
            return [x for lst in level for x in lst], [*dims, want]
        if depth + 2 > max_depth:
            raise InvalidInput(f"{path}: nested deeper than the limit of {max_depth} levels")
        want = shape[depth]
        following: list[Any] = []
        for j, lst in enumerate(level):
            if len(lst) != want:
                where = _index_path(path, j, dims)
                raise InvalidInput(f"{where}: expected {want} elements, got {len(lst)}")
            for k, item in enumerate(lst):
                if not isinstance(item, list):
                    where = _index_path(path, j, dims)
                    raise InvalidInput(f"{where}[{k}]: expected a list, got {kind(item)}")
            following.extend(lst)
        dims.append(want)
        level = following
    raise AssertionError("unreachable")  # pragma: no cover


_ALLOWED: dict[str, tuple[frozenset[type], str]] = {
    "BOOL": (frozenset({bool}), "a boolean"),
    "BYTES": (frozenset({str}), "a string"),
    "i": (frozenset({int}), "an integer"),
    "u": (frozenset({int}), "an integer"),
    "f": (frozenset({int, float}), "a number"),
}


def from_json(
    value: object, datatype: str, shape: tuple[int, ...], path: str, max_depth: int
) -> np.ndarray[Any, Any]:
    """The JSON ``data`` of a tensor as an array of ``shape``."""
    leaves, dims = _flatten(value, shape, path, max_depth)
    dtype = DTYPES[datatype]
    allowed, noun = _ALLOWED.get(datatype) or _ALLOWED[dtype.kind]
    if not set(map(type, leaves)) <= allowed:
        i = next(i for i, x in enumerate(leaves) if type(x) not in allowed)
        deeper = " (nested deeper than the shape)" if isinstance(leaves[i], list) else ""
        raise InvalidInput(
            f"{_index_path(path, i, dims)}: expected {noun}, got {kind(leaves[i])}{deeper}"
        )
    if datatype == "BYTES":
        array = np.empty(len(leaves), dtype=object)
        try:
            array[:] = [s.encode() for s in leaves]
        except UnicodeEncodeError as exc:
            raise InvalidInput(f"{path}: a string is not valid Unicode: {exc.reason}") from None
        return array.reshape(shape)
    if dtype.kind in "iu" and leaves:
        info = np.iinfo(dtype)
        if min(leaves) < info.min or max(leaves) > info.max:
            i = next(i for i, x in enumerate(leaves) if not info.min <= x <= info.max)
            raise InvalidInput(
                f"{_index_path(path, i, dims)}: {leaves[i]} is out of range for {datatype} "
                f"[{info.min}, {info.max}]"
            )
    try:
        with np.errstate(over="ignore"):
            return np.array(leaves, dtype=dtype).reshape(shape)
    except OverflowError:
        i = next(i for i, x in enumerate(leaves) if abs(x) > sys.float_info.max)
        where = _index_path(path, i, dims)
        raise InvalidInput(f"{where}: the number is out of range for {datatype}") from None


def from_binary(
    chunk: bytes | memoryview, datatype: str, shape: tuple[int, ...], path: str
) -> np.ndarray[Any, Any]:
    """The binary data of input ``path`` as a writable native array of ``shape``."""
    count = math.prod(shape)
    where = f"{path}.parameters.binary_data_size"
    if datatype == "BYTES":
        items: list[bytes] = []
        offset, end = 0, len(chunk)
        while offset < end and len(items) < count:
            if offset + 4 > end:
                raise InvalidInput(f"{path}: BYTES element {len(items)} has a truncated length")
            (length,) = _LENGTH.unpack_from(chunk, offset)
            offset += 4
            if offset + length > end:
                raise InvalidInput(f"{path}: BYTES element {len(items)} runs past {where}")
            items.append(bytes(chunk[offset : offset + length]))
            offset += length
        if len(items) != count or offset != end:
            raise InvalidInput(
                f"{where}: {end} bytes do not hold exactly {count} BYTES elements "
                f"for shape {list(shape)}"
            )
        array = np.empty(count, dtype=object)
        array[:] = items
        return array.reshape(shape)
    dtype = DTYPES[datatype]
    if len(chunk) != count * dtype.itemsize:
        raise InvalidInput(
            f"{where}: expected {count * dtype.itemsize} bytes for {count} {datatype} elements "
            f"of shape {list(shape)}, got {len(chunk)}"
        )
    raw = np.frombuffer(chunk, dtype=dtype.newbyteorder("<"))
    if datatype == "BOOL" and count and raw.view(np.uint8).max() > 1:
        raise InvalidInput(f"{path}: BOOL binary data holds a byte other than 0 or 1")
    return raw.astype(dtype).reshape(shape)


def datatype_of(array: np.ndarray[Any, Any], name: str) -> str:
    """The OIP datatype of output ``name``; a dtype with none is a server error (500)."""
    if array.dtype.kind in "OSU":
        return "BYTES"
    for datatype, dtype in DTYPES.items():
        if array.dtype == dtype:
            return datatype
    raise WorldmeshError(f"output {name!r}: dtype {array.dtype} has no OIP datatype")


def _elements(array: np.ndarray[Any, Any], name: str) -> list[bytes]:
    out = []
    for item in array.ravel().tolist():
        if isinstance(item, str):
            item = item.encode()
        if not isinstance(item, bytes):
            raise WorldmeshError(f"output {name!r}: BYTES element is {type(item).__name__}")
        out.append(item)
    return out


def to_json(array: np.ndarray[Any, Any], datatype: str, name: str) -> list[Any]:
    """The flat row-major JSON ``data`` of output ``name``."""
    if datatype != "BYTES":
        return list(array.ravel().tolist())
    try:
        return [item.decode() for item in _elements(array, name)]
    except UnicodeDecodeError:
        raise InvalidInput(
            f"outputs.{name}: BYTES output is not UTF-8 text; request it with binary_data"
        ) from None


def to_binary(array: np.ndarray[Any, Any], datatype: str, name: str) -> bytes:
    """The binary data of output ``name`` (little-endian; BYTES length-prefixed)."""
    if datatype == "BYTES":
        return b"".join(_LENGTH.pack(len(item)) + item for item in _elements(array, name))
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
