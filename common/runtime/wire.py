"""Tensor <-> protobuf conversion for the negative-queue service.

A tensor travels as dtype + shape + raw little-endian row-major bytes
(``proto/negatives.proto``, message ``Tensor``). Decoding is strict: the dtype
must be one this module knows, the shape non-negative, and the byte length must
match the shape exactly, so a truncated or padded payload is refused before any
of it is interpreted. Both sides use this module; it needs protobuf but not grpc.

The hot messages (a Pull reply, a Push request) are mostly one tensor.
:func:`serialize_with_tensor` and :func:`parse_with_tensor` move its bytes
between a torch tensor and the serialised message with one copy each way, where
going through a ``Tensor`` message's ``data`` field costs three or four (numpy
-> Python bytes -> protobuf -> serialised bytes, and the reverse): copies of a
megabyte that show in the throughput and, under glibc's heap trimming, as page
faults. Both produce and accept plain protobuf: any peer reads what
:func:`serialize_with_tensor` writes, and :func:`parse_with_tensor` reads what
any peer writes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from typing import TypeVar

import numpy as np
import torch
from google.protobuf.message import DecodeError, Message

from common.runtime.text import brief
from proto import negatives_pb2 as pb

#: gRPC metadata key that carries the caller's queue token (lower case, as gRPC requires).
TOKEN_METADATA_KEY = "x-fedcontrast-token"

_TORCH_TO_WIRE = {torch.float32: pb.DTYPE_FLOAT32, torch.float16: pb.DTYPE_FLOAT16}
_WIRE_TO_TORCH = {v: k for k, v in _TORCH_TO_WIRE.items()}
_WIRE_TO_NUMPY = {pb.DTYPE_FLOAT32: np.dtype("<f4"), pb.DTYPE_FLOAT16: np.dtype("<f2")}

# Protobuf wire types (https://protobuf.dev/programming-guides/encoding/); groups
# (3, 4) cannot occur in these proto3 messages and are refused.
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_TENSOR_DATA = pb.Tensor.DESCRIPTOR.fields_by_name["data"].number

#: Most dimensions a decoded tensor may have (torch's own limit is 64).
MAX_TENSOR_DIMS = 8

M = TypeVar("M", bound=Message)


def wire_dtype(dtype: torch.dtype) -> int:
    """The ``DType`` enum value for a torch dtype; ValueError for unsupported ones."""
    try:
        return _TORCH_TO_WIRE[dtype]
    except KeyError:
        raise ValueError(
            f"dtype {dtype} cannot travel on the wire; use torch.float32 or torch.float16"
        ) from None


def torch_dtype(wire: int) -> torch.dtype:
    """The torch dtype for a ``DType`` enum value; ValueError for unknown or unspecified ones."""
    try:
        return _WIRE_TO_TORCH[wire]
    except KeyError:
        raise ValueError(
            f"tensor dtype {_dtype_name(wire)} is not supported; "
            "send DTYPE_FLOAT32 or DTYPE_FLOAT16"
        ) from None


def tensor_to_proto(
    t: torch.Tensor, dtype: torch.dtype = torch.float32, out: pb.Tensor | None = None
) -> pb.Tensor:
    """Encode ``t`` (any shape, any device) as ``dtype`` in a ``Tensor`` message.

    Pass ``out`` (e.g. ``reply.embeddings``) to fill a field in place: it saves
    copying the bytes again into the enclosing message.
    """
    msg = pb.Tensor() if out is None else out
    array = _describe(t, dtype, msg)
    msg.data = array.tobytes()
    return msg


def proto_to_tensor(msg: pb.Tensor, expected_dim: int | None = None) -> torch.Tensor:
    """Decode a ``Tensor`` message into a CPU tensor of its own dtype.

    Args:
        msg: the message.
        expected_dim: when given, the tensor must be 2-D with this many columns.

    Raises:
        ValueError: unknown dtype, negative or mismatched shape, or a byte length
            different from prod(shape) * itemsize.
    """
    return _decode(msg.dtype, msg.shape, msg.data, expected_dim)


def serialize_with_tensor(
    message: Message, field: str, t: torch.Tensor, dtype: torch.dtype = torch.float32
) -> bytes:
    """``message`` serialised with ``t`` encoded as ``dtype`` in its ``Tensor`` field ``field``.

    The tensor's bytes are copied once, from ``t`` into the result. ``message``
    keeps the tensor's dtype and shape but no data. The bytes are those protobuf
    writes, except that the data comes in a second occurrence of ``field`` after
    the rest of the message; a parser merges the two occurrences of an embedded
    message field into one, so every protobuf implementation reads the same message.
    """
    tensor = getattr(message, field)
    array = _describe(t, dtype, tensor)
    tensor.ClearField("data")
    data_key = _key(_TENSOR_DATA, _LEN) + _varint(array.nbytes)
    field_number = message.DESCRIPTOR.fields_by_name[field].number
    head = _key(field_number, _LEN) + _varint(len(data_key) + array.nbytes) + data_key
    return b"".join((message.SerializeToString(), head, array))


def parse_with_tensor(
    message_class: type[M], raw: bytes, field: str, expected_dim: int | None = None
) -> tuple[M, torch.Tensor]:
    """Parse ``raw`` as ``message_class`` and decode its ``Tensor`` field ``field``.

    The tensor's bytes are copied once, from ``raw`` into the returned tensor;
    the returned message has everything else (the tensor's dtype and shape
    included) but not that data.

    Raises:
        ValueError: ``raw`` is not a ``message_class``, or the tensor is malformed
            (as :func:`proto_to_tensor`).
    """
    view = memoryview(raw)
    field_number = message_class.DESCRIPTOR.fields_by_name[field].number
    rest: list[bytes | memoryview] = []
    data: memoryview | bytes = b""
    for number, wire, start, body, stop in _fields(view, 0, len(view)):
        if number != field_number or wire != _LEN:
            rest.append(view[start:stop])
            continue
        # Occurrences of an embedded message merge; the last data field wins.
        kept = []
        for inner_number, inner_wire, inner_start, inner_body, inner_stop in _fields(
            view, body, stop
        ):
            if inner_number == _TENSOR_DATA and inner_wire == _LEN:
                data = view[inner_body:inner_stop]
            else:
                kept.append(view[inner_start:inner_stop])
        inner = b"".join(kept)
        rest += (_key(field_number, _LEN), _varint(len(inner)), inner)
    try:
        message = message_class.FromString(b"".join(rest))
    except DecodeError as exc:
        raise ValueError(f"bytes are not a valid {message_class.__name__}: {exc}") from None
    tensor = getattr(message, field)
    return message, _decode(tensor.dtype, tensor.shape, data, expected_dim)


def _describe(t: torch.Tensor, dtype: torch.dtype, msg: pb.Tensor) -> np.ndarray:
    """Set ``msg``'s dtype and shape for ``t``; return ``t``'s wire bytes as an array."""
    wire = wire_dtype(dtype)
    msg.dtype = wire
    msg.ClearField("shape")
    msg.shape.extend(t.shape)
    # No copy when t is already a contiguous CPU tensor of dtype (e.g. a float16 pull
    # from float16 storage).
    array = t.detach().to(device="cpu", dtype=dtype).contiguous().numpy()
    return array.astype(_WIRE_TO_NUMPY[wire], copy=False)


def _decode(
    wire: int, shape: Sequence[int], data: bytes | memoryview, expected_dim: int | None
) -> torch.Tensor:
    """A CPU tensor that owns a copy of ``data``, checked against ``wire`` and ``shape``.

    The number of dimensions is checked before the shape is read: a hostile message can
    carry millions of shape entries, and nothing may be built from them (nor quoted in
    the error).
    """
    torch_dtype(wire)  # refuses unknown and unspecified dtypes with a clear message
    rank = len(shape)
    if expected_dim is not None and rank != 2:
        raise ValueError(f"tensor has {rank} dimensions, not (n, {expected_dim})")
    if rank > MAX_TENSOR_DIMS:
        raise ValueError(f"tensor has {rank} dimensions; at most {MAX_TENSOR_DIMS} are accepted")
    shape = tuple(shape)
    if min(shape, default=0) < 0:
        raise ValueError(f"tensor shape {_shape_text(shape)} has a negative dimension")
    if expected_dim is not None and shape[1] != expected_dim:
        raise ValueError(f"tensor shape {_shape_text(shape)} is not (n, {expected_dim})")
    np_dtype = _WIRE_TO_NUMPY[wire]
    expected_bytes = math.prod(shape) * np_dtype.itemsize
    if len(data) != expected_bytes:
        raise ValueError(
            f"tensor of shape {_shape_text(shape)} and dtype {_dtype_name(wire)} needs "
            f"{expected_bytes} bytes, got {len(data)}"
        )
    # astype copies: the tensor must be writable and must not keep the message alive.
    array = np.frombuffer(data, dtype=np_dtype).astype(np_dtype.newbyteorder("="))
    return torch.from_numpy(array.reshape(shape))


def _shape_text(shape: tuple[int, ...]) -> str:
    """``shape`` for an error message, never long (a product of int64s can be huge)."""
    return brief(str(list(shape)), 80)


@functools.cache
def _key(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _varint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    """(value, position after it) of the varint at ``buf[pos:end]``."""
    value = shift = 0
    while pos < end and shift < 64:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise ValueError("bytes are not a valid message: truncated or overlong varint")


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(number, wire type, start, payload start, end) of each field in ``buf[start:end]``."""
    pos = start
    while pos < end:
        key, body = _read_varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            stop = _read_varint(buf, body, end)[1]
        elif wire == _I64:
            stop = body + 8
        elif wire == _I32:
            stop = body + 4
        elif wire == _LEN:
            length, body = _read_varint(buf, body, end)
            stop = body + length
        else:
            raise ValueError(f"bytes are not a valid message: wire type {wire} at byte {pos}")
        if stop > end:
            raise ValueError(f"bytes are not a valid message: field at byte {pos} is truncated")
        yield number, wire, pos, body, stop
        pos = stop


def _dtype_name(wire: int) -> str:
    try:
        return pb.DType.Name(wire)
    except ValueError:
        return str(wire)
