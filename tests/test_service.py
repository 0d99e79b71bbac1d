"""The queue's gRPC service on 127.0.0.1: semantics, refusals, auth, threads, TLS, the command."""

from __future__ import annotations

import datetime
import ipaddress
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
import torch.nn.functional as F
from grpc_health.v1 import health_pb2, health_pb2_grpc
from queue_server_process import QueueServerProcess, fedcontrast

from client.stub import QueueClient
from common.runtime.wire import proto_to_tensor, tensor_to_proto
from proto import negatives_pb2 as pb
from proto import negatives_pb2_grpc as pb_grpc
from server.queue import NegativeQueue
from server.service import SERVICE_NAME, TOKEN_METADATA_KEY, QueueServer, ServerTLS

DIM = 8
TOKENS = {"token-a": 0, "token-b": 1}
ADMIN = "token-admin"
MAX_MESSAGE = 256 * 1024


def unit(n: int, dim: int = DIM, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=g), dim=1)


@pytest.fixture
def queue() -> NegativeQueue:
    q = NegativeQueue(64, DIM, max_age=2, quota_per_version=32)
    q.push(5, unit(6, seed=99), version=0)  # rows of someone else, so the queue is not empty
    return q


@pytest.fixture
def server(queue):
    with QueueServer(
        queue, TOKENS, admin_tokens=[ADMIN], max_message_bytes=MAX_MESSAGE, max_pull=1000
    ) as srv:
        yield srv


@pytest.fixture
def raw(server):
    """A bare generated stub, to send requests the typed client would never build."""
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.NegativeQueueStub(channel)


def meta(token: str | None = "token-a"):
    return () if token is None else ((TOKEN_METADATA_KEY, token),)


# ---------------------------------------------------------------- semantics


def test_push_pull_stats_round_trip(server, queue):
    with QueueClient(server.address, "token-a") as client:
        rows = unit(4, seed=1)
        assert client.push(rows, version=0, dtype=torch.float32)
        pulled = client.pull(10, max_age=0, exclude_own=False, dtype=torch.float32)
        assert pulled.dtype == torch.float32 and pulled.shape == (10, DIM)
        assert torch.cdist(rows, pulled).min(dim=1).values.max() < 1e-6  # every row came back
        stats = client.stats()
    assert stats["size"] == 10 and stats["capacity"] == 64 and stats["dim"] == DIM
    assert stats["age_histogram"] == [10, 0, 0]
    assert stats["counters"]["pushed_rows"] == 10 and stats["counters"]["pulled_rows"] == 10
    assert stats["quota_per_version"] == 32
    assert {k: v for k, v in stats.items() if k != "rejected"} == queue.stats()


def test_pull_in_float16_is_close_to_unit_norm(server):
    with QueueClient(server.address, "token-a") as client:
        pulled = client.pull(6, max_age=2)
    assert pulled.shape == (6, DIM) and pulled.dtype == torch.float16
    assert torch.allclose(pulled.float().norm(dim=1), torch.ones(6), atol=2e-3)


def test_float16_storage_serves_float16_and_float32_pulls():
    queue = NegativeQueue(16, DIM, storage_dtype=torch.float16)
    rows = unit(4, seed=3)
    with QueueServer(queue, TOKENS) as srv, QueueClient(srv.address, "token-b") as client:
        assert client.push(rows, version=0, dtype=torch.float32)
        for dtype in (torch.float16, torch.float32):
            pulled = client.pull(4, max_age=0, exclude_own=False, dtype=dtype)
            assert pulled.dtype == dtype and pulled.shape == (4, DIM)
            assert torch.cdist(rows, pulled.float()).min(dim=1).values.max() < 2e-3


def test_pull_never_returns_the_callers_own_rows(server):
    mine = unit(5, seed=1)
    with QueueClient(server.address, "token-a") as a, QueueClient(server.address, "token-b") as b:
        assert a.push(mine, version=0, dtype=torch.float32)
        assert b.push(unit(3, seed=2), version=0)
        for _ in range(10):
            rows = a.pull(100, max_age=2, dtype=torch.float32)
            assert rows.shape == (9, DIM)
            assert torch.cdist(rows, mine).min() > 1e-3
        assert b.pull(100, max_age=2, exclude_own=False).shape == (14, DIM)
        own = a.pull(100, max_age=2, exclude_own=False, only_own=True, dtype=torch.float32)
        assert own.shape == (5, DIM) and torch.cdist(own, mine).min(dim=1).values.max() < 1e-6


