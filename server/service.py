"""gRPC service over :class:`server.queue.NegativeQueue`: servicer, auth, server lifecycle.

Every call to ``fedcontrast.negatives.v1.NegativeQueue`` carries a token in the
metadata key :data:`TOKEN_METADATA_KEY`. The server maps contributor tokens to
contributor slots (set by the run: the Flower ServerApp issues one per node and
hands it over Flower's authenticated channel; the standalone command reads a
tokens file) and keeps a separate set of admin tokens, which may call
``Advance`` and ``Stats`` but neither push nor pull rows. The health service
(``grpc.health.v1.Health``) needs no token, so probes work without secrets.

Status codes: missing or unknown token ``UNAUTHENTICATED``; a token of the wrong
kind ``PERMISSION_DENIED``; a bad payload ``INVALID_ARGUMENT``; over quota, a
request larger than any valid one of its method, or more calls in flight than the
token's limit ``RESOURCE_EXHAUSTED``; a message over ``max_message_bytes`` is
refused by gRPC itself with ``RESOURCE_EXHAUSTED``, before the service sees it (so
``Stats.rejected``, which counts the service's own refusals, does not count it).
None of them changes the queue. Every status detail and log line about a request is
one short line (:func:`common.runtime.text.brief`), whatever the request held.

Usage (tests, a Flower ``lifespan``)::

    with QueueServer(queue, {"token-a": 0, "token-b": 1}) as server:
        client = QueueClient(server.address, "token-a")
"""

from __future__ import annotations

import collections
import contextvars
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent import futures
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import torch
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common.config import DEFAULT_MAX_CALLS_PER_TOKEN, DEFAULT_MAX_MESSAGE_BYTES
from common.runtime.text import brief
from common.runtime.wire import (
    TOKEN_METADATA_KEY,
    proto_to_tensor,
    serialize_with_tensor,
    torch_dtype,
)
from proto import negatives_pb2 as pb
from proto import negatives_pb2_grpc as pb_grpc
from server.queue import NegativeQueue, QuotaExceeded

__all__ = [
    "DEFAULT_MAX_CALLS_PER_TOKEN",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "SERVICE_NAME",
    "TOKEN_METADATA_KEY",
    "QueueServer",
    "ServerTLS",
    "server_options",
]

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["NegativeQueue"].full_name
#: Room left in a reply for everything but the rows and their versions (framing, fields).
_REPLY_OVERHEAD_BYTES = 64 * 2**10
#: Most bytes a row's version takes in a reply that asks for versions (an int64 varint).
_VERSION_BYTES = 10
#: Room in a Push request for everything but its rows' bytes (dtype, a 2-entry shape,
#: version, framing): a request larger than a full-capacity float32 push and this is
#: refused before it is parsed.
_PUSH_OVERHEAD_BYTES = 4 * 2**10
#: Largest Pull, Stats or Advance request (a few scalar fields; unknown fields included).
_SMALL_REQUEST_BYTES = 2**10


