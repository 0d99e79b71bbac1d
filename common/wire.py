"""Tensor <-> protobuf conversion for the negative-queue service.

A tensor travels as dtype + shape + raw little-endian row-major bytes
(``proto/negatives.proto``, message ``Tensor``). Decoding is strict: the dtype
must be one this module knows, the shape non-negative, and the byte length must
match the shape exactly, so a truncated or padded payload is refused before any
of it is interpreted. Both sides use this module; it needs protobuf but not grpc.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from proto import negatives_pb2 as pb

#: gRPC metadata key that carries the caller's queue token (lower case, as gRPC requires).
TOKEN_METADATA_KEY = "x-fedcontrast-token"

_TORCH_TO_WIRE = {torch.float32: pb.DTYPE_FLOAT32, torch.float16: pb.DTYPE_FLOAT16}
_WIRE_TO_TORCH = {v: k for k, v in _TORCH_TO_WIRE.items()}
_WIRE_TO_NUMPY = {pb.DTYPE_FLOAT32: np.dtype("<f4"), pb.DTYPE_FLOAT16: np.dtype("<f2")}


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
    wire = wire_dtype(dtype)
    array = t.detach().to(device="cpu", dtype=dtype).contiguous().numpy()
    msg = pb.Tensor() if out is None else out
    msg.dtype = wire
    msg.ClearField("shape")
    msg.shape.extend(t.shape)
    msg.data = array.astype(_WIRE_TO_NUMPY[wire], copy=False).tobytes()
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
    torch_dtype(msg.dtype)  # refuses unknown and unspecified dtypes with a clear message
    shape = tuple(msg.shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"tensor shape {list(shape)} has a negative dimension")
    if expected_dim is not None and (len(shape) != 2 or shape[1] != expected_dim):
        raise ValueError(f"tensor shape {list(shape)} is not (n, {expected_dim})")
    np_dtype = _WIRE_TO_NUMPY[msg.dtype]
    expected_bytes = math.prod(shape) * np_dtype.itemsize
    if len(msg.data) != expected_bytes:
        raise ValueError(
            f"tensor of shape {list(shape)} and dtype {_dtype_name(msg.dtype)} needs "
            f"{expected_bytes} bytes, got {len(msg.data)}"
        )
    array = np.frombuffer(msg.data, dtype=np_dtype).astype(np_dtype.newbyteorder("="))
    return torch.from_numpy(array).reshape(shape)


def _dtype_name(wire: int) -> str:
    try:
        return pb.DType.Name(wire)
    except ValueError:
        return str(wire)