def test_seeded_pulls_from_two_servers_holding_the_same_rows_agree(queue):
    # The same rows, pushed over gRPC in opposite orders by different tokens: a pull with
    # a seed and a max_version answers alike, and leaves out the newer rows.
    other = NegativeQueue(64, DIM, max_age=2, quota_per_version=32)
    other.push(5, unit(6, seed=99), version=0)
    pushes = [("token-a", unit(5, seed=1)), ("token-b", unit(5, seed=2))]
    replies = []
    for q, order in ((queue, pushes), (other, pushes[::-1])):
        tokens = dict(zip((t for t, _ in order), (3, 4), strict=True))  # other slots in the second server
        with QueueServer(q, tokens, admin_tokens=[ADMIN], max_message_bytes=MAX_MESSAGE,
                         max_pull=1000) as srv:
            for token, rows in order:
                with QueueClient(srv.address, token) as client:
                    assert client.push(rows, version=0)
            q.advance(1)
            with QueueClient(srv.address, "token-a") as client:
                client.push(unit(3, seed=7), version=1)  # newer than max_version
                replies.append([client.pull(8, max_age=2, exclude_own=False,
                                            dtype=torch.float32, max_version=0, seed=s)
                                for s in (1, 2)])
    for a, b in zip(*replies, strict=True):
        assert a.shape == (8, DIM) and torch.equal(a, b)
    assert not torch.equal(replies[0][0], replies[0][1])
    newer = unit(3, seed=7)
    assert all(torch.cdist(r, newer).min() > 1e-3 for r in replies[0])


def test_pull_respects_max_age_after_advance(server, queue):
    with QueueClient(server.address, "token-a") as client:
        queue.advance(1)
        assert client.push(unit(3, seed=1), version=1)
        assert client.pull(100, max_age=0, exclude_own=False).shape == (3, DIM)
        assert client.pull(100, max_age=1, exclude_own=False).shape == (9, DIM)
        queue.advance(3)  # max_age 2: the rows of version 0 go
        assert client.pull(100, max_age=5, exclude_own=False).shape == (3, DIM)
        assert client.stats()["age_histogram"] == [0, 0, 3]


def test_versions_come_back_only_when_asked(raw, queue):
    queue.advance(1)
    queue.push(0, unit(2), version=1)
    request = pb.PullRequest(count=100, max_age=2)
    assert list(raw.Pull(request, metadata=meta(), timeout=5).versions) == []
    request.include_versions = True
    reply = raw.Pull(request, metadata=meta(), timeout=5)
    assert sorted(reply.versions) == [0] * 6 + [1] * 2 and reply.queue_version == 1


@pytest.mark.parametrize("dtype", [pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16])
def test_pull_reply_is_plain_protobuf_to_any_client(raw, queue, dtype):
    request = pb.PullRequest(count=100, max_age=2, dtype=dtype, policy=pb.SAMPLE_POLICY_UNIFORM)
    reply = raw.Pull(request, metadata=meta(), timeout=5)  # parsed by the generated class
    rows = proto_to_tensor(reply.embeddings, expected_dim=DIM)
    assert rows.dtype == (torch.float32 if dtype == pb.DTYPE_FLOAT32 else torch.float16)
    assert rows.shape == (6, DIM)
    assert torch.cdist(queue.pull(6)[0], rows.float()).min(dim=1).values.max() < 2e-3


def test_push_response_reports_the_remaining_quota(raw):
    request = pb.PushRequest(embeddings=tensor_to_proto(unit(10)), version=0)
    reply = raw.Push(request, metadata=meta(), timeout=5)
    assert (reply.accepted, reply.queue_version, reply.quota_remaining) == (10, 0, 22)


