"""The protocol: generated modules match the .proto, version floors, tensor encoding."""

from __future__ import annotations

import re
import struct
import tomllib
from pathlib import Path

import pytest
import torch
from google.protobuf import descriptor_pb2

from common.runtime.wire import (
    parse_with_tensor,
    proto_to_tensor,
    serialize_with_tensor,
    tensor_to_proto,
)
from proto import negatives_pb2 as pb
from proto import negatives_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
PROTO = "proto/negatives.proto"


def compiled_descriptor(tmp_path: Path) -> descriptor_pb2.FileDescriptorProto:
    from grpc_tools import protoc

    out = tmp_path / "negatives.desc"
    status = protoc.main(["protoc", f"-I{ROOT}", f"--descriptor_set_out={out}", str(ROOT / PROTO)])
    assert status == 0, "protoc failed on the .proto"
    descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    (file,) = descriptor_set.file
    _clear_json_names(file.message_type)
    return file


def _clear_json_names(messages) -> None:
    """Drop json_name, which protoc derives from the field name and the Python plugin omits."""
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _clear_json_names(message.nested_type)


def test_generated_messages_match_the_proto(tmp_path):
    committed = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    assert committed == compiled_descriptor(tmp_path), (
        "proto/negatives_pb2.py is stale; regenerate it (see proto/README.md)"
    )


class _RecordingChannel:
    """Stands in for a grpc.Channel; records what the generated stub registers."""

    def __init__(self):
        self.methods: dict[str, tuple] = {}

    def unary_unary(self, path, request_serializer=None, response_deserializer=None, **_):
        self.methods[path] = (request_serializer, response_deserializer)


def test_generated_stub_matches_the_service(tmp_path):
    (service,) = compiled_descriptor(tmp_path).service
    channel = _RecordingChannel()
    pb_grpc.NegativeQueueStub(channel)
    package = pb.DESCRIPTOR.package
    expected = {
        f"/{package}.{service.name}/{m.name}": (
            m.input_type.rsplit(".", 1)[1],
            m.output_type.rsplit(".", 1)[1],
        )
        for m in service.method
    }
    assert set(channel.methods) == set(expected), "proto/negatives_pb2_grpc.py is stale"
    for path, (request, response) in expected.items():
        serializer, deserializer = channel.methods[path]
        assert serializer == getattr(pb, request).SerializeToString
        assert deserializer == getattr(pb, response).FromString
        assert hasattr(pb_grpc.NegativeQueueServicer, path.rsplit("/", 1)[1])


def generated_versions() -> tuple[str, str]:
    """(grpcio, protobuf) versions the generated modules check at import."""
    source = (ROOT / "proto" / "negatives_pb2.py").read_text()
    match = re.search(r"ValidateProtobufRuntimeVersion\(\s*\S+,\s*(\d+),\s*(\d+),\s*(\d+),", source)
    assert match, "negatives_pb2.py has no protobuf runtime version check"
    return pb_grpc.GRPC_GENERATED_VERSION, ".".join(match.groups())


def _floor(requirements: list[str], name: str) -> tuple[int, ...] | None:
    for requirement in requirements:
        match = re.fullmatch(
            rf"\s*{re.escape(name)}\s*(?:\[[^\]]*\])?\s*>=\s*([\d.]+).*", requirement
        )
        if match:
            return tuple(int(p) for p in match.group(1).split("."))
    return None


def test_pyproject_floors_cover_the_generated_code():
    pyproject = ROOT / "pyproject.toml"
    requirements = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    grpc_version, protobuf_version = generated_versions()
    for name, needed in (
        ("grpcio", grpc_version),
        ("grpcio-health-checking", grpc_version),
        ("protobuf", protobuf_version),
    ):
        floor = _floor(requirements, name)
        assert floor is not None, f"pyproject.toml needs '{name}>={needed}'"
        shown = ".".join(map(str, floor))
        assert floor >= tuple(int(p) for p in needed.split(".")), (
            f"the generated code needs {name}>={needed}; pyproject.toml says >= {shown}"
        )


# ---------------------------------------------------------------- tensor wire format


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tensor_round_trip(dtype):
    t = torch.randn(5, 3)
    back = proto_to_tensor(tensor_to_proto(t, dtype), expected_dim=3)
    assert back.dtype == dtype and back.shape == (5, 3)
    assert torch.equal(back, t.to(dtype))


def test_tensor_bytes_are_little_endian_row_major():
    msg = tensor_to_proto(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert msg.data == struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)
    assert list(msg.shape) == [2, 2] and msg.dtype == pb.DTYPE_FLOAT32
    half = tensor_to_proto(torch.tensor([1.0]), torch.float16)
    assert half.data == struct.pack("<e", 1.0)


def test_tensor_to_proto_fills_a_field_in_place():
    reply = pb.PullResponse()
    tensor_to_proto(torch.ones(3, 2), torch.float16, out=reply.embeddings)
    tensor_to_proto(torch.ones(1, 2), torch.float16, out=reply.embeddings)
    assert list(reply.embeddings.shape) == [1, 2]
    assert torch.equal(proto_to_tensor(reply.embeddings), torch.ones(1, 2, dtype=torch.float16))


