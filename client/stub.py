"""Client side of the negative queue: a typed stub and the trainer's global negative source.

:class:`QueueClient` wraps the generated stub with a deadline on every call,
bounded retries with exponential backoff on transient errors (``UNAVAILABLE``,
``DEADLINE_EXCEEDED``, ``ABORTED``), and no exceptions for the caller: a call
that fails returns ``None`` / ``False`` and is counted. Training never waits on
the queue longer than ``(retries + 1) * timeout`` plus the backoff.

:class:`GlobalNegatives` is the trainer's source of queue negatives: it pulls
every ``refresh_every`` steps, serves the cached rows in between, and returns
``None`` when the queue could not be reached (the trainer then uses its local
negatives for that step), counting the miss.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from typing import Any

import grpc
import torch
import torch.nn.functional as F

from common.config import DEFAULT_MAX_MESSAGE_BYTES
from common.runtime.wire import (
    TOKEN_METADATA_KEY,
    parse_with_tensor,
    serialize_with_tensor,
    wire_dtype,
)
from proto import negatives_pb2 as pb
from proto import negatives_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

TRANSIENT_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED}
)
_COUNTERS = (
    "hits",  # pulls that returned rows
    "misses",  # pulls that failed (queue unreachable, refused, malformed reply)
    "empty_pulls",  # pulls the queue answered with no row (nothing eligible yet)
    "rows_pulled",
    "pushes",
    "push_failures",
    "rows_pushed",
    "retries",
    "unauthenticated",
    "refused",
)


class QueueClient:
    """Typed client of the ``NegativeQueue`` service.

    Args:
        address: ``host:port`` of the queue service.
        token: this node's queue token (sent in metadata ``x-fedcontrast-token``).
        root_certificates: PEM root CA to verify the server with TLS; ``None``
            connects without TLS (loopback only).
        timeout: deadline of each attempt, in seconds.
        retries: extra attempts after a transient error.
        backoff: first pause between attempts, in seconds; doubles each retry.
        max_message_bytes: largest message sent or received.
    """

    def __init__(
        self,
        address: str,
        token: str,
        *,
        root_certificates: bytes | None = None,
        timeout: float = 2.0,
        retries: int = 2,
        backoff: float = 0.1,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        if retries < 0 or backoff < 0:
            raise ValueError(f"retries and backoff must be >= 0, got {retries} and {backoff}")
        self.address = address
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # Notice a restarted server within a step or two, not after gRPC's default 1-120 s.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        if root_certificates is None:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(address, credentials, options=options)
        self._stub = pb_grpc.NegativeQueueStub(self._channel)
        # Push and Pull move bytes that are mostly one tensor: they skip the generated
        # (de)serialisers and go through common.runtime.wire, which copies the tensor once.
        service = f"/{pb.DESCRIPTOR.services_by_name['NegativeQueue'].full_name}"
        self._push_bytes = self._channel.unary_unary(
            f"{service}/Push",
            request_serializer=None,
            response_deserializer=pb.PushResponse.FromString,
        )
        self._pull_bytes = self._channel.unary_unary(
            f"{service}/Pull",
            request_serializer=pb.PullRequest.SerializeToString,
            response_deserializer=None,
        )
        self._metadata = ((TOKEN_METADATA_KEY, token),)
        self._lock = threading.Lock()
        self._counters = dict.fromkeys(_COUNTERS, 0)
        self._failing: grpc.StatusCode | None = None  # kind of the last failure, until a success

    # ----------------------------------------------------------------- calls

    def push(
        self, embeddings: torch.Tensor, version: int, dtype: torch.dtype = torch.float16
    ) -> bool:
        """Push (n, dim) unit-norm rows computed at encoder ``version``; True if accepted."""
        request = serialize_with_tensor(
            pb.PushRequest(version=version), "embeddings", embeddings, dtype
        )
        reply = self._call("Push", self._push_bytes, request)
        with self._lock:
            if reply is None:
                self._counters["push_failures"] += 1
                return False
            self._counters["pushes"] += 1
            self._counters["rows_pushed"] += reply.accepted
        return True

    def pull(
        self,
        n: int,
        max_age: int | None,
        exclude_own: bool = True,
        dtype: torch.dtype = torch.float16,
        only_own: bool = False,
        *,
        max_version: int | None = None,
        seed: int | None = None,
    ) -> torch.Tensor | None:
        """Up to ``n`` rows no older than ``max_age`` (``None``: the server's bound), sampled
        uniformly without replacement.

        Args:
            exclude_own: leave out the rows this node pushed.
            only_own: only the rows this node pushed (give ``exclude_own=False``).
            dtype: precision on the wire and of the result (float16 halves the bytes).
            max_version: only rows of this encoder version or older (``None``: any).
            seed: a reproducible pull (``PullRequest.seed``): the same rows in the queue
                and the same seed give the same reply.

        Returns:
            (m, dim) CPU tensor of ``dtype``, m <= n (possibly 0), or ``None`` when
            the queue could not be reached or refused the call (counted as a miss).
        """
        request = pb.PullRequest(
            count=n,
            max_age=max_age,
            exclude_own=exclude_own,
            only_own=only_own,
            dtype=wire_dtype(dtype),
            max_version=max_version,
            seed=seed,
        )
        reply = self._call("Pull", self._pull_bytes, request)
        rows = None
        if reply is not None:
            try:
                _, rows = parse_with_tensor(pb.PullResponse, reply, "embeddings")
                if rows.dtype != dtype or rows.dim() != 2 or rows.shape[0] > n:
                    raise ValueError(
                        f"reply of {rows.dtype} {list(rows.shape)} for a pull of {n} {dtype} rows"
                    )
            except ValueError as exc:
                logger.error("queue %s sent a malformed Pull reply: %s", self.address, exc)
                rows = None
        with self._lock:
            if rows is None:
                self._counters["misses"] += 1
            elif rows.shape[0] == 0:
                self._counters["empty_pulls"] += 1
            else:
                self._counters["hits"] += 1
                self._counters["rows_pulled"] += rows.shape[0]
        return rows

    def stats(self) -> dict[str, Any] | None:
        """The queue's statistics (same keys as ``NegativeQueue.stats()`` plus ``rejected``)."""
        reply = self._call("Stats", self._stub.Stats, pb.StatsRequest())
        if reply is None:
            return None
        return {
            "size": reply.size,
            "capacity": reply.capacity,
            "dim": reply.dim,
            "version": reply.version,
            "max_age": reply.max_age,
            "quota_per_version": None if reply.quota_per_version < 0 else reply.quota_per_version,
            "age_histogram": list(reply.age_histogram),
            "counters": {
                f.name: getattr(reply.counters, f.name) for f in pb.QueueCounters.DESCRIPTOR.fields
            },
            "rejected": dict(reply.rejected),
        }

    def advance(self, version: int) -> bool:
        """Move the queue to ``version`` (admin tokens only); True on success."""
        return (
            self._call("Advance", self._stub.Advance, pb.AdvanceRequest(version=version))
            is not None
        )

    def counters(self) -> dict[str, int]:
        """Hits (pulls with rows), misses, empty pulls, push failures, retries, ... since this
        client was made."""
        with self._lock:
            return dict(self._counters)

    @property
    def hits(self) -> int:
        return self.counters()["hits"]

    @property
    def misses(self) -> int:
        return self.counters()["misses"]

    @property
    def push_failures(self) -> int:
        return self.counters()["push_failures"]

    def _call(self, name: str, rpc, request):
        """One RPC with a deadline and bounded retries; the reply, or None on failure.

        A failure is logged when it starts (or changes kind); repeats of the same
        failure, as when every training step finds the queue down, go to DEBUG.
        """
        attempt = 0
        while True:
            try:
                reply = rpc(request, timeout=self.timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                code, detail = exc.code(), exc.details()
            else:
                if self._failing is not None:
                    logger.info("queue %s answers again", self.address)
                    self._failing = None
                return reply
            if code in TRANSIENT_CODES and attempt < self.retries:
                with self._lock:
                    self._counters["retries"] += 1
                time.sleep(self.backoff * 2**attempt * (1.0 + 0.5 * random.random()))
                attempt += 1
                continue
            counter = (
                "unauthenticated"
                if code == grpc.StatusCode.UNAUTHENTICATED
                else None
                if code in TRANSIENT_CODES
                else "refused"
            )
            if counter:
                with self._lock:
                    self._counters[counter] += 1
            level = (
                logging.DEBUG
                if code == self._failing
                else (logging.WARNING if code in TRANSIENT_CODES else logging.ERROR)
            )
            self._failing = code
            if code == grpc.StatusCode.UNAUTHENTICATED:
                logger.log(
                    level,
                    "queue %s refused this node's token on %s: %s",
                    self.address,
                    name,
                    detail,
                )
            elif code in TRANSIENT_CODES:
                logger.log(
                    level,
                    "queue %s unreachable for %s after %d attempts: %s %s",
                    self.address,
                    name,
                    attempt + 1,
                    code.name,
                    detail,
                )
            else:
                logger.log(
                    level, "queue %s refused %s: %s %s", self.address, name, code.name, detail
                )
            return None

    # ------------------------------------------------------------- lifecycle

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> QueueClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pull_seed(seed: int, k: int) -> int:
    """The seed of the ``k``-th pull of a source seeded with ``seed``: 64 bits of SHA-256."""
    digest = hashlib.sha256(f"fedcontrast-pull:{seed}:{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


class GlobalNegatives:
    """The trainer's source of negatives from the global queue.

    Args:
        client: a connected :class:`QueueClient`.
        num_negatives: rows asked for at each refresh (K).
        max_age: oldest encoder version accepted, in rounds.
        refresh_every: pull every this many steps; serve the cache in between.
        exclude_own: leave out rows this node pushed (needed under DP when own
            rows were pushed without noise).
        only_own: pull only rows this node pushed (a per-client queue; the ``fedmoco``
            baseline of ``fedcontrast compare``); excludes ``exclude_own``.
        max_version: pull only rows of this encoder version or older (``None``: any).
        seed: make every pull reproducible: the k-th refresh sends the seed
            :func:`pull_seed` ``(seed, k)``, so the same queue contents give the same
            negatives (``None``: the queue's own generator).
    """

    def __init__(
        self,
        client: QueueClient,
        num_negatives: int,
        max_age: int,
        refresh_every: int = 1,
        exclude_own: bool = True,
        only_own: bool = False,
        max_version: int | None = None,
        seed: int | None = None,
    ) -> None:
        if exclude_own and only_own:
            raise ValueError("exclude_own and only_own cannot both be set")
        if num_negatives <= 0:
            raise ValueError(f"num_negatives must be positive, got {num_negatives}")
        if max_age < 0:
            raise ValueError(f"max_age must be >= 0, got {max_age}")
        if refresh_every <= 0:
            raise ValueError(f"refresh_every must be positive, got {refresh_every}")
        self.client = client
        self.num_negatives = num_negatives
        self.max_age = max_age
        self.refresh_every = refresh_every
        self.exclude_own = exclude_own
        self.only_own = only_own
        self.max_version = max_version
        self.seed = seed
        self._cache: torch.Tensor | None = None  # K x D, unit-norm float32
        self._last_refresh: int | None = None
        self._metrics = dict.fromkeys(
            ("refreshes", "misses", "empty_pulls", "steps_served", "steps_without"), 0
        )

    def negatives(self, step: int, device: torch.device | str) -> torch.Tensor | None:
        """(K, D) detached unit-norm float32 negatives on ``device``, or None for this step."""
        if self._due(step):
            self._refresh(step)
        if self._cache is None:
            self._metrics["steps_without"] += 1
            return None
        self._cache = self._cache.to(device)
        self._metrics["steps_served"] += 1
        return self._cache

    def observe(self, keys: torch.Tensor) -> None:
        """Nothing to do: the ClientApp pushes keys at the end of the round."""

    def metrics(self) -> dict[str, int]:
        """Refreshes, misses (queue unreachable), empty pulls, steps served / without."""
        return dict(self._metrics)

    def _due(self, step: int) -> bool:
        last = self._last_refresh
        return last is None or step < last or step - last >= self.refresh_every

    def _refresh(self, step: int) -> None:
        self._last_refresh = step
        self._metrics["refreshes"] += 1
        seed = None if self.seed is None else pull_seed(self.seed, self._metrics["refreshes"])
        rows = self.client.pull(self.num_negatives, self.max_age, exclude_own=self.exclude_own,
                                only_own=self.only_own, max_version=self.max_version, seed=seed)
        if rows is None:
            self._metrics["misses"] += 1
            self._cache = None
        elif rows.shape[0] == 0:
            self._metrics["empty_pulls"] += 1
            self._cache = None
        else:
            # float16 on the wire: renormalise so the rows are unit-norm again.
            self._cache = F.normalize(rows.float(), dim=1)