def test_admin_token_advances_the_queue(server, queue):
    with QueueClient(server.address, ADMIN) as admin, QueueClient(server.address, "token-a") as a:
        assert admin.advance(4)
        assert queue.version == 4 and len(queue) == 0
        assert not a.advance(5)
        assert not admin.push(unit(1), version=4)
    assert queue.version == 4


def test_health_service_is_serving_without_a_token(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_tokens_can_change_while_serving(server):
    with QueueClient(server.address, "token-new", retries=0) as client:
        assert client.stats() is None
        server.add_token("token-new", 7)
        assert client.stats() is not None
        server.set_tokens({"token-a": 0})
        assert client.stats() is None
        assert client.counters()["unauthenticated"] == 2


def test_bad_token_maps_are_refused(queue):
    for tokens in ({"": 0}, {"has space": 0}, {"token": -1}, {"token": "0"}):
        with pytest.raises(ValueError):
            QueueServer(queue, tokens)
    with pytest.raises(ValueError, match="both"):
        QueueServer(queue, {"same": 0}, admin_tokens=["same"])


def test_a_second_server_cannot_take_a_bound_port(server, queue):
    second = QueueServer(queue, TOKENS, port=server.port)
    try:
        with pytest.raises(OSError):
            second.start()
    finally:
        second.stop()  # had it started wrongly, it must not outlive the test


# ----------------------------------------------------------- refused requests


def _push(embeddings=None, version=0, **tensor):
    msg = tensor_to_proto(unit(2) if embeddings is None else embeddings)
    for key, value in tensor.items():
        if key == "shape":
            msg.ClearField("shape")
            msg.shape.extend(value)
        else:
            setattr(msg, key, value)
    return pb.PushRequest(embeddings=msg, version=version)


OK = unit(2)
NAN = torch.cat([OK[:1], torch.full((1, DIM), float("nan"))])
INF = torch.cat([OK[:1], torch.full((1, DIM), float("inf"))])
ZERO = torch.cat([OK[:1], torch.zeros(1, DIM)])
INVALID = grpc.StatusCode.INVALID_ARGUMENT
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
A = "token-a"
# name: (method, request, token, expected status)
BAD_REQUESTS = {
    "wrong dim": ("Push", _push(unit(2, DIM + 1)), A, INVALID),
    "NaN": ("Push", _push(NAN), A, INVALID),
    "Inf": ("Push", _push(INF), A, INVALID),
    "zero vector": ("Push", _push(ZERO), A, INVALID),
    "not unit norm": ("Push", _push(OK * 3), A, INVALID),
    "unspecified dtype": ("Push", _push(dtype=pb.DTYPE_UNSPECIFIED), A, INVALID),
    "unknown dtype": ("Push", _push(dtype=42), A, INVALID),
    "float32 bytes labelled float16": ("Push", _push(dtype=pb.DTYPE_FLOAT16), A, INVALID),
    "shape larger than the bytes": ("Push", _push(shape=[4, DIM]), A, INVALID),
    "truncated bytes": ("Push", _push(data=tensor_to_proto(OK).data[:-1]), A, INVALID),
    "negative shape": ("Push", _push(shape=[-2, DIM]), A, INVALID),
    "no rows": ("Push", _push(torch.empty(0, DIM)), A, INVALID),
    "version ahead": ("Push", _push(version=1), A, INVALID),
    "negative version": ("Push", _push(version=-5), A, INVALID),
    # At version 0 the age bound alone would admit these: versions that never existed.
    "version -1 at version 0": ("Push", _push(version=-1), A, INVALID),
    "version -2 at version 0": ("Push", _push(version=-2), A, INVALID),
    "a shape of 600 entries": ("Push", _push(shape=[2, DIM] + [1] * 598), A, INVALID),
    "a shape of 200,000 entries": ("Push", _push(shape=[1] * 200_000), A, EXHAUSTED),
    "a pull padded with unknown fields": (
        "Pull", pb.PullRequest.FromString(pb.PullRequest(count=1).SerializeToString()
                                          + b"\x9a\x05" + b"\x81\x10" + bytes(2049)), A, EXHAUSTED),
    "over quota": ("Push", _push(unit(33)), A, EXHAUSTED),
    "push with admin token": ("Push", _push(), ADMIN, DENIED),
    "push without token": ("Push", _push(), None, UNAUTHENTICATED),
    "push with unknown token": ("Push", _push(), "token-z", UNAUTHENTICATED),
    "pull without token": ("Pull", pb.PullRequest(count=1), None, UNAUTHENTICATED),
    "pull with admin token": ("Pull", pb.PullRequest(count=1), ADMIN, DENIED),
    "own rows with admin token": ("Pull", pb.PullRequest(count=1, only_own=True), ADMIN, DENIED),
    "stats with unknown token": ("Stats", pb.StatsRequest(), "nope", UNAUTHENTICATED),
    "negative count": ("Pull", pb.PullRequest(count=-1), A, INVALID),
    "huge count": ("Pull", pb.PullRequest(count=2**40), A, INVALID),
    "negative max_age": ("Pull", pb.PullRequest(count=1, max_age=-1), A, INVALID),
    "unknown policy": ("Pull", pb.PullRequest(count=1, policy=9), A, INVALID),
    # Values of policies since removed (reserved in the .proto), as an older client sends them.
    "removed policy 2 (recent)": ("Pull", pb.PullRequest(count=1, policy=2), A, INVALID),
    "removed policy 3 (stratified)": ("Pull", pb.PullRequest(count=1, policy=3, seed=7), A, INVALID),
    "unknown reply dtype": ("Pull", pb.PullRequest(count=1, dtype=9), A, INVALID),
    "exclude_own with only_own": ("Pull", pb.PullRequest(count=1, exclude_own=True, only_own=True),
                                  A, INVALID),
    "advance with contributor token": ("Advance", pb.AdvanceRequest(version=3), A, DENIED),
    "advance backwards": ("Advance", pb.AdvanceRequest(version=-1), ADMIN, INVALID),
}


def _state(queue: NegativeQueue, path: Path) -> dict:
    """Everything the queue holds, read without touching its counters."""
    return torch.load(queue.snapshot(path), weights_only=True)


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def _queue_stats(stub) -> pb.StatsResponse:
    stats = stub.Stats(pb.StatsRequest(), metadata=meta(), timeout=5)
    stats.ClearField("rejected")
    return stats


@pytest.mark.parametrize(
    "method, request_, token, code", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys()
)
def test_bad_request_is_refused_and_changes_nothing(
    raw, queue, tmp_path, method, request_, token, code
):
    queue.push(0, unit(30, seed=3), version=0)  # token-a has 2 rows of quota left
    before, stats_before = _state(queue, tmp_path / "before.pt"), _queue_stats(raw)
    with pytest.raises(grpc.RpcError) as info:
        getattr(raw, method)(request_, metadata=meta(token), timeout=5)
    assert info.value.code() == code, info.value.details()
    assert info.value.details() and len(info.value.details()) <= 200
    _assert_same_state(before, _state(queue, tmp_path / "after.pt"))
    assert _queue_stats(raw) == stats_before
    rejected = raw.Stats(pb.StatsRequest(), metadata=meta(), timeout=5).rejected
    assert rejected[code.name] == 1


def test_a_removed_policy_is_refused_with_a_message_naming_the_one_served(raw):
    with pytest.raises(grpc.RpcError) as info:
        raw.Pull(pb.PullRequest(count=1, policy=2), metadata=meta(), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "only SAMPLE_POLICY_UNIFORM" in info.value.details()
    assert "removed" in info.value.details()


def test_oversized_message_is_refused_by_the_configured_limit(raw, queue, tmp_path):
    before = _state(queue, tmp_path / "before.pt")
    rows = F.normalize(torch.randn(MAX_MESSAGE // (DIM * 4) + 1, DIM), dim=1)
    with pytest.raises(grpc.RpcError) as info:
        raw.Push(_push(rows), metadata=meta(), timeout=5)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    _assert_same_state(before, _state(queue, tmp_path / "after.pt"))


@pytest.mark.timeout(60)
def test_the_largest_pull_allowed_fits_in_a_reply_with_its_versions():
    # Small rows and large versions: the versions' varints are a large share of the reply.
    limit, version = 2**20, 2**40
    fits = QueueServer(NegativeQueue(1, 2), {}, max_message_bytes=limit).max_pull
    queue = NegativeQueue(fits, 2, max_age=0)
    queue.advance(version)
    queue.push(0, F.normalize(torch.randn(fits, 2), dim=1), version=version)
    with QueueServer(queue, {"t": 0}, max_message_bytes=limit) as server, grpc.insecure_channel(
        server.address, options=[("grpc.max_receive_message_length", 2 * limit)]
    ) as channel:
        assert server.max_pull == fits
        request = pb.PullRequest(count=fits, max_age=0, include_versions=True)
        reply = pb_grpc.NegativeQueueStub(channel).Pull(request, metadata=((TOKEN_METADATA_KEY, "t"),), timeout=30)
    assert len(reply.versions) == fits and set(reply.versions) == {version}
    assert reply.ByteSize() <= limit


def test_an_oversized_message_without_a_token_is_not_counted_as_unauthenticated(raw):
    rows = F.normalize(torch.randn(MAX_MESSAGE // (DIM * 4) + 1, DIM), dim=1)
    with pytest.raises(grpc.RpcError) as info:
        raw.Push(_push(rows), metadata=meta(None), timeout=5)
    assert info.value.code() == EXHAUSTED  # gRPC's own limit, before any handler
    assert "UNAUTHENTICATED" not in raw.Stats(pb.StatsRequest(), metadata=meta(), timeout=5).rejected


class _HeldQueue(NegativeQueue):
    """Pulls by contributor 0 wait until released; others answer at once."""

    def __init__(self):
        super().__init__(64, DIM)
        self.held = threading.Semaphore(0)
        self.release = threading.Event()

    def pull(self, n, *args, exclude=None, only=None, **kwargs):
        if 0 in (exclude, only):
            self.held.release()
            self.release.wait(30)
        return super().pull(n, *args, exclude=exclude, only=only, **kwargs)


@pytest.mark.timeout(60)
def test_a_token_cannot_have_more_calls_in_flight_than_its_limit():
    queue, limit = _HeldQueue(), 2
    with QueueServer(queue, TOKENS, max_calls_per_token=limit, max_workers=4) as server, \
            grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.NegativeQueueStub(channel)
        held = [stub.Pull.future(pb.PullRequest(count=1, only_own=True), metadata=meta(), timeout=30)
                for _ in range(limit)]
        try:
            for _ in range(limit):
                assert queue.held.acquire(timeout=30)  # both calls are inside the queue
            with pytest.raises(grpc.RpcError) as info:
                stub.Pull(pb.PullRequest(count=1), metadata=meta(), timeout=10)
            assert info.value.code() == EXHAUSTED and "in flight" in info.value.details()
            # Another token is served meanwhile.
            stub.Pull(pb.PullRequest(count=1), metadata=meta("token-b"), timeout=10)
        finally:
            queue.release.set()
        for call in held:
            call.result()
        stub.Pull(pb.PullRequest(count=1), metadata=meta(), timeout=10)  # its calls are back
        assert stub.Stats(pb.StatsRequest(), metadata=meta(), timeout=5).rejected == {
            "RESOURCE_EXHAUSTED": 1}


def test_bytes_that_are_no_message_are_invalid_argument(server, queue, tmp_path):
    before = _state(queue, tmp_path / "before.pt")
    with grpc.insecure_channel(server.address) as channel:
        push = channel.unary_unary(f"/{SERVICE_NAME}/Push")
        with pytest.raises(grpc.RpcError) as info:
            push(b"\xff\xff\xff\xff not protobuf", metadata=meta(), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _assert_same_state(before, _state(queue, tmp_path / "after.pt"))


# ---------------------------------------------------------------- concurrency


@pytest.mark.timeout(60)
def test_many_clients_push_and_pull_at_once(queue):
    threads, rounds, rows_per_push = 16, 15, 4
    queue = NegativeQueue(4096, DIM, max_age=2)
    tokens = {f"t{i}": i for i in range(threads)}
    failures: list[str] = []
    # Half the threads share one client and its token: let them all be in flight at once.
    with QueueServer(queue, tokens, max_workers=8, max_calls_per_token=threads) as srv:
        shared = QueueClient(srv.address, "t0", timeout=10)

        def work(i: int) -> None:
            own = QueueClient(srv.address, f"t{i}", timeout=10) if i % 2 else shared
            for r in range(rounds):
                if i % 2 and not own.push(unit(rows_per_push, seed=i * 100 + r), version=0):
                    failures.append(f"push {i}/{r}")
                rows = own.pull(8, max_age=2)
                if rows is None or rows.shape[0] > 8:
                    failures.append(f"pull {i}/{r}")
            if own is not shared:
                own.close()

        workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=50)
        stats = shared.stats()
        shared.close()
    assert not failures
    pushes = (threads // 2) * rounds
    assert stats["counters"]["push_calls"] == pushes
    assert stats["size"] == stats["counters"]["pushed_rows"] == pushes * rows_per_push
    assert stats["counters"]["pull_calls"] == threads * rounds
    assert stats["rejected"] == {}


# ------------------------------------------------------------------------ TLS


def _certificates(tmp_path: Path) -> tuple[ServerTLS, bytes]:
    """A CA and a server certificate for 127.0.0.1 and localhost signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, server_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedcontrast test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = server_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ServerTLS(cert.public_bytes(pem), key_pem), ca.public_bytes(pem)


@pytest.mark.timeout(60)
def test_tls_round_trip(queue, tmp_path):
    tls, ca = _certificates(tmp_path)
    with QueueServer(queue, TOKENS, tls=tls) as srv:
        with QueueClient(srv.address, "token-a", root_certificates=ca) as client:
            assert client.push(unit(3, seed=1), version=0)
            assert client.pull(20, max_age=2).shape == (6, DIM)
        with QueueClient(srv.address, "token-a", retries=0, timeout=2) as plain:
            assert plain.pull(1, max_age=2) is None
        _, other_ca = _certificates(tmp_path)
        with QueueClient(
            srv.address, "token-a", root_certificates=other_ca, retries=0, timeout=2
        ) as wrong:
            assert wrong.pull(1, max_age=2) is None
    assert len(queue) == 9


# -------------------------------------------------------------------- command


@pytest.mark.timeout(90)
def test_queue_server_command_keeps_its_rows_across_a_restart(tmp_path):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("# queue tokens\ntoken-a 0\ntoken-admin admin  # operator\n")
    tokens.chmod(0o600)
    snapshot = tmp_path / "queue.pt"
    args = [
        "--insecure",
        "--dim",
        str(DIM),
        "--capacity",
        "32",
        "--tokens-file",
        str(tokens),
        "--snapshot",
        str(snapshot),
    ]
    with QueueServerProcess(args) as process, QueueClient(
        process.address, "token-admin", timeout=30
    ) as admin, QueueClient(process.address, "token-a", timeout=30) as a:
        assert admin.advance(1)
        assert a.push(unit(5), version=1)
    assert snapshot.exists()

    with QueueServerProcess(args) as process, QueueClient(
        process.address, "token-a", timeout=30
    ) as a:
        stats = a.stats()
    assert (stats["size"], stats["version"]) == (5, 1)


@pytest.mark.timeout(120)
def test_queue_server_command_saves_the_snapshot_every_n_seconds_and_stops_at_once(tmp_path):
    """``--snapshot-every`` saves while the server runs, and a stop signal sent the moment
    the server listens (five times over) ends it cleanly with the snapshot written."""
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("token-a 0\ntoken-admin admin\n")
    tokens.chmod(0o600)
    snapshot = tmp_path / "queue.pt"
    args = ["--insecure", "--dim", str(DIM), "--capacity", "32", "--tokens-file", str(tokens),
            "--snapshot", str(snapshot)]
    with QueueServerProcess([*args, "--snapshot-every", "0.2"]) as process, QueueClient(
        process.address, "token-admin", timeout=30
    ) as admin, QueueClient(process.address, "token-a", timeout=30) as a:
        assert admin.advance(1) and a.push(unit(5), version=1)
        deadline = time.monotonic() + 60
        size = 0
        while size != 5:  # a save after the push, with the server still running
            assert process.process.poll() is None and time.monotonic() < deadline, process.log()
            time.sleep(0.1)
            if snapshot.exists():  # written to a temporary file and renamed over it
                saved = NegativeQueue(dim=DIM, capacity=32)
                saved.restore(snapshot)
                size = len(saved)
    for _ in range(5):  # stop() sends SIGTERM and asserts a clean exit within 20 s
        snapshot.unlink()
        QueueServerProcess(args).stop()
        assert snapshot.exists()


def test_queue_server_command_needs_tls_or_insecure(tmp_path):
    import argparse

    from common.errors import UsageError
    from server.commands import queue_server_command
    from server.queue_server import read_tokens_file

    parser = argparse.ArgumentParser()
    queue_server_command.add_arguments(parser)
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("token-a 0\n")
    with pytest.raises(UsageError, match="--insecure"):
        queue_server_command.run(parser.parse_args(["--tokens-file", str(tokens)]))
    tokens.write_text("token-a zero\n")
    with pytest.raises(UsageError, match="tokens.txt:1"):
        read_tokens_file(tokens)


@pytest.fixture
def tokens_file(tmp_path) -> Path:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("token-a 0\n")
    tokens.chmod(0o600)
    return tokens


def _refused_in_one_line(*args: str, expect: str) -> None:
    result = fedcontrast(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args, expect", [
    (["--port", "70000"], "not a port number"),
    (["--port", "-1"], "not a port number"),
    (["--max-message-mb", "5000"], "--max-message-mb"),
    (["--max-calls-per-token", "-1"], "--max-calls-per-token"),
    (["--device", "nonsense"], "--device"),
], ids=["port 70000", "port -1", "message 5000 MiB", "negative call limit", "unknown device"])
@pytest.mark.timeout(120)
def test_queue_server_refuses_bad_flags_in_one_line(tokens_file, args, expect):
    _refused_in_one_line("queue-server", "--insecure", "--tokens-file", str(tokens_file), *args,
                         expect=expect)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.timeout(120)
def test_queue_server_refuses_cuda_without_cuda(tokens_file):
    _refused_in_one_line("queue-server", "--insecure", "--tokens-file", str(tokens_file),
                         "--device", "cuda", expect="CUDA is not available")


@pytest.mark.timeout(120)
def test_queue_server_refuses_a_snapshot_that_is_a_directory_or_damaged(tokens_file, tmp_path):
    base = ["queue-server", "--insecure", "--tokens-file", str(tokens_file)]
    _refused_in_one_line(*base, "--snapshot", str(tmp_path), expect="is a directory")
    damaged = tmp_path / "queue.pt"
    damaged.write_bytes(b"PK\x03\x04 not really")
    _refused_in_one_line(*base, "--snapshot", str(damaged), expect=str(damaged))


@pytest.mark.timeout(120)
def test_queue_server_refuses_a_port_in_use_in_one_line(tokens_file, server):
    _refused_in_one_line("queue-server", "--insecure", "--tokens-file", str(tokens_file),
                         "--port", str(server.port), expect="cannot listen")


@pytest.mark.parametrize("command", ["client", "server"])
def test_other_commands_refuse_a_port_out_of_range_in_one_line(command):
    _refused_in_one_line(command, "--port", "70000", expect="not a port number")


@pytest.mark.timeout(90)
def test_queue_server_clears_a_killed_saves_temporary_file(tokens_file, tmp_path):
    snapshot = tmp_path / "queue.pt"
    stale = tmp_path / "queue.pt.k1ll3d.pt.tmp"
    stale.write_bytes(b"half a snapshot")
    with QueueServerProcess(["--insecure", "--dim", str(DIM), "--tokens-file", str(tokens_file),
                             "--snapshot", str(snapshot)]):
        assert not stale.exists()
    assert snapshot.exists()
