"""Property-based fuzzing of `fedcontrast queue-server` over the whole request space.

Every RPC of the queue service gets generated requests (any token, field values over
their whole range, shapes of any length, any dtype, bytes that are or are not a row,
raw bytes that are or are not a message) at a real server process on 127.0.0.1. For
each request an oracle written from the protocol (not from the server's code) says
which status it must get; a refused request must leave the queue's size, version, age
histogram and counters as they were and count exactly one refusal under its status in
``Stats.rejected``. After the run, and after the worst requests known (a shape of
millions of entries, a message at the size limit), the server's peak memory must stay
under twice its idle level and none of its log lines may be long.

The example count is fixed and the run derandomised, so CI sees the same requests
every time (about 20 s on two cores).
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from queue_server_process import QueueServerProcess, memory_kib

from common.config import DEFAULT_MAX_MESSAGE_BYTES
from common.runtime.wire import TOKEN_METADATA_KEY
from proto import negatives_pb2 as pb
from proto import negatives_pb2_grpc as pb_grpc
from server.queue import NegativeQueue
from server.service import SERVICE_NAME, QueueServer

DIM, CAPACITY, MAX_AGE, QUOTA = 8, 64, 1, 16
SLOTS = {"token-a": 0, "token-b": 1}
ADMIN = "token-admin"
EXAMPLES = 600
#: A log line longer than this quotes a request it should not.
MAX_LOG_LINE = 400

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED

# What the protocol allows, from the server's documented bounds.
PUSH_LIMIT = CAPACITY * DIM * 4 + 4 * 2**10
SMALL_LIMIT = 2**10
MAX_PULL = QueueServer(NegativeQueue(1, DIM), {}).max_pull
REQUESTS = {"Push": pb.PushRequest, "Pull": pb.PullRequest, "Stats": pb.StatsRequest,
            "Advance": pb.AdvanceRequest}
ITEMSIZE = {pb.DTYPE_FLOAT32: 4, pb.DTYPE_FLOAT16: 2}
NUMPY = {pb.DTYPE_FLOAT32: np.dtype("<f4"), pb.DTYPE_FLOAT16: np.dtype("<f2")}

INT64 = st.one_of(st.integers(-3, 3), st.integers(-(2**63), 2**63 - 1))
INT32 = st.one_of(st.integers(-1, 4), st.integers(-(2**31), 2**31 - 1))
#: Mostly tokens that pass authentication, so that most requests reach the methods.
TOKENS = st.one_of(
    st.sampled_from([*SLOTS]),
    st.sampled_from([*SLOTS, ADMIN]),
    st.one_of(st.sampled_from([None, ""]),
              st.text(string.ascii_letters + string.digits + "-_.", min_size=1, max_size=64)),
)


@dataclass
class Oracle:
    """The queue's state as the protocol defines it: version and quota used."""

    version: int = 0
    used: dict[tuple[int, int], int] = field(default_factory=dict)

    def expect(self, method: str, request, size: int, token: str | None) -> grpc.StatusCode:
        """The status ``request`` (``size`` bytes on the wire) must get from ``token``."""
        if token not in SLOTS and token != ADMIN:
            return UNAUTHENTICATED
        if size > (PUSH_LIMIT if method == "Push" else SMALL_LIMIT):
            return EXHAUSTED
        slot = SLOTS.get(token)
        if method == "Stats":
            return OK
        if method == "Advance":
            return DENIED if slot is not None else INVALID if request.version < self.version else OK
        if slot is None:
            return DENIED
        return self._push(request, slot) if method == "Push" else self._pull(request)

    def apply(self, method: str, request, token: str | None) -> None:
        """Record what an accepted request changed."""
        if method == "Advance":
            self.version = request.version
        elif method == "Push":
            key = (SLOTS[token], request.version)
            self.used[key] = self.used.get(key, 0) + request.embeddings.shape[0]

    def _push(self, request: pb.PushRequest, slot: int) -> grpc.StatusCode:
        t, version = request.embeddings, request.version
        if t.dtype not in ITEMSIZE or len(t.shape) != 2 or t.shape[1] != DIM:
            return INVALID
        n = t.shape[0]
        if not 0 < n <= CAPACITY or len(t.data) != n * DIM * ITEMSIZE[t.dtype]:
            return INVALID
        rows = np.frombuffer(t.data, NUMPY[t.dtype]).astype(np.float64).reshape(n, DIM)
        with np.errstate(all="ignore"):
            norms = np.sqrt((rows**2).sum(axis=1))
        if not (np.abs(norms - 1) <= 1e-2).all():
            return INVALID
        if not max(0, self.version - MAX_AGE) <= version <= self.version:
            return INVALID
        return EXHAUSTED if self.used.get((slot, version), 0) + n > QUOTA else OK

    @staticmethod
    def _pull(request: pb.PullRequest) -> grpc.StatusCode:
        bad = (
            not 0 <= request.count <= MAX_PULL
            or (request.HasField("max_age") and request.max_age < 0)
            or request.policy not in (pb.SAMPLE_POLICY_UNSPECIFIED, pb.SAMPLE_POLICY_UNIFORM)
            or request.dtype not in (0, 1, 2)
            or (request.exclude_own and request.only_own)
        )
        return INVALID if bad else OK