def test_empty_tensor_round_trip():
    back = proto_to_tensor(tensor_to_proto(torch.empty(0, 4), torch.float16), expected_dim=4)
    assert back.shape == (0, 4)


def test_unsupported_dtype_cannot_be_encoded():
    with pytest.raises(ValueError, match="float32 or torch.float16"):
        tensor_to_proto(torch.zeros(2, 2), torch.float64)


def _msg(**overrides) -> pb.Tensor:
    fields = {"dtype": pb.DTYPE_FLOAT32, "shape": [2, 3], "data": bytes(24)}
    fields.update(overrides)
    return pb.Tensor(**fields)


BAD_TENSORS = {
    "unspecified dtype": (_msg(dtype=pb.DTYPE_UNSPECIFIED), "not supported"),
    "unknown dtype": (_msg(dtype=9), "not supported"),
    "truncated": (_msg(data=bytes(23)), "needs 24 bytes, got 23"),
    "padded": (_msg(data=bytes(25)), "needs 24 bytes, got 25"),
    "negative dimension": (_msg(shape=[-2, -3]), "negative"),
    "wrong width": (_msg(shape=[3, 2]), r"not \(n, 3\)"),
    "one-dimensional": (_msg(shape=[6]), r"not \(n, 3\)"),
    "huge shape": (_msg(shape=[2**40, 3]), "bytes"),
}


@pytest.mark.parametrize("msg, message", BAD_TENSORS.values(), ids=BAD_TENSORS.keys())
def test_malformed_tensor_is_refused_with_a_clear_message(msg, message):
    with pytest.raises(ValueError, match=message):
        proto_to_tensor(msg, expected_dim=3)


# ------------------------------------------- one-copy (de)serialisation of Push and Pull


def _pull_reply(t: torch.Tensor, dtype: torch.dtype) -> pb.PullResponse:
    reply = pb.PullResponse(queue_version=7, versions=[3, 4, 5][: t.shape[0]])
    tensor_to_proto(t, dtype, out=reply.embeddings)
    return reply


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [0, 3])
def test_serialize_with_tensor_writes_the_message_protobuf_reads(dtype, rows):
    t = torch.randn(rows, 4)
    raw = serialize_with_tensor(
        pb.PullResponse(queue_version=7, versions=[3, 4, 5][:rows]), "embeddings", t, dtype
    )
    assert pb.PullResponse.FromString(raw) == _pull_reply(t, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [0, 3])
def test_parse_with_tensor_reads_what_protobuf_writes(dtype, rows):
    t = torch.randn(rows, 4)
    reply, back = parse_with_tensor(
        pb.PullResponse, _pull_reply(t, dtype).SerializeToString(), "embeddings", expected_dim=4
    )
    assert back.dtype == dtype and torch.equal(back, t.to(dtype))
    assert (reply.queue_version, list(reply.versions)) == (7, [3, 4, 5][:rows])
    assert list(reply.embeddings.shape) == [rows, 4] and reply.embeddings.data == b""


def test_parse_with_tensor_merges_repeated_fields_as_protobuf_does():
    first, second = _pull_reply(torch.zeros(2, 4), torch.float32), pb.PullResponse()
    second.embeddings.data = torch.ones(2, 4).numpy().tobytes()  # the last data wins
    second.queue_version = 9
    raw = first.SerializeToString() + second.SerializeToString()
    reply, back = parse_with_tensor(pb.PullResponse, raw, "embeddings")
    assert torch.equal(back, proto_to_tensor(pb.PullResponse.FromString(raw).embeddings))
    assert torch.equal(back, torch.ones(2, 4)) and reply.queue_version == 9


def test_parse_with_tensor_returns_a_writable_copy():
    raw = _pull_reply(torch.ones(2, 4), torch.float16).SerializeToString()
    _, back = parse_with_tensor(pb.PullResponse, raw, "embeddings")
    back.mul_(2)
    assert torch.equal(parse_with_tensor(pb.PullResponse, raw, "embeddings")[1], back / 2)


GOOD = _pull_reply(torch.ones(2, 3), torch.float32).SerializeToString()
BAD_MESSAGES = {
    "truncated": (GOOD[:-1], "truncated"),
    "field longer than the message": (b"\x0a\x05\x08\x01", "truncated"),
    "unfinished varint": (b"\x18\xff", "varint"),
    "group wire type": (b"\x0b", "wire type"),
    "field number 0": (b"\x00\x01", "valid PullResponse"),
    "tensor bytes of the wrong length": (
        pb.PullResponse(embeddings=_msg(data=bytes(23))).SerializeToString(),
        "needs 24 bytes",
    ),
    "no tensor": (b"", "not supported"),
}


@pytest.mark.parametrize("raw, message", BAD_MESSAGES.values(), ids=BAD_MESSAGES.keys())
def test_parse_with_tensor_refuses_malformed_bytes(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_with_tensor(pb.PullResponse, raw, "embeddings", expected_dim=3)
