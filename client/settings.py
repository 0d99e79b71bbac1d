"""The node's settings: what the node config says about this node, and whom it trusts.

Node config keys (``fedcontrast client`` writes them, see :mod:`client.node`):

- ``partition-id`` and ``num-partitions``: this node's share of the run's built-in
  dataset (``--dataset``), split with ``--partitioner`` and ``--seed``, so every
  node computes the same split on its own;
- ``data-path``: a local ``.npz`` file, or a dataset plug-in ``package.module:name[:ARG]``
  (see :mod:`common.datasets`), used instead;
- ``client-id``: stable identity (default ``partition-<id>``; required with
  ``data-path``), names the state directory;
- ``state-dir``: where the client's state lives (see :mod:`client.state`);
- ``queue-root-certificates``: absolute path of the PEM CA that verifies the negative
  queue's TLS certificate (``fedcontrast client --root-certificates CA`` sets it to
  that CA). A node holding one talks to the queue over TLS only, and one without it
  only without TLS: the round fails with an error saying which side to change when
  the TRAIN message's ``queue-tls`` disagrees.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.state import check_client_id, default_state_dir


@dataclass(frozen=True)
class NodeSettings:
    """What the node config says about this node."""

    client_id: str
    state_dir: Path
    partition_id: int | None = None
    num_partitions: int | None = None
    data_path: str | None = None
    queue_root_certificates: Path | None = None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodeSettings:
        data_path = node_config.get("data-path") or None
        pid, parts = node_config.get("partition-id"), node_config.get("num-partitions")
        if data_path is None:
            if pid is None or parts is None:
                raise ValueError(
                    "node config needs partition-id and num-partitions (a share of the run's "
                    "dataset) or data-path (a local .npz file)"
                )
            pid, parts = int(pid), int(parts)
            if parts < 1 or not 0 <= pid < parts:
                raise ValueError(
                    f"node config partition-id {pid} must be in [0, num-partitions {parts})"
                )
        client_id = node_config.get("client-id") or (None if data_path else f"partition-{pid}")
        if client_id is None:  # two such nodes would otherwise share one state and accountant
            raise ValueError("node config with data-path needs client-id: it names the "
                             "client's state and privacy accountant")
        client_id = check_client_id(str(client_id))
        state_dir = node_config.get("state-dir")
        queue_ca = str(node_config.get("queue-root-certificates") or "")
        if queue_ca and not Path(queue_ca).is_absolute():
            raise ValueError(f"node config queue-root-certificates {queue_ca!r} must be an "
                             "absolute path (fedcontrast client makes it absolute)")
        return cls(
            client_id=client_id,
            state_dir=Path(str(state_dir)) if state_dir else default_state_dir(client_id),
            partition_id=None if pid is None else int(pid),
            num_partitions=None if parts is None else int(parts),
            data_path=None if data_path is None else str(data_path),
            queue_root_certificates=Path(queue_ca) if queue_ca else None,
        )


def queue_root_certificates(node: NodeSettings, queue_tls: bool) -> bytes | None:
    """The PEM CA to verify the queue with when the server says it is TLS; None when it is not.

    Raises ValueError when the server and the node disagree: a TLS queue and no CA in the
    node config, or a CA (the node trusts the queue over TLS only) and an insecure queue.
    """
    ca = node.queue_root_certificates
    if queue_tls and ca is None:
        raise ValueError(
            "the server serves the negative queue with TLS, but this node has no CA to verify "
            "it: start the client with --root-certificates CA (or set node config "
            "queue-root-certificates to the CA's absolute path)"
        )
    if not queue_tls and ca is not None:
        raise ValueError(
            f"this node trusts the negative queue over TLS only (node config "
            f"queue-root-certificates {ca}), but the server serves it without TLS, so its "
            "token and embeddings would cross the network in clear: run `fedcontrast server` "
            "with --ssl-certfile/--ssl-keyfile (or --queue-ssl-*), or start this client "
            "with --insecure on a trusted network"
        )
    if ca is None:
        return None
    try:
        return ca.read_bytes()
    except OSError as exc:
        raise ValueError(f"node config queue-root-certificates {ca}: cannot read it "
                         f"({exc.strerror})") from exc