# ------------------------------------------------------------------ requests


@st.composite
def rows(draw) -> pb.Tensor:
    """Unit-norm rows, as a client would push them."""
    dtype = draw(st.sampled_from([pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16]))
    n = draw(st.integers(1, QUOTA // 2))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = rng.standard_normal((n, DIM))
    values /= np.linalg.norm(values, axis=1, keepdims=True)
    return pb.Tensor(dtype=dtype, shape=[n, DIM], data=values.astype(NUMPY[dtype]).tobytes())


@st.composite
def tensors(draw) -> pb.Tensor:
    """Rows that are valid, almost valid, or not rows at all."""
    dtype = draw(st.one_of(st.sampled_from([pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16]), INT32))
    n = draw(st.integers(0, CAPACITY + 2))
    kind = draw(st.sampled_from(["unit", "nan", "inf", "zero", "scaled", "bytes"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rows = rng.standard_normal((n, DIM))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    if n and kind != "unit":
        bad = draw(st.integers(0, n - 1))
        if kind == "scaled":
            rows[bad] *= draw(st.sampled_from([0.5, 1.02, 20.0, 1e30]))
        else:
            rows[bad] = {"nan": np.nan, "inf": np.inf, "zero": 0.0, "bytes": 0.0}[kind]
    data = rows.astype(NUMPY.get(dtype, NUMPY[pb.DTYPE_FLOAT32])).tobytes()
    if kind == "bytes":
        data = draw(st.binary(max_size=DIM * 4 * 4))
        n = len(data) // (DIM * ITEMSIZE.get(dtype, 4))
    shape = draw(st.one_of(st.just([n, DIM]), st.lists(INT64, max_size=12),
                           st.lists(st.integers(0, 2**62), min_size=600, max_size=900)))
    if draw(st.booleans()):  # a length that disagrees with the shape
        data = data[: draw(st.integers(0, len(data)))] + draw(st.binary(max_size=8))
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


#: A version as an offset from the queue's (the common case), or any int64 as it is.
VERSIONS = st.one_of(st.tuples(st.just(True), st.integers(-MAX_AGE - 1, 2)),
                     st.tuples(st.just(False), INT64))


def _optional(strategy: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.none(), strategy)


@st.composite
def pull_requests(draw) -> pb.PullRequest:
    fields = {
        "count": draw(st.one_of(st.integers(-2, 100), st.integers(MAX_PULL - 1, MAX_PULL + 1),
                                INT64)),
        "exclude_own": draw(st.booleans()),
        "only_own": draw(st.booleans()),
        "include_versions": draw(st.booleans()),
        "dtype": draw(INT32),
        "policy": draw(INT32),
        "max_age": draw(_optional(INT64)),
        "max_version": draw(_optional(INT64)),
        "seed": draw(_optional(st.integers(0, 2**64 - 1))),
    }
    return pb.PullRequest(**{k: v for k, v in fields.items() if v is not None})


def requests() -> st.SearchStrategy:
    """(method, request, version) over every RPC: a typed request, whose ``version`` (a
    :data:`VERSIONS` draw) the test sets against the queue's, or raw bytes."""
    typed = st.one_of(
        st.tuples(st.just("Push"), st.builds(pb.PushRequest, embeddings=st.one_of(rows(), tensors())), VERSIONS),
        st.tuples(st.just("Pull"), pull_requests(), st.none()),
        st.tuples(st.just("Stats"), st.just(pb.StatsRequest()), st.none()),
        st.tuples(st.just("Advance"), st.just(pb.AdvanceRequest()), VERSIONS),
    )
    raw = st.tuples(st.sampled_from(list(REQUESTS)),
                    st.one_of(st.binary(max_size=64), st.binary(min_size=SMALL_LIMIT - 8,
                                                                max_size=PUSH_LIMIT + 64)),
                    st.none())
    return st.one_of(typed, raw)


def serialized(request, version: tuple[bool, int] | None, oracle: Oracle) -> bytes:
    """``request`` in wire form, its version set (relative to the queue's, or as drawn)."""
    if isinstance(request, bytes):
        return request
    if version is not None:
        relative, value = version
        request.version = oracle.version + value if relative else value
    return request.SerializeToString()


# ------------------------------------------------------------------ harness


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tokens = tmp_path_factory.mktemp("fuzz") / "tokens.txt"
    tokens.write_text("".join(f"{t} {s}\n" for t, s in SLOTS.items()) + f"{ADMIN} admin\n")
    tokens.chmod(0o600)
    args = ["--insecure", "--dim", str(DIM), "--capacity", str(CAPACITY), "--max-age",
            str(MAX_AGE), "--quota", str(QUOTA), "--tokens-file", str(tokens)]
    with QueueServerProcess(args, verbose=True) as process:
        yield process


class Client:
    """Sends serialized requests to any method, with any token, and reads the state."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.methods = {name: self.channel.unary_unary(f"/{SERVICE_NAME}/{name}")
                        for name in REQUESTS}
        self.stub = pb_grpc.NegativeQueueStub(self.channel)

    def call(self, method: str, raw: bytes, token: str | None) -> tuple[grpc.StatusCode, str]:
        metadata = () if token is None else ((TOKEN_METADATA_KEY, token),)
        try:
            self.methods[method](raw, metadata=metadata, timeout=30)
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
        return OK, ""

    def state(self) -> tuple[tuple, dict[str, int]]:
        """(size, version, age histogram, counters) and the refusals by status."""
        stats = self.stub.Stats(pb.StatsRequest(), metadata=((TOKEN_METADATA_KEY, ADMIN),),
                                timeout=30)
        return ((stats.size, stats.version, tuple(stats.age_histogram),
                 stats.counters.SerializeToString(deterministic=True)), dict(stats.rejected))


def check(client: Client, oracle: Oracle, method: str, raw: bytes, token: str | None) -> None:
    """Send one request; its status must be the oracle's, and a refusal must change nothing."""
    try:
        request = REQUESTS[method].FromString(raw)
    except DecodeError:
        request = None
    if request is None and token in (*SLOTS, ADMIN) and len(raw) <= (
        PUSH_LIMIT if method == "Push" else SMALL_LIMIT
    ):
        expected = INVALID
    else:
        expected = oracle.expect(method, request, len(raw), token)
    state, rejected = client.state()
    code, details = client.call(method, raw, token)
    assert code == expected, (method, token, details)
    assert len(details) < MAX_LOG_LINE
    after, rejected_after = client.state()
    if code == OK:
        oracle.apply(method, request, token)
        assert rejected_after == rejected
    else:
        assert after == state, (method, code, details)
        assert {k: v - rejected.get(k, 0) for k, v in rejected_after.items()
                if v != rejected.get(k, 0)} == {code.name: 1}


def worst_requests() -> list[tuple[str, bytes, str]]:
    """The most expensive requests known: shapes of millions of entries, and messages
    just under the size limit, from a valid token."""
    huge_shape = pb.PushRequest(embeddings=pb.Tensor(dtype=pb.DTYPE_FLOAT32,
                                                     shape=[2**62] * 3_000_000))
    near_limit = DEFAULT_MAX_MESSAGE_BYTES - 2**10
    big_data = pb.PushRequest(embeddings=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2, DIM],
                                                   data=bytes(near_limit)))
    return [("Push", huge_shape.SerializeToString(), "token-a"),
            ("Push", big_data.SerializeToString(), "token-a"),
            ("Pull", bytes(near_limit), "token-a"),
            ("Stats", bytes(near_limit), ADMIN)]


@pytest.mark.timeout(120)
def test_every_request_gets_its_status_and_refusals_change_nothing(server):
    client = Client(server.address)
    oracle = Oracle()
    try:
        # Warm every path once, then take the idle level.
        for method, raw, token in [("Push", b"", "token-a"), ("Pull", b"", "token-a")]:
            client.call(method, raw, token)
        idle_kib = memory_kib(server.pid)["VmRSS"]

        for method, raw, token in worst_requests():
            check(client, oracle, method, raw, token)

        @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(data=st.data())
        def fuzz(data) -> None:
            method, request, version = data.draw(requests())
            check(client, oracle, method, serialized(request, version, oracle), data.draw(TOKENS))

        fuzz()
        peak_kib = memory_kib(server.pid)["VmHWM"]
    finally:
        client.channel.close()
    assert peak_kib < 2 * idle_kib, (peak_kib, idle_kib)
    lines = server.log().splitlines()
    assert any("refused" in line for line in lines)
    too_long = [line[:120] for line in lines if len(line) > MAX_LOG_LINE]
    assert not too_long