def server_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """gRPC server options: message size limits both ways, no port sharing."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # A second server on the same port must fail to bind, not share it.
        ("grpc.so_reuseport", 0),
    ]


@dataclass(frozen=True)
class ServerTLS:
    """PEM-encoded server certificate chain and private key."""

    certificate_chain: bytes
    private_key: bytes

    @classmethod
    def from_files(cls, cert: str | Path, key: str | Path) -> ServerTLS:
        return cls(Path(cert).read_bytes(), Path(key).read_bytes())

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.private_key, self.certificate_chain)])


@dataclass(frozen=True)
class _Caller:
    contributor: int | None  # None for admin tokens
    admin: bool


_CALLER: contextvars.ContextVar[_Caller] = contextvars.ContextVar("queue_caller")


class _Rejections:
    """Refused requests by status name (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()

    def add(self, code: grpc.StatusCode) -> None:
        with self._lock:
            self._counts[code.name] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class _InFlight:
    """Calls in flight per token, against at most ``limit`` each (thread-safe)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._calls: dict[str, int] = {}

    def enter(self, token: str) -> bool:
        """Count one more call of ``token``; False (and nothing counted) when at the limit."""
        with self._lock:
            calls = self._calls.get(token, 0)
            if self.limit is not None and calls >= self.limit:
                return False
            self._calls[token] = calls + 1
            return True

    def leave(self, token: str) -> None:
        with self._lock:
            calls = self._calls.pop(token) - 1
            if calls:
                self._calls[token] = calls


class _AuthInterceptor(grpc.ServerInterceptor):
    """Resolves the metadata token to a caller before any queue method runs; bounds the
    request's size and the token's calls in flight before the request is parsed.

    Refusals are counted when the method's handler runs, not when the call arrives: a
    message gRPC refuses for its size never reaches a handler, and is not counted under
    a status it was not answered with.
    """

    def __init__(
        self,
        resolve: Callable[[str | None], _Caller | None],
        rejections: _Rejections,
        request_limits: Mapping[str, int],
        in_flight: _InFlight,
    ):
        self._resolve = resolve
        self._rejections = rejections
        self._prefix = f"/{SERVICE_NAME}/"
        self._request_limits = request_limits
        self._in_flight = in_flight

    def _refusal(self, method: str, code: grpc.StatusCode, detail: str):
        """A handler that refuses the call with ``code``, counted when it runs."""
        return grpc.unary_unary_rpc_method_handler(
            lambda request, context: _refuse(self._rejections, context, code, f"{method}: {detail}")
        )

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(self._prefix):
            return handler
        token = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == TOKEN_METADATA_KEY:
                token = value
                break
        caller = self._resolve(token)
        name = method[len(self._prefix):]
        if caller is None:
            detail = (
                f"missing token in metadata key {TOKEN_METADATA_KEY!r}"
                if token is None
                else "unknown token"
            )
            return self._refusal(name, grpc.StatusCode.UNAUTHENTICATED, detail)
        behavior, parse = handler.unary_unary, handler.request_deserializer
        serialize = handler.response_serializer
        rejections, in_flight = self._rejections, self._in_flight
        size_limit = self._request_limits[name]
        refuse = partial(_refuse, rejections)

        # Parse here rather than in gRPC, so that bytes that are no protobuf of the
        # right type are INVALID_ARGUMENT, not gRPC's generic INTERNAL, and so that a
        # request's size is checked before anything is built from it.
        def authenticated(raw: bytes, context: grpc.ServicerContext):
            if len(raw) > size_limit:
                refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                       f"{name} request of {len(raw)} bytes is larger than any valid one "
                       f"({size_limit} bytes)")
            if not in_flight.enter(token):
                refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                       f"this token already has {in_flight.limit} calls in flight; "
                       "wait for one to finish")
            try:
                try:
                    request = parse(raw)
                except DecodeError as exc:
                    refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                           brief(f"request is not a valid message: {exc}"))
                reset = _CALLER.set(caller)
                try:
                    return behavior(request, context)
                finally:
                    _CALLER.reset(reset)
            finally:
                in_flight.leave(token)

        return grpc.unary_unary_rpc_method_handler(
            authenticated, response_serializer=partial(_serialized, serialize)
        )


def _refuse(
    rejections: _Rejections, context: grpc.ServicerContext, code: grpc.StatusCode, detail: str
):
    """Count, log (one short line) and abort the call with ``code``."""
    detail = brief(detail)
    rejections.add(code)
    logger.info("refused %s: %s", code.name, detail)
    context.abort(code, detail)


def _serialized(serialize: Callable[[Any], bytes], reply: Any) -> bytes:
    """A reply in wire form: Pull answers bytes already (see ``NegativeQueueServicer.Pull``)."""
    return reply if isinstance(reply, bytes) else serialize(reply)


class NegativeQueueServicer(pb_grpc.NegativeQueueServicer):
    """Thin adapter: decode, call the queue, map its errors to status codes."""

    def __init__(self, queue: NegativeQueue, *, max_pull: int, rejections: _Rejections):
        self._queue = queue
        self._max_pull = max_pull
        self._rejections = rejections

    def _refuse(self, context: grpc.ServicerContext, code: grpc.StatusCode, detail: str):
        _refuse(self._rejections, context, code, detail)

    def Push(self, request: pb.PushRequest, context: grpc.ServicerContext) -> pb.PushResponse:
        caller = _CALLER.get()
        if caller.contributor is None:
            self._refuse(
                context, grpc.StatusCode.PERMISSION_DENIED, "admin tokens cannot push rows"
            )
        try:
            rows = proto_to_tensor(request.embeddings, expected_dim=self._queue.dim)
            accepted = self._queue.push(caller.contributor, rows, request.version)
        except QuotaExceeded as exc:
            self._refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except ValueError as exc:  # wire errors and InvalidPush
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        remaining = self._queue.quota_remaining(caller.contributor, request.version)
        return pb.PushResponse(
            accepted=accepted,
            queue_version=self._queue.version,
            quota_remaining=-1 if remaining is None else remaining,
        )

    def Pull(self, request: pb.PullRequest, context: grpc.ServicerContext) -> bytes:
        """Sampled rows, as a ``PullResponse`` already serialised.

        The rows go from the queue's gather into the reply's bytes in one copy
        (``serialize_with_tensor``); building a ``PullResponse`` and letting gRPC
        serialise it would copy them three more times. The auth interceptor, which
        wraps every method of this service, sends the bytes as they are.
        """
        caller = _CALLER.get()
        if caller.contributor is None:  # an operator's token: it owns no rows and reads none
            self._refuse(
                context, grpc.StatusCode.PERMISSION_DENIED, "admin tokens cannot pull rows"
            )
        problem = None
        if not 0 <= request.count <= self._max_pull:
            problem = f"count must be in [0, {self._max_pull}], got {request.count}"
        elif request.HasField("max_age") and request.max_age < 0:
            problem = f"max_age must be >= 0, got {request.max_age}"
        elif request.policy not in (pb.SAMPLE_POLICY_UNSPECIFIED, pb.SAMPLE_POLICY_UNIFORM):
            problem = (f"sample policy {request.policy} is not served: only SAMPLE_POLICY_UNIFORM "
                       "(1) or unspecified (the recent and stratified policies were removed)")
        elif request.dtype != pb.DTYPE_UNSPECIFIED and request.dtype not in (
            pb.DTYPE_FLOAT32,
            pb.DTYPE_FLOAT16,
        ):
            problem = f"reply dtype {request.dtype} is not DTYPE_FLOAT32 or DTYPE_FLOAT16"
        elif request.exclude_own and request.only_own:
            problem = "exclude_own and only_own cannot both be set"
        if problem:
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
        dtype = (
            torch.float32 if request.dtype == pb.DTYPE_UNSPECIFIED else torch_dtype(request.dtype)
        )
        rows, versions = self._queue.pull(
            request.count,
            max_age=request.max_age if request.HasField("max_age") else None,
            exclude=caller.contributor if request.exclude_own else None,
            only=caller.contributor if request.only_own else None,
            max_version=request.max_version if request.HasField("max_version") else None,
            seed=request.seed if request.HasField("seed") else None,
        )
        reply = pb.PullResponse(queue_version=self._queue.version)
        if request.include_versions:
            reply.versions.extend(versions.tolist())
        return serialize_with_tensor(reply, "embeddings", rows, dtype)

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        stats = self._queue.stats()
        quota = stats["quota_per_version"]
        return pb.StatsResponse(
            size=stats["size"],
            capacity=stats["capacity"],
            dim=stats["dim"],
            version=stats["version"],
            max_age=stats["max_age"],
            age_histogram=stats["age_histogram"],
            counters=pb.QueueCounters(**stats["counters"]),
            rejected=self._rejections.snapshot(),
            quota_per_version=-1 if quota is None else quota,
        )

    def Advance(
        self, request: pb.AdvanceRequest, context: grpc.ServicerContext
    ) -> pb.AdvanceResponse:
        if not _CALLER.get().admin:
            self._refuse(context, grpc.StatusCode.PERMISSION_DENIED, "Advance needs an admin token")
        try:
            evicted = self._queue.advance(request.version)
        except ValueError as exc:
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.AdvanceResponse(version=self._queue.version, evicted=evicted)


def _check_token(token: str) -> None:
    """ValueError unless ``token`` can travel as gRPC metadata."""
    if (
        not isinstance(token, str)
        or not token
        or not token.isascii()
        or not token.isprintable()
        or any(c.isspace() for c in token)
    ):
        raise ValueError("a token must be a non-empty string of printable ASCII without spaces")


def _check_slot(contributor: int) -> None:
    if isinstance(contributor, bool) or not isinstance(contributor, int) or contributor < 0:
        raise ValueError(f"contributor slots are ints >= 0, got {contributor!r}")


class QueueServer:
    """The queue service on one port, with auth, health, optional TLS.

    Args:
        queue: the queue to serve (the owner keeps calling ``advance`` on it).
        tokens: contributor token -> contributor slot (a small int >= 0).
        admin_tokens: tokens that may call ``Advance``/``Stats`` (not ``Push``/``Pull``).
        host, port: where to listen; port 0 picks a free port (see :attr:`port`).
        tls: server certificate and key; ``None`` serves without TLS (loopback only).
        max_message_bytes: largest message accepted or sent.
        max_pull: most rows one Pull may ask for; larger counts are refused
            (default: what fits in a float32 reply with versions under ``max_message_bytes``).
        max_workers: threads serving RPCs.
        max_calls_per_token: calls one token may have in flight at once (``None``: no
            limit); one more is refused with ``RESOURCE_EXHAUSTED`` before its request
            is parsed, so one token holder keeps at most this many of the
            ``max_workers`` threads busy. A client of the run makes one call at a time.

    Requests larger than any valid one of their method (a Push of ``capacity`` float32
    rows and its framing; a few hundred bytes for the others) are refused with
    ``RESOURCE_EXHAUSTED`` before they are parsed.
    """

    def __init__(
        self,
        queue: NegativeQueue,
        tokens: Mapping[str, int],
        *,
        admin_tokens: Iterable[str] = (),
        host: str = "127.0.0.1",
        port: int = 0,
        tls: ServerTLS | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_pull: int | None = None,
        max_workers: int = 8,
        max_calls_per_token: int | None = DEFAULT_MAX_CALLS_PER_TOKEN,
    ) -> None:
        # A float32 row and its version, so that any Pull up to max_pull fits in a reply.
        fits = (max_message_bytes - _REPLY_OVERHEAD_BYTES) // (queue.dim * 4 + _VERSION_BYTES)
        if fits < 1:
            raise ValueError(
                f"max_message_bytes {max_message_bytes} is too small for rows of dim {queue.dim}"
            )
        if max_pull is None:
            max_pull = fits
        elif not 1 <= max_pull <= fits:
            raise ValueError(
                f"max_pull must be in [1, {fits}] for max_message_bytes {max_message_bytes}"
            )
        if max_calls_per_token is not None and max_calls_per_token < 1:
            raise ValueError(f"max_calls_per_token must be >= 1 or None, got {max_calls_per_token}")
        self.queue = queue
        self.host = host
        self.max_calls_per_token = max_calls_per_token
        self.request_limits = {
            "Push": min(max_message_bytes,
                        queue.capacity * queue.dim * 4 + _PUSH_OVERHEAD_BYTES),
            **dict.fromkeys(("Pull", "Stats", "Advance"), _SMALL_REQUEST_BYTES),
        }
        self.max_message_bytes = max_message_bytes
        self.max_pull = max_pull
        self._requested_port = port
        self._tls = tls
        self._max_workers = max_workers
        self._tokens_lock = threading.Lock()
        self._tokens: dict[str, int] = {}
        self._admin_tokens: frozenset[str] = frozenset()
        # token -> caller, rebuilt on every change and replaced whole, so that the
        # per-call lookup is one dict read without the lock.
        self._callers: dict[str, _Caller] = {}
        self.set_tokens(tokens, admin_tokens=admin_tokens)
        self._rejections = _Rejections()
        self._server: grpc.Server | None = None
        self._health: health.HealthServicer | None = None
        self._port: int | None = None

    # ------------------------------------------------------------------ tokens

    def set_tokens(
        self, tokens: Mapping[str, int], *, admin_tokens: Iterable[str] | None = None
    ) -> None:
        """Replace the contributor tokens (and the admin tokens, when given)."""
        checked = {}
        for token, contributor in tokens.items():
            _check_token(token)
            _check_slot(contributor)
            checked[token] = contributor
        admins = None if admin_tokens is None else frozenset(admin_tokens)
        for token in admins or ():
            _check_token(token)
            if token in checked:
                raise ValueError("a token cannot be both an admin token and a contributor token")
        with self._tokens_lock:
            self._tokens = checked
            if admins is not None:
                self._admin_tokens = admins
            self._rebuild_callers_locked()

    def add_token(self, token: str, contributor: int) -> None:
        """Let ``token`` act as ``contributor`` from the next call on."""
        _check_token(token)
        _check_slot(contributor)
        with self._tokens_lock:
            if token in self._admin_tokens:
                raise ValueError("a token cannot be both an admin token and a contributor token")
            self._tokens = {**self._tokens, token: contributor}
            self._rebuild_callers_locked()

    def _rebuild_callers_locked(self) -> None:
        callers = {t: _Caller(contributor=c, admin=False) for t, c in self._tokens.items()}
        callers.update(dict.fromkeys(self._admin_tokens, _Caller(contributor=None, admin=True)))
        self._callers = callers

    def _resolve(self, token: str | None) -> _Caller | None:
        return None if token is None else self._callers.get(token)

    # --------------------------------------------------------------- lifecycle

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the server is not started")
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` to hand to clients (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def start(self) -> int:
        """Bind, start serving, and return the bound port."""
        if self._server is not None:
            raise RuntimeError("the server is already started")
        server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=self._max_workers, thread_name_prefix="queue-rpc"
            ),
            interceptors=[_AuthInterceptor(
                self._resolve, self._rejections, self.request_limits,
                _InFlight(self.max_calls_per_token),
            )],
            options=server_options(self.max_message_bytes),
        )
        pb_grpc.add_NegativeQueueServicer_to_server(
            NegativeQueueServicer(self.queue, max_pull=self.max_pull, rejections=self._rejections),
            server,
        )
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        bind = (
            f"[{self.host}]:{self._requested_port}"
            if ":" in self.host
            else f"{self.host}:{self._requested_port}"
        )
        try:
            port = (
                server.add_secure_port(bind, self._tls.credentials())
                if self._tls
                else server.add_insecure_port(bind)
            )
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {bind}: {exc}") from exc
        if port == 0:
            raise OSError(f"cannot listen on {bind}")
        server.start()
        for service in ("", SERVICE_NAME):
            self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._server, self._port = server, port
        logger.info(
            "queue service listening on %s (%s)", self.address, "TLS" if self._tls else "insecure"
        )
        return port

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop accepting calls, let running ones finish within ``grace`` seconds."""
        if self._server is None:
            return
        self._health.enter_graceful_shutdown()
        self._server.stop(grace).wait()
        self._server = None
        logger.info("queue service on %s stopped", f"{self.host}:{self._port}")

    def __enter__(self) -> QueueServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
